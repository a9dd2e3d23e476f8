"""Fixtures for every test folder: real services started as processes on free ports."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.launcher import SERVICES, ServiceProcess
from tests.helpers import free_port

ARTIFACTS = Path(__file__).parent / "test-artifacts"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def start_service(artifacts: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """start_service("vad", VAD_THRESHOLD="0.6") -> a healthy process; one per (name, env) per session."""
    running: dict[tuple[str, tuple[tuple[str, str], ...]], ServiceProcess] = {}
    specs = {s.name: s for s in SERVICES}

    def start(name: str, **env: str) -> ServiceProcess:
        key = (name, tuple(sorted(env.items())))
        proc = running.get(key)
        if proc is None or proc.proc is None or proc.proc.poll() is not None:
            port = free_port()
            log = artifacts / f"{name}-{port}.log"
            proc = ServiceProcess(specs[name], port, env=dict(env), log_path=log).start()
            running[key] = proc
        proc.wait_healthy()
        return proc

    yield start
    for proc in running.values():
        proc.stop()


PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session: `initdb` and `pg_ctl` on a free port in a temp
    folder, as the `postgres` user when the tests run as root (PostgreSQL refuses to run as root)."""
    if PG_BIN is None or not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL binaries are not installed (`make setup` installs Debian's postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="voicechat-pg-"))  # in /tmp itself: the postgres user can reach it
    as_user: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    subprocess.run([*as_user, PG_BIN / "initdb", "-D", data, "-A", "trust", "-U", "voicechat"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([*as_user, PG_BIN / "pg_ctl", "-D", data, "-l", folder / "log", "-w", "-o", options, "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield f"postgresql://voicechat@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
