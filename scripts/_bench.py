"""Shared bits of the benchmark scripts: start services on free ports, percentiles, progress."""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voice_common.settings import REPO_ROOT

from devtools.launcher import SERVICES, ServiceProcess
from tests.helpers import free_port


def say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def services(*names: str, **env: str) -> Iterator[dict[str, ServiceProcess]]:
    specs = {s.name: s for s in SERVICES}
    logs = REPO_ROOT / "data" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: dict[str, ServiceProcess] = {}
    try:
        for name in names:
            say(f"  starting {name} ...")
            procs[name] = ServiceProcess(specs[name], free_port(), env=dict(env), log_path=logs / f"{name}.log").start()
        for proc in procs.values():
            proc.wait_healthy()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
