"""The README's run command's launcher: all five services up as separate processes, the page served, a
crashed service restarted while the others go on, and everything stopped cleanly on Ctrl-C (SIGINT) —
even when the launcher was started with SIGINT ignored, as from a background shell."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from voice_common.settings import REPO_ROOT

from devtools.launcher import SERVICES
from devtools.launcher import health as health_of
from tests.helpers import free_port


def read_until(proc: subprocess.Popen[str], out: list[str], text: str, within: float) -> bool:
    assert proc.stdout is not None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        out.append(line)
        if text in line:
            return True
        if proc.poll() is not None:
            return False
    return False


def test_run_all_restart_a_crash_then_ctrl_c(tmp_path) -> None:
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
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as a background shell does
    )
    out: list[str] = []
    try:
        assert read_until(proc, out, "All services are up", 240), "".join(out)
        assert f"http://localhost:{ports['main-app']}" in "".join(out)
        page = urllib.request.urlopen(f"http://127.0.0.1:{ports['main-app']}/", timeout=5).read().decode()
        assert "<title>Voice Chat</title>" in page
        health = urllib.request.urlopen(f"http://127.0.0.1:{ports['main-app']}/healthz", timeout=5).read().decode()
        assert health.count('"status":"ok"') == 5  # main-app and its four downstream services

        # a crash of one service: restarted, while main-app goes on serving
        stt_pid = int(re.search(r"stt\s+healthy on \S+ \(pid (\d+)", "".join(out)).group(1))  # type: ignore[union-attr]
        os.kill(stt_pid, signal.SIGKILL)
        assert read_until(proc, out, "stt restarted", 30), "".join(out)
        stt = f"http://127.0.0.1:{ports['stt']}/healthz"
        for _ in range(300):
            if health_of(stt) == 200:
                break
            time.sleep(0.2)
        assert health_of(stt) == 200 and health_of(f"http://127.0.0.1:{ports['main-app']}/healthz") == 200
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


def test_main_app_over_https_with_a_self_signed_certificate(tmp_path) -> None:
    """What `make run HTTPS=1` does for main-app: a certificate for localhost and the LAN address, and
    main-app serving TLS with it (a phone on the LAN then gets a secure page and its microphone)."""
    import json
    import shutil

    from devtools.launcher import ServiceProcess, lan_address, self_signed_certificate

    cert, key = self_signed_certificate(tmp_path / "tls", lan_address())
    assert self_signed_certificate(tmp_path / "tls", lan_address()) == (cert, key)  # made once, then kept
    spec = next(s for s in SERVICES if s.name == "main-app")
    env = {"APP_SSL_CERTFILE": str(cert), "APP_SSL_KEYFILE": str(key), "APP_DATA_DIR": str(tmp_path / "data")}
    app = ServiceProcess(spec, free_port(), env=env, log_path=tmp_path / "main-app.log").start()
    try:
        assert app.url.startswith("https://")
        app.wait_healthy(timeout=60)
        if shutil.which("curl"):  # as a user would check it
            out = subprocess.run(["curl", "-sk", f"{app.url}/healthz"], capture_output=True, text=True, check=True)
            assert json.loads(out.stdout)["status"] == "ok"
        assert health_of(f"{app.url}/healthz") == 200
        assert health_of(app.url.replace("https://", "http://") + "/healthz") != 200  # TLS only
    finally:
        app.stop()
