"""The README's run command's launcher: all five services up as separate processes, the page served,
and everything stopped cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from voice_common.settings import REPO_ROOT

from devtools.launcher import SERVICES
from tests.helpers import free_port


def test_run_all_then_ctrl_c(tmp_path) -> None:
    ports = {s.name: free_port() for s in SERVICES}
    env = {
        **os.environ,
        **{f"{s.env_prefix}PORT": str(ports[s.name]) for s in SERVICES},
        "APP_DATA_DIR": str(tmp_path / "data"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.launcher", "--logs", str(tmp_path / "logs")],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    out = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            out.append(line)
            if "All services are up" in line or proc.poll() is not None:
                break
        assert any("All services are up" in line for line in out), "".join(out)
        assert f"http://localhost:{ports['main-app']}" in "".join(out)
        page = urllib.request.urlopen(f"http://127.0.0.1:{ports['main-app']}/", timeout=5).read().decode()
        assert "<title>Voice Chat</title>" in page
        health = urllib.request.urlopen(f"http://127.0.0.1:{ports['main-app']}/healthz", timeout=5).read().decode()
        assert health.count('"status":"ok"') == 5  # main-app and its four downstream services
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "all services stopped" in rest
    for port in ports.values():  # nothing left listening
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            raise AssertionError(f"port {port} still answers")
        except OSError:
            pass
