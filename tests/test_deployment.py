"""Compose files and Dockerfiles checked against the code (no Docker engine runs here), and each
service started exactly the way its Dockerfile's CMD starts it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from llm_service.llama_server import default_binary
from llm_service.settings import LlmSettings
from main_app.settings import AppSettings
from pydantic_settings import BaseSettings
from stt_service.settings import SttSettings
from tts_service.settings import TtsSettings
from vad_service.settings import VadSettings
from voice_common.settings import REPO_ROOT

from devtools.launcher import SERVICES, ServiceProcess
from tests.helpers import free_port

SETTINGS: dict[str, type[BaseSettings]] = {
    "vad": VadSettings,
    "stt": SttSettings,
    "tts": TtsSettings,
    "llm": LlmSettings,
    "main-app": AppSettings,
}
PACKAGES = {s.name: s.module for s in SERVICES}
COMPOSE_FILES = sorted(REPO_ROOT.glob("docker-compose*.yml"))
ENV_EXAMPLE = (REPO_ROOT / ".env.example").read_text()
ENV_NAMES = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE, re.M))


def dockerfile(service: str) -> str:
    return (REPO_ROOT / service / "Dockerfile").read_text()


def default_port(service: str) -> int:
    return int(SETTINGS[service].model_fields["port"].default)


def dockerfile_env(text: str) -> dict[str, str]:
    """ENV instructions of the final stage (continuation lines joined)."""
    final = text.split("\nFROM ")[-1].replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_compose_files_parse_and_every_built_service_has_a_dockerfile() -> None:
    assert {p.name for p in COMPOSE_FILES} >= {
        "docker-compose.yml",
        "docker-compose.cpu-host.yml",
        "docker-compose.gpu-host.yml",
    }
    for path in COMPOSE_FILES:
        compose = yaml.safe_load(path.read_text())
        for name, svc in compose["services"].items():
            if "build" in svc:
                assert (REPO_ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).exists(), (path, name)
                assert svc["build"]["dockerfile"] == f"{name}/Dockerfile"
    main = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert set(SETTINGS) <= set(main) and "gpu" in main["ollama"]["profiles"]
    assert main["ollama"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for dep in ("vad", "stt", "tts", "llm"):
        assert main["main-app"]["depends_on"][dep]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", list(SETTINGS))
def test_ports_health_urls_and_cmd_match_the_code(service: str) -> None:
    port = default_port(service)
    text = dockerfile(service)
    assert f"EXPOSE {port}\n" in text
    assert f"http://127.0.0.1:{port}/readyz" in text  # ready, not just alive: 503 while the model loads
    assert f'CMD ["python", "-m", "{PACKAGES[service]}"]' in text
    prefix = str(SETTINGS[service].model_config["env_prefix"])
    assert dockerfile_env(text)[f"{prefix}PORT"] == str(port)
    assert "USER app" in text and text.count("FROM ") == 2  # non-root, multi-stage
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"][service]
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(compose["healthcheck"]["test"])
    assert compose["environment"][f"{prefix}PORT"] == str(port)
    urls = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["main-app"]["environment"]
    if service != "main-app":
        assert urls[f"APP_{service.upper()}_URL"] == f"http://{service}:{port}"


def test_images_are_pinned_and_build_contexts_lean() -> None:
    for path in COMPOSE_FILES:
        for name, svc in yaml.safe_load(path.read_text())["services"].items():
            if "build" not in svc:  # pulled, not built: a fixed version, never `latest`
                assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+", svc["image"]), (path.name, name, svc["image"])
    for service in SETTINGS:
        for base in re.findall(r"^FROM (\S+)", dockerfile(service), re.M):
            assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), (service, base)
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "models", "data", "test-artifacts"} <= {line.strip("/") for line in ignored}


def test_every_compose_variable_is_in_env_example() -> None:
    for path in COMPOSE_FILES:
        for var in re.findall(r"\$\{([A-Z][A-Z0-9_]*)", path.read_text()):
            assert var in ENV_NAMES, f"{path.name} uses ${{{var}}}, missing from .env.example"


def test_every_setting_is_in_env_example_with_its_default() -> None:
    r = subprocess.run([sys.executable, "scripts/gen_env_example.py", "--check"], cwd=REPO_ROOT, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    for cls in SETTINGS.values():
        prefix = str(cls.model_config["env_prefix"])
        for field, info in cls.model_fields.items():
            name = info.validation_alias if isinstance(info.validation_alias, str) else f"{prefix}{field}".upper()
            assert name in ENV_NAMES, name
            if isinstance(info.default, int | float | str) and not isinstance(info.default, bool):
                line = re.search(rf"^{name}=(.*)$", ENV_EXAMPLE, re.M)
                assert line and line.group(1).strip('"') == str(info.default), name


@pytest.mark.parametrize("service", list(SETTINGS))
def test_every_file_a_dockerfile_copies_exists(service: str) -> None:
    for line in dockerfile(service).splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
            for src in sources:
                assert (REPO_ROOT / src).exists(), f"{service}/Dockerfile copies {src}"
    reqs = re.findall(r"--only (\w+)", dockerfile(service))
    assert reqs == [service if service != "main-app" else "none"]


@pytest.mark.parametrize("service", list(SETTINGS))
def test_service_runs_as_its_dockerfile_cmd(service: str, tmp_path: Path) -> None:
    """Same module and same ENV as the image; only paths that exist inside the image are mapped to
    their places in this checkout, and the port is a free one."""
    env = dockerfile_env(dockerfile(service))
    prefix = str(SETTINGS[service].model_config["env_prefix"])
    env.pop("PATH", None)
    env["MODELS_DIR"] = str(REPO_ROOT / "models")
    if service == "main-app":
        env["APP_WEB_DIR"] = str(REPO_ROOT / "web")
        env["APP_DATA_DIR"] = str(tmp_path)
    if service == "llm":  # the image builds llama-server into /opt; here it is the one `make` built
        assert env["LLM_SERVER_BINARY"] == "/opt/llama-server/llama-server"
        env["LLM_SERVER_BINARY"] = str(default_binary())
    env[f"{prefix}PORT"] = str(free_port())
    spec = next(s for s in SERVICES if s.name == service)
    proc = ServiceProcess(spec, int(env[f"{prefix}PORT"]), env=env, log_path=tmp_path / "log").start()
    try:
        proc.wait_healthy(120)
    finally:
        proc.stop()
