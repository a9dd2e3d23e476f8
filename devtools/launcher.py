"""Dev tooling, not part of any service: start services as separate processes, wait for their health
checks, restart one that dies, stop them cleanly.

Used by `make run` (all five) and by the tests (real servers on real sockets).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from voice_common.backoff import Backoff
from voice_common.settings import REPO_ROOT


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    port: int
    env_prefix: str


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("vad", "vad_service", 3001, "VAD_"),
    ServiceSpec("stt", "stt_service", 3002, "STT_"),
    ServiceSpec("tts", "tts_service", 3003, "TTS_"),
    ServiceSpec("llm", "llm_service", 3004, "LLM_"),
    ServiceSpec("main-app", "main_app", 8000, "APP_"),
)


def health(url: str, timeout: float = 3.0) -> int:
    # our own services on this machine: a self-signed certificate is expected, not checked
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@dataclass
class ServiceProcess:
    spec: ServiceSpec
    port: int
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.env.get(f"{self.spec.env_prefix}SSL_CERTFILE") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        env = {**os.environ, f"{self.spec.env_prefix}PORT": str(self.port), **self.env}
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.spec.module], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT
        )
        return self

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} (log: {self.log_path})")
            if health(f"{self.url}/healthz") == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.spec.name} not healthy after {timeout:.0f} s (log: {self.log_path})")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Supervisor:
    """Keeps the services of `make run` up: one that exits is restarted with backoff (1 s doubling to 30 s,
    back to 1 s once it has stayed up a minute) while the others go on serving — main-app relinks to it
    by itself. SIGINT and SIGTERM stop everything: the handlers are installed explicitly, because a
    launcher started from a background shell inherits SIGINT as ignored."""

    def __init__(self, procs: list[ServiceProcess], logs: Path) -> None:
        self.procs = procs
        self.logs = logs
        self.stopping = False
        self.backoff = {p.spec.name: Backoff(first=1.0, cap=30.0, reset_after_s=60.0) for p in procs}
        for backoff in self.backoff.values():
            backoff.up()
        self.due: dict[str, float] = {}  # name -> when to restart it

    def install_signals(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    def watch(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            for p in self.procs:
                name = p.spec.name
                if p.proc is not None and p.proc.poll() is not None and name not in self.due:
                    delay = self.backoff[name].next()
                    self.due[name] = now + delay
                    print(
                        f"  {name} exited with {p.proc.returncode}; restarting in {delay:.0f} s "
                        f"(log: {self.logs / (name + '.log')})",
                        flush=True,
                    )
                elif name in self.due and now >= self.due[name]:
                    del self.due[name]
                    p.start()
                    self.backoff[name].up()
                    print(f"  {name} restarted (pid {p.proc.pid if p.proc else '?'})", flush=True)
            time.sleep(0.2)


def lan_address() -> str:
    """This machine's address on the LAN (the route to a private address; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            return str(sock.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def self_signed_certificate(folder: Path, address: str) -> tuple[Path, Path]:
    """A certificate for localhost and this machine's LAN address (made once, kept in `folder`), so a
    phone on the LAN gets a secure page (the microphone needs one) after accepting the warning once."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if cert.exists() and key.exists() and address in cert.with_suffix(".names").read_text():
        return cert, key
    folder.mkdir(parents=True, exist_ok=True)
    names = f"DNS:localhost,IP:127.0.0.1,IP:{address}"
    request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "825", "-subj", "/CN=voicechat"]
    files = ["-keyout", str(key), "-out", str(cert), "-addext", f"subjectAltName={names}"]
    subprocess.run([*request, *files], check=True, capture_output=True)
    cert.with_suffix(".names").write_text(names)
    return cert, key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run all five services on their default ports.")
    parser.add_argument("--logs", type=Path, default=REPO_ROOT / "data" / "logs")
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. vad,stt")
    parser.add_argument(
        "--https", action="store_true", help="main-app on the LAN over HTTPS, with a self-signed certificate"
    )
    args = parser.parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only.split(",")) if args.only else None
    ports = {s.name: int(os.environ.get(f"{s.env_prefix}PORT", s.port)) for s in SERVICES}
    # main-app finds the others where they were started, unless APP_<X>_URL says otherwise
    urls = {f"APP_{n.upper()}_URL": f"http://127.0.0.1:{p}" for n, p in ports.items() if n != "main-app"}
    app_env = {k: v for k, v in urls.items() if k not in os.environ}
    address = "localhost"
    if args.https:
        address = lan_address()
        cert, key = self_signed_certificate(REPO_ROOT / "data" / "tls", address)
        app_env |= {"APP_SSL_CERTFILE": str(cert), "APP_SSL_KEYFILE": str(key), "APP_HOST": "0.0.0.0"}
    procs = [
        ServiceProcess(
            s, ports[s.name], env=app_env if s.name == "main-app" else {}, log_path=args.logs / f"{s.name}.log"
        )
        for s in SERVICES
        if wanted is None or s.name in wanted
    ]
    supervisor = Supervisor(procs, args.logs)
    supervisor.install_signals()
    print(f"starting {', '.join(p.spec.name for p in procs)} (logs in {args.logs}) ...", flush=True)
    try:
        for p in procs:
            p.start()
        for p in procs:
            t0 = time.monotonic()
            while not supervisor.stopping:
                try:
                    p.wait_healthy(timeout=0.5)
                    break
                except TimeoutError:
                    if time.monotonic() - t0 > 180:
                        raise
            if supervisor.stopping:
                break
            pid = p.proc.pid if p.proc else "?"
            print(f"  {p.spec.name:9s} healthy on {p.url} (pid {pid}, {time.monotonic() - t0:.1f} s)", flush=True)
        else:
            print(
                f"\nAll services are up. Open {'https' if args.https else 'http'}://{address}:{ports['main-app']} "
                "in your browser."
                " Ctrl-C stops everything.\n",
                flush=True,
            )
            supervisor.watch()
        print("\nstopping ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", flush=True)
        return 1
    finally:
        for p in reversed(procs):
            p.stop()
        print("all services stopped", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
