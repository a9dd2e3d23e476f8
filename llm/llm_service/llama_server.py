"""llama.cpp's own server (`llama-server`), built from source and run as the LLM service's child process.

Why: it batches the generations of several conversations into one forward pass per token (continuous
batching over `--parallel` slots), and each slot keeps its conversation's prompt in its KV cache, so
several users share the model instead of queueing for it. The LLM service keeps its APIs, cancel and
health, and talks to it over its OpenAI-compatible API (`OpenAIBackend`).

    python -m llm_service.llama_server build [--portable] [--prefix DIR]

The sources are the llama.cpp vendored in the pinned `llama-cpp-python` sdist (`pip download`, checked
against its sha256; nothing else is fetched), built with the machine's cmake and C++ compiler.
The binary is cached per version and CPU (`~/.cache/voicechat/`), so a later clone reuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import httpx
from voice_common.backoff import Backoff

logger = logging.getLogger(__name__)

SDIST = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # no web UI: nothing to fetch, nothing to serve
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
]


def log(msg: str) -> None:
    print(f"[llama-server] {msg}", flush=True)


def _cpu_key() -> str:
    """Native builds use this CPU's instructions: a cache shared by machines must not mix them up."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


def default_binary(portable: bool = False) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voicechat"
    version = SDIST.split("==")[1]
    return cache / f"llama-server-{version}-{'portable' if portable else _cpu_key()}" / "llama-server"


def _fetch_sdist(into: Path) -> Path:
    """With pip, so the machine's index settings (mirrors, find-links) apply; checked by sha256."""
    log(f"downloading the sources ({SDIST} sdist, 77 MB, about a minute) ...")
    name = SDIST.split("==")[0]  # only this package as source: its build tools come as wheels
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name, "-d", str(into), SDIST]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"pip download failed:\n{done.stderr[-2000:]}")
    sdist = next(into.glob("llama_cpp_python-*.tar.gz"))
    digest = hashlib.sha256()
    with sdist.open("rb") as fh:
        while chunk := fh.read(4 << 20):
            digest.update(chunk)
    if digest.hexdigest() != SDIST_SHA256:
        raise RuntimeError(f"sha256 mismatch for {sdist.name}: got {digest.hexdigest()}, want {SDIST_SHA256}")
    return sdist


def _run(cmd: list[str], what: str) -> None:
    """Run a build step, showing cmake's own progress lines ([ 42%] ...) at most every few seconds."""
    log(f"{what} ...")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: deque[str] = deque(maxlen=40)
    last = 0.0
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip())
        if line.startswith("[") and "%]" in line[:7] and time.monotonic() - last > 5:
            log(f"  {line.strip()[:100]}")
            last = time.monotonic()
    if proc.wait():
        raise RuntimeError(f"{what} failed:\n" + "\n".join(tail))


def build(binary: Path, portable: bool = False, jobs: int | None = None) -> Path:
    """Build `llama-server` into `binary` unless it is there already (idempotent)."""
    if binary.exists():
        log(f"{binary} already built")
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: install cmake and a C++ compiler (Debian: cmake build-essential)")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="voicechat-llama-server-") as tmp:
        work = Path(tmp)
        with tarfile.open(_fetch_sdist(work)) as tar:
            tar.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        flags = [*CMAKE_FLAGS, f"-DGGML_NATIVE={'OFF' if portable else 'ON'}"]
        _run(["cmake", "-S", str(source), "-B", str(work / "build"), *flags], "configuring")
        jobs = jobs or os.cpu_count() or 1
        _run(
            ["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j", str(jobs)],
            f"compiling llama-server with {jobs} jobs (10-20 min on 2 cores, once)",
        )
        binary.parent.mkdir(parents=True, exist_ok=True)
        part = binary.with_name(binary.name + ".part")
        shutil.copy2(work / "build" / "bin" / "llama-server", part)
        os.replace(part, binary)
    log(f"built {binary} in {(time.monotonic() - t0) / 60:.1f} min")
    return binary


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when the LLM service dies, even by SIGKILL, so no
    llama-server is left holding a port and a GB of memory."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """The child process: started, health-checked, restarted with backoff when it dies, stopped with the
    service. Its output goes to this module's logger (DEBUG; the last lines at ERROR when it dies)."""

    def __init__(
        self,
        binary: Path,
        model: Path,
        alias: str,
        parallel: int,
        ctx_per_slot: int,
        threads: int,
        threads_batch: int | None = None,
        port: int = 0,
        cache_ram_mb: int = 64,
    ) -> None:
        if not binary.exists():
            raise FileNotFoundError(f"{binary} not found: run `make llama-server` (builds it once)")
        if not model.exists():
            raise FileNotFoundError(f"{model} not found: run `make models`")
        self.parallel = parallel
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            str(binary),
            *("--model", str(model), "--alias", alias),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--parallel", str(parallel), "--ctx-size", str(ctx_per_slot * parallel)),
            *("--threads", str(threads), "--threads-batch", str(threads_batch or threads)),
            "--cont-batching",
            # prompts of conversations that lost their slot, kept in RAM (llama.cpp's default is 8 GiB, and
            # it fills: memory grows with every new conversation until then)
            *("--cache-ram", str(cache_ram_mb)),
            *("--poll", "0"),  # its threads wait without spinning: the cores are shared with STT and TTS
            "--metrics",
            "--no-webui",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: deque[str] = deque(maxlen=30)
        self.closing = threading.Event()
        self.lock = threading.Lock()  # spawn vs stop: a restart never outlives the service
        self.ready = threading.Event()  # started and answering; cleared while it restarts
        self.restarts = 0
        self.backoff = Backoff(first=1.0, cap=30.0, reset_after_s=60.0)

    def start(self, timeout_s: float = 120) -> None:
        """Start and wait until the model is loaded; then keep watching it from a daemon thread."""
        self._spawn()
        self._wait_ready(timeout_s)
        threading.Thread(target=self._watch, name="llama-server-watch", daemon=True).start()

    def _spawn(self) -> None:
        with self.lock:
            if self.closing.is_set():
                raise RuntimeError("the LLM service is stopping")
            logger.info("starting %s", " ".join(self.cmd))
            self.proc = subprocess.Popen(
                self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        threading.Thread(target=self._drain, args=(self.proc,), name="llama-server-log", daemon=True).start()

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            logger.debug("%s", line)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n" + "\n".join(self.tail))
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.ready.set()
                    self.backoff.up()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"llama-server not ready after {timeout_s:.0f} s")

    def _watch(self) -> None:
        while not self.closing.is_set():
            assert self.proc is not None
            code = self.proc.wait()
            self.ready.clear()
            if self.closing.is_set():
                return
            delay = self.backoff.next()
            logger.error("llama-server exited with %s; restarting in %.0f s:\n%s", code, delay, "\n".join(self.tail))
            if self.closing.wait(delay):
                return
            self.restarts += 1
            try:
                self._spawn()
                self._wait_ready(120)
                logger.info("llama-server is back after %d restart(s)", self.restarts)
            except (RuntimeError, TimeoutError) as exc:
                logger.error("llama-server restart failed: %s", exc)

    def alive(self) -> bool:
        return self.ready.is_set() and self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        with self.lock:
            self.closing.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "path"])
    parser.add_argument("--portable", action="store_true", help="no -march=native (container images)")
    parser.add_argument("--prefix", type=Path, help="install as PREFIX/llama-server instead of the cache")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    args = parser.parse_args(argv)
    binary = args.prefix / "llama-server" if args.prefix else default_binary(args.portable)
    if args.command == "path":
        print(json.dumps({"binary": str(binary), "built": binary.exists()}))
        return 0
    try:
        build(binary, args.portable, args.jobs)
    except (RuntimeError, OSError) as exc:
        log(f"build failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
