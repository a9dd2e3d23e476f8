"""A full stack of real services for main-app's tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.launcher import ServiceProcess


@dataclass
class Stack:
    services: dict[str, ServiceProcess]

    @property
    def app(self) -> ServiceProcess:
        return self.services["main-app"]

    @property
    def ws(self) -> str:
        return self.app.url.replace("http", "ws") + "/ws"


def make_stack(start_service: Callable[..., ServiceProcess], data_dir: Path, tag: str) -> Stack:
    """`tag` gives a stack its own service processes (so one test may kill them)."""
    services = {name: start_service(name, STACK=tag) for name in ("vad", "stt", "tts", "llm")}
    env = {f"APP_{name.upper()}_URL": proc.url for name, proc in services.items()}
    # greedy decoding: the tests check facts in replies ("Paris"), so keep them reproducible
    services["main-app"] = start_service(
        "main-app", APP_DATA_DIR=str(data_dir / tag), APP_TEMPERATURE="0", STACK=tag, **env
    )
    return Stack(services)


@pytest.fixture(scope="session")
def stack(start_service, tmp_path_factory) -> Stack:
    return make_stack(start_service, tmp_path_factory.mktemp("data"), "shared")
