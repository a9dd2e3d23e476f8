"""The Kubernetes manifests, checked statically (no cluster here): every object validates strictly
against the Kubernetes schemas (kubernetes-validate), the overlays render with kustomize (kubectl's,
where installed), and what a deployment relies on is there: probes on the right endpoints, resources,
non-root, keys from a Secret, replicas, autoscaling, network policies, WebSocket-friendly Ingress."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from voice_common.settings import REPO_ROOT

from devtools.launcher import SERVICES

K8S = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"
PORTS = {s.name: s.port for s in SERVICES}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def rendered(overlay: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its kustomize) is not installed: the overlays are rendered where it is")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_every_object_validates_strictly(path: Path) -> None:
    for doc in documents(path):
        if doc.get("kind") == "Kustomization":
            assert all((path.parent / r).exists() for r in doc.get("resources", [])), path
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_rendered_overlays_validate_strictly(overlay: str) -> None:
    objects = rendered(overlay)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert set(by_kind(objects, "Deployment")) == set(PORTS)


def test_every_service_is_deployed_the_way_it_is_run() -> None:
    objects = rendered("base")
    deployments, services = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    for name, port in PORTS.items():
        pod = deployments[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["ports"][0]["containerPort"] == port and services[name]["spec"]["ports"][0]["port"] == port
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # traffic only once the model is in
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"  # a slow model load is no restart
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) <= set(container["resources"]["limits"])
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["image"] == f"voicechat-{name}:0.1.0"
        env = env_of(container)
        assert env[f"{next(s.env_prefix for s in SERVICES if s.name == name)}HOST"] == "0.0.0.0"
        key = "APP_DOWNSTREAM_API_KEY" if name == "main-app" else f"{name.upper()}_API_KEY"
        assert env[key]["secretKeyRef"]["name"] == "voicechat-keys"  # keys from a Secret, never a ConfigMap
    app = deployments["main-app"]
    assert app["spec"]["replicas"] >= 2
    assert env_of(app["spec"]["template"]["spec"]["containers"][0])["APP_DATABASE_URL"]["secretKeyRef"]
    config = by_kind(objects, "ConfigMap")["voicechat-config"]["data"]
    assert {config[f"APP_{n.upper()}_URL"] for n in ("vad", "stt", "tts", "llm")} == {
        f"http://{n}:{PORTS[n]}" for n in ("vad", "stt", "tts", "llm")
    }
    assert {h["spec"]["scaleTargetRef"]["name"] for h in by_kind(objects, "HorizontalPodAutoscaler").values()} == {
        "stt",
        "tts",
    }
    guarded = by_kind(objects, "NetworkPolicy")["services-from-main-app-only"]["spec"]
    assert set(guarded["podSelector"]["matchExpressions"][0]["values"]) == {"vad", "stt", "tts", "llm", "postgres"}
    assert guarded["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "main-app"}}}]}]
    notes = by_kind(objects, "Ingress")["voicechat"]["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600  # a session is one long WebSocket
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # streamed replies (SSE)


def test_gpu_overlay_runs_the_llm_on_ollama_and_stt_tts_on_cuda() -> None:
    objects = rendered("overlays/gpu")
    ollama = by_kind(objects, "StatefulSet")["ollama"]
    (container,) = ollama["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and ollama["spec"]["volumeClaimTemplates"]
    assert container["image"] == "ollama/ollama:0.12.10"
    config = by_kind(objects, "ConfigMap")["voicechat-config"]["data"]
    assert config["LLM_BACKEND"] == "ollama" and config["OLLAMA_BASE_URL"] == "http://ollama:11434"
    assert config["STT_DEVICE"] == config["TTS_DEVICE"] == "cuda"
    deployments = by_kind(objects, "Deployment")
    for name in ("stt", "tts"):
        (c,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert c["image"] == f"voicechat-{name}-cuda:0.1.0" and c["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_settings_images_and_commands_match_the_code(overlay: str) -> None:
    """Every variable the manifests set is a real setting (.env.example lists them all, generated from the
    settings classes); the containers run their Dockerfile's CMD on its EXPOSEd port."""
    from tests.test_deployment import ENV_NAMES, dockerfile

    objects = rendered(overlay)
    names = set(by_kind(objects, "ConfigMap")["voicechat-config"]["data"])
    for name, deployment in by_kind(objects, "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        names |= set(env_of(container))
        assert "command" not in container and "args" not in container  # the image's CMD
        assert f"EXPOSE {container['ports'][0]['containerPort']}\n" in dockerfile(name)
    assert names <= ENV_NAMES, names - ENV_NAMES
