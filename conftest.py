"""Fixtures for every test folder: real services started as processes on free ports."""

from __future__ import annotations

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
