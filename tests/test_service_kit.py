"""What every service gets from the shared kit, checked on all five real services."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets

from tests.helpers import librivox_clips

SERVICES = ["vad", "stt", "tts", "llm", "main-app"]


@pytest.mark.parametrize("name", SERVICES)
async def test_ops_endpoints_and_error_format(start_service, name: str) -> None:
    svc = start_service(name)
    async with httpx.AsyncClient(timeout=30) as http:
        health = await http.get(f"{svc.url}/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        info = (await http.get(f"{svc.url}/info")).json()
        assert info["service"] == name and info["ready"] is True and "version" in info and "device" in info
        metrics = await http.get(f"{svc.url}/metrics")
        assert metrics.status_code == 200 and "http_requests_total" in metrics.text
        assert metrics.headers["content-type"].startswith("text/plain")

        missing = await http.get(f"{svc.url}/no/such/route")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found" and missing.json()["error"]["message"]
        assert missing.headers["x-request-id"]

        big = b"x" * (26 * 1024 * 1024)  # over the default 25 MB
        r = await http.post(f"{svc.url}/no/such/route", content=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        async def chunked():  # no Content-Length: the limit is enforced while reading
            for _ in range(27):
                yield b"x" * (1024 * 1024)

        r = await http.post(f"{svc.url}/no/such/route", content=chunked())
        assert r.status_code in (404, 413)  # an unknown route may answer before reading the body
        assert "error" in r.json()

        wrong_method = await http.delete(f"{svc.url}/healthz")
        assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_oversized_upload_on_a_real_route(start_service) -> None:
    stt = start_service("stt", STT_MAX_BODY_MB="1")
    clip = librivox_clips()[0]
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{stt.url}/transcribe", files={"file": ("a.wav", clip.data * 8)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = await http.post(f"{stt.url}/transcribe", files={"file": ("a.wav", clip.data)})
        assert r.status_code == 200


async def test_api_key(start_service) -> None:
    vad = start_service("vad", VAD_API_KEY="s3cret")
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(f"{vad.url}/healthz")).status_code == 200  # stays open for probes
        app = start_service("main-app", APP_API_KEY="s3cret")  # its health names the services behind it
        open_health = await http.get(f"{app.url}/healthz")  # ... but shows no details without the key
        assert open_health.status_code == 200 and set(open_health.json()) == {"service", "status"}
        detailed = await http.get(f"{app.url}/healthz", headers={"X-API-Key": "s3cret"})
        assert "downstream" in detailed.json()
        for probe in ("/livez", "/readyz"):
            assert (await http.get(f"{vad.url}{probe}")).status_code == 200
        denied = await http.get(f"{vad.url}/info")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get(f"{vad.url}/info", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await http.get(f"{vad.url}/info", headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await http.get(f"{vad.url}/info", headers={"X-API-Key": "s3cret"})).status_code == 200
        # strange bytes in a key or a request id are a 401 / an ordinary request, never a 500
        odd = await http.get(f"{vad.url}/info", headers={b"X-API-Key": "s3crét".encode("latin-1")})
        assert odd.status_code == 401
        rid = await http.get(f"{vad.url}/healthz", headers={b"X-Request-ID": b"\xff\xfe-id"})
        assert rid.status_code == 200 and rid.headers["x-request-id"] == "-id"
    ws_url = vad.url.replace("http", "ws") + "/ws"
    async with websockets.connect(ws_url) as ws:  # no key: accepted, then closed with 1008
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008
    async with websockets.connect(ws_url, additional_headers={"X-API-Key": "s3cret"}) as ws:
        await ws.send(json.dumps({"type": "start"}))
        assert json.loads(await ws.recv())["type"] == "ready"
    async with websockets.connect(ws_url + "?api_key=s3cret") as ws:
        await ws.send(json.dumps({"type": "start"}))
        assert json.loads(await ws.recv())["type"] == "ready"


async def test_health_is_503_with_a_reason_until_the_model_loads(start_service, tmp_path) -> None:
    from devtools.launcher import SERVICES as SPECS
    from devtools.launcher import ServiceProcess, health

    from .helpers import free_port

    spec = next(s for s in SPECS if s.name == "stt")
    proc = ServiceProcess(spec, free_port(), env={"STT_MODEL_PATH": str(tmp_path / "missing")}).start()
    try:
        import asyncio

        for _ in range(100):
            if health(f"{proc.url}/healthz") == 503:
                break
            await asyncio.sleep(0.1)
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(100):
                body = (await http.get(f"{proc.url}/healthz")).json()
                if "failed" in body.get("reason", ""):
                    break
                await asyncio.sleep(0.1)
            assert body["status"] == "unavailable" and "model failed to load" in body["reason"]
            assert (await http.get(f"{proc.url}/livez")).status_code == 200  # alive: no restart loop
            assert (await http.get(f"{proc.url}/readyz")).status_code == 503  # but no traffic
            r = await http.post(f"{proc.url}/transcribe", files={"file": ("a.wav", librivox_clips()[1].data)})
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            assert r.headers["retry-after"]
    finally:
        proc.stop()


STREAM_SERVICES = {"vad": "VAD", "stt": "STT", "tts": "TTS", "llm": "LLM"}
MISSING_MODEL = {"vad": "VAD_MODEL_PATH", "stt": "STT_MODEL_PATH", "tts": "TTS_VOICES_DIR", "llm": "LLM_MODEL_PATH"}


async def refused(url: str) -> tuple[dict, int | None]:
    """Connect to a stream socket that should refuse: its one event, and the close code."""
    async with websockets.connect(url) as ws:
        event = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        return event, ws.close_code


@pytest.mark.parametrize("name", list(STREAM_SERVICES))
async def test_every_stream_socket_refuses_the_same_way_at_its_limit(start_service, name: str) -> None:
    svc = start_service(name, **{f"{STREAM_SERVICES[name]}_MAX_STREAMS": "2"})
    url = svc.url.replace("http", "ws") + "/ws"
    async with websockets.connect(url), websockets.connect(url):
        event, code = await refused(url)
    assert event["type"] == "error" and event["code"] == "too_many_streams" and event["fatal"]
    assert event["service"] == name and code == 1013
    async with websockets.connect(url) as ws:  # the streams above are closed: there is room again
        await ws.send(json.dumps({"type": "nope"}))
        assert json.loads(await ws.recv())["code"] == "bad_event"


@pytest.mark.parametrize("name", list(STREAM_SERVICES))
async def test_every_stream_socket_refuses_the_same_way_without_its_model(name: str, tmp_path) -> None:
    import asyncio

    from devtools.launcher import SERVICES as SPECS
    from devtools.launcher import ServiceProcess, health

    from .helpers import free_port

    spec = next(s for s in SPECS if s.name == name)
    proc = ServiceProcess(spec, free_port(), env={MISSING_MODEL[name]: str(tmp_path / "missing")}).start()
    try:
        for _ in range(300):
            if health(f"{proc.url}/healthz") == 503:
                break
            await asyncio.sleep(0.1)
        event, code = await refused(proc.url.replace("http", "ws") + "/ws")
    finally:
        proc.stop()
    assert event["code"] == "not_ready" and event["fatal"] and event["service"] == name and code == 1013
