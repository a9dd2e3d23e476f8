"""The browser client in headless Chromium (Debian's), against the five real services.

The microphone is a WAV file (Chromium's fake capture device), so the whole path runs for real:
getUserMedia -> AudioWorklet -> 16 kHz PCM16 -> main-app -> ... -> reply audio -> playback worklet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from playwright.async_api import Browser, Page, async_playwright
from voice_common.audio import load_mono

from tests.helpers import librivox_clips, wer

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by `make setup`")
CLIP = librivox_clips()[4]


@pytest.fixture(scope="module")
def stack(start_service, tmp_path_factory):
    services = {name: start_service(name) for name in ("vad", "stt", "tts", "llm")}
    env = {f"APP_{name.upper()}_URL": proc.url for name, proc in services.items()}
    return start_service("main-app", APP_DATA_DIR=str(tmp_path_factory.mktemp("web-data")), APP_TEMPERATURE="0", **env)


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory) -> Path:
    samples, _ = load_mono(CLIP.data, 48000)
    path = tmp_path_factory.mktemp("mic") / "mic.wav"
    sf.write(path, np.concatenate([np.zeros(48000), samples, np.zeros(48000 * 20)]), 48000, subtype="PCM_16")
    return path


@asynccontextmanager
async def chromium(mic_wav: Path, *extra: str) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--autoplay-policy=no-user-gesture-required",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={mic_wav}",
                *extra,
            ],
        )
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def browser(mic_wav: Path) -> AsyncIterator[Browser]:
    async with chromium(mic_wav) as b:
        yield b


async def open_page(browser: Browser, url: str, width: int = 1280, height: int = 800) -> Page:
    page = await browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(url)
    await page.wait_for_function("window.voicechat && window.voicechat.connected", timeout=15000)
    return page


async def test_speak_into_the_mic_and_hear_a_reply(stack, browser, artifacts) -> None:
    page = await open_page(browser, stack.url)
    await page.click("#talk")
    await page.wait_for_selector(".msg.user:not(.interim)", timeout=30000)
    heard = await page.inner_text(".msg.user")
    assert wer(CLIP.text, heard) < 0.25, heard
    await page.wait_for_function("window.voicechat.stats.replies > 0", timeout=60000)
    assert (await page.inner_text(".msg.assistant")).strip()
    await page.wait_for_function("window.voicechat.stats.playedSamples > 22050 * 0.5", timeout=20000)
    stats = await page.evaluate("window.voicechat.stats")
    assert stats["audioBytes"] > 22050  # reply audio arrived and the playback worklet played it
    assert "first audio" in await page.inner_text("#latency")
    await page.screenshot(path=str(artifacts / "web-desktop.png"))
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.wait_for_timeout(500)  # the sidebar slides away on narrow screens
    await page.screenshot(path=str(artifacts / "web-phone.png"))
    assert not page.errors  # type: ignore[attr-defined]


async def test_type_a_message(stack, browser) -> None:
    page = await open_page(browser, stack.url)
    await page.uncheck("#speak")
    await page.fill("#message", "What is the capital of France? <b>one</b> sentence")
    await page.click("#send")
    await page.wait_for_function("window.voicechat.stats.replies > 0", timeout=60000)
    assert "paris" in (await page.inner_text(".msg.assistant")).lower()
    assert await page.locator(".msg.user b").count() == 0  # typed HTML is shown as text, never injected
    assert "<b>one</b>" in await page.inner_text(".msg.user")


async def test_resume_a_conversation_from_the_list(stack, browser) -> None:
    page = await open_page(browser, stack.url)
    await page.uncheck("#speak")
    await page.fill("#message", "Remember the word pineapple. Reply with OK.")
    await page.click("#send")
    await page.wait_for_function("window.voicechat.stats.replies > 0", timeout=60000)
    cid = await page.evaluate("window.voicechat.conversationId")
    await page.click("#new-conversation")
    await page.wait_for_function(f"window.voicechat.connected && window.voicechat.conversationId !== '{cid}'")
    assert await page.locator(".msg").count() == 0
    await page.click(f"#conversation-list button.open[data-id='{cid}']")
    await page.wait_for_function(f"window.voicechat.connected && window.voicechat.conversationId === '{cid}'")
    await page.wait_for_selector(".msg.assistant")
    texts = await page.locator(".msg").all_inner_texts()
    assert texts[0].startswith("Remember the word pineapple") and len(texts) == 2
    await page.fill("#message", "Thanks.")
    await page.click("#send")
    await page.wait_for_function("window.voicechat.stats.replies > 1", timeout=60000)
    import httpx

    # the conversation is this browser's: without its owner cookie the id finds nothing
    secret = next(c["value"] for c in await page.context.cookies() if c["name"] == "voicechat_owner")
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{stack.url}/conversations/{cid}")).status_code == 404
        mine = {"X-Owner-Token": secret}
        stored = (await http.get(f"{stack.url}/conversations/{cid}", headers=mine)).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]
    await page.click(f"#conversation-list button.delete[data-id='{cid}']")
    await page.wait_for_function(f"window.voicechat.conversationId !== '{cid}'")
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{stack.url}/conversations/{cid}", headers=mine)).status_code == 404


async def test_accessible_with_keyboard_and_screen_reader(stack, browser) -> None:
    """axe-core finds nothing serious; every control is reachable with Tab; a reply streams into a
    `log` that is busy until the reply is complete; toggles say whether they are on; Esc stops a reply."""
    from axe_playwright_python.async_playwright import Axe

    page = await open_page(browser, stack.url)
    results = await Axe().run(page)
    serious = [v["id"] for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
    assert not serious, results.generate_report()

    reached = []
    for _ in range(20):
        await page.keyboard.press("Tab")
        reached.append(await page.evaluate("document.activeElement.id || document.activeElement.className"))
    for control in ("new-conversation", "theme", "talk", "ptt", "speak", "voice", "mic", "message", "send"):
        assert control in reached, (control, reached)

    assert await page.get_attribute("#theme", "aria-pressed") in ("true", "false")
    before = await page.get_attribute("#theme", "aria-pressed")
    await page.focus("#theme")
    await page.keyboard.press("Enter")
    assert await page.get_attribute("#theme", "aria-pressed") != before
    assert await page.get_attribute("#transcript", "role") == "log"
    assert await page.get_attribute("#banner", "role") == "alert"

    # a spoken reply: the log is busy while it streams, Stop is shown, and Esc stops it
    await page.focus("#message")
    await page.keyboard.type("Count from one to forty in words, slowly.")
    await page.keyboard.press("Enter")
    await page.wait_for_function("window.voicechat.audioTurn != null", timeout=60000)
    assert await page.is_visible("#stop")
    assert await page.get_attribute("#transcript", "aria-busy") == "true"
    await page.keyboard.press("Escape")
    await page.wait_for_selector(".msg.assistant.interrupted", timeout=10000)
    assert not await page.is_visible("#stop")
    assert await page.get_attribute("#transcript", "aria-busy") == "false"

    # the microphone picker lists the (fake) device once the microphone is allowed
    await page.click("#talk")
    await page.wait_for_function("document.querySelectorAll('#mic option').length > 1", timeout=10000)
    await page.emulate_media(reduced_motion="reduce")
    await page.evaluate("document.querySelector('#talk').classList.add('listening')")
    assert await page.evaluate("getComputedStyle(document.querySelector('#talk')).animationName") == "none"
    assert not page.errors  # type: ignore[attr-defined]


async def test_an_insecure_page_says_why_the_microphone_is_off(stack, mic_wav) -> None:
    """From another computer over plain http the browser withholds the microphone: the page says what to
    do instead of failing silently. (`lan.test` is resolved to this machine: an origin that is not
    localhost and not https, as http://192.168.x.y:8000 is.)"""
    async with chromium(mic_wav, "--host-resolver-rules=MAP lan.test 127.0.0.1") as b:
        page = await b.new_page()
        await page.goto(stack.url.replace("127.0.0.1", "lan.test"))
        await page.wait_for_function("window.voicechat && window.voicechat.connected", timeout=15000)
        assert not await page.evaluate("window.isSecureContext")
        notice = await page.inner_text("#notice")
        assert "secure page" in notice and "HTTPS=1" in notice and await page.is_disabled("#talk")
        await page.fill("#message", "Say OK.")  # typing still works
        await page.click("#send")
        await page.wait_for_function("window.voicechat.stats.replies > 0", timeout=60000)
