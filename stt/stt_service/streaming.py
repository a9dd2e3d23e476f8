"""WebSocket streaming: interim transcripts while the user speaks, a fast final after stop.

Why the final is fast:
- while audio arrives, the growing buffer is re-decoded at most every `interim_interval_ms`;
- once the uncommitted audio is longer than `commit_after_s`, segments that ended well before the live
  edge are committed (text kept, audio dropped), so no decode ever covers more than a few seconds;
- at stop, if the latest interim decode (finished or still running) already covers everything but a
  silent tail (the VAD's hangover), it *is* the final: no new decode at all. Otherwise only the short
  uncommitted tail is decoded, with the committed text as prompt;
- to make that likely, a decode is started as soon as the audio has gone quiet for `EAGER_SILENCE_MS`
  (the user has probably stopped; the VAD will only say so after its hangover), without waiting for
  the interim interval.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from fastapi import WebSocket
from prometheus_client import Histogram
from voice_common.audio import AudioError, AudioFormat, StreamResampler, pcm_to_mono_float
from voice_common.errors import ApiError
from voice_common.limits import BACKGROUND, URGENT, Limiter
from voice_common.protocol import (
    Cancel,
    Cancelled,
    Final,
    Interim,
    Segment,
    SttClientEvent,
    SttReady,
    SttStart,
    stt_client_events,
)
from voice_common.streams import StreamHandler

from .engine import RATE, Seg, Superseded, Transcriber, Transcript, check_language

if TYPE_CHECKING:
    from .settings import SttSettings

logger = logging.getLogger(__name__)
SERVICE = "stt"
SILENT_RMS = 0.01  # -40 dBFS: a tail this quiet adds no words
EAGER_SILENCE_MS = 60
EAGER = 1.0  # scheduling priority (voice_common.limits): after finals, before interims
MAX_SUPERSEDED = 2  # in a row: then a running decode is let finish, so a long utterance still shows words


@dataclass
class Hypothesis:
    """An interim decode: the segments it found after `offset` (the committed samples when it ended)
    and how far (absolute samples) it looked. Only a hypothesis whose offset is still the utterance's
    may be shown or reused: an older one repeats text that has been committed since."""

    offset: int
    covered: int
    segments: list[Segment]
    language: str


@dataclass
class Utterance:
    id: int
    fmt: AudioFormat
    language: str | None
    prompt: str | None
    interim: bool
    resampler: StreamResampler
    chunks: list[np.ndarray] = field(default_factory=list)
    offset: int = 0  # committed samples (dropped from `chunks`)
    committed: list[Segment] = field(default_factory=list)
    last_decode: float = 0.0  # monotonic start of the latest interim decode
    last_decode_s: float = 0.0  # how long the latest decode took
    # interim decodes in flight (in the order they started), each with the event that stops it
    decodes: dict[asyncio.Task[None], threading.Event] = field(default_factory=dict)
    superseded: int = 0  # decodes stopped since the last one that finished
    hypothesis: Hypothesis | None = None
    # the decode from `offset` that covered the most audio: the next decode's draft (Transcriber.transcribe)
    draft: Transcript | None = None
    closed: bool = False
    quiet_ms: float = 0.0  # trailing quiet audio
    eager_pending: bool = False  # quiet after speech and not decoded since

    def stop_decodes(self, keep: asyncio.Task[None] | None = None) -> None:
        """Ask the decodes under way (but `keep`) to give up: a newer one or nothing will use them."""
        for task, stop in self.decodes.items():
            if task is not keep:
                stop.set()

    def remember(self, offset: int, result: Transcript) -> None:
        """Keep the decode from the current offset that covered the most audio: the next one's draft."""
        if offset == self.offset and (self.draft is None or result.duration >= self.draft.duration):
            self.draft = result

    def audio(self) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0] if self.chunks else np.zeros(0, dtype=np.float32)

    @property
    def total(self) -> int:
        return self.offset + sum(len(c) for c in self.chunks)

    def commit(self, upto: int, segments: list[Segment]) -> None:
        self.chunks = [self.audio()[upto:]]
        self.offset += upto
        self.committed.extend(segments)
        self.draft = None  # its segments start before the new offset

    def prompt_text(self) -> str | None:
        parts = [p for p in (self.prompt, *(s.text for s in self.committed)) if p]
        return " ".join(parts) or None

    def silent_after(self, absolute: int) -> bool:
        tail = self.audio()[max(0, absolute - self.offset) :]
        if tail.size == 0:
            return True
        frames = tail[: len(tail) // 320 * 320].reshape(-1, 320)
        return frames.size == 0 or float(np.sqrt((frames**2).mean(axis=1)).max()) < SILENT_RMS

    def text(self, segments: list[Segment]) -> str:
        return " ".join(s.text for s in [*self.committed, *segments] if s.text).strip()


def _segments(result_segments: list[Seg], offset: int) -> list[Segment]:
    base = offset * 1000 / RATE
    return [
        Segment(start_ms=round(base + s.start * 1000), end_ms=round(base + s.end * 1000), text=s.text)
        for s in result_segments
        if s.text
    ]


class SttStream(StreamHandler[SttClientEvent]):
    """One connection, any number of utterances. Decodes run as tasks of the connection, so a `cancel`
    is answered at once even while a final decode is running (its result is dropped)."""

    service = SERVICE
    events = stt_client_events

    def __init__(
        self,
        socket: WebSocket,
        engine: Transcriber,
        settings: SttSettings,
        limiter: Limiter,
        decode_seconds: Histogram,
    ) -> None:
        super().__init__(socket)
        self.engine = engine
        self.settings = settings
        self.limiter = limiter
        self.decode_seconds = decode_seconds
        self.counter = 0
        self.utt: Utterance | None = None
        self.finals: dict[int, asyncio.Task[None]] = {}

    async def on_event(self, event: SttClientEvent) -> None:
        if isinstance(event, SttStart):
            await self.start(event)
        elif isinstance(event, Cancel):
            cancelled = [u.id for u in (self.utt,) if u is not None] + list(self.finals)
            if self.utt is not None:
                self.utt.closed = True
                self.utt.stop_decodes()
                self.utt = None
            for task in self.finals.values():
                task.cancel()
            self.finals.clear()
            await self.send(Cancelled(utterance=max(cancelled) if cancelled else None))
        else:  # stop
            current, self.utt = self.utt, None
            if current is None or current.total == 0:
                await self.error("empty_utterance", "stop without audio in a started utterance")
                return
            current.closed = True
            task = self.spawn(self.final(current))
            self.finals[current.id] = task
            task.add_done_callback(lambda _: self.finals.pop(current.id, None))

    async def start(self, event: SttStart) -> None:
        try:
            event.format.check()
            language = check_language(event.language or self.settings.language, self.engine)
        except AudioError as exc:
            await self.error("unsupported_format", str(exc))
            return
        except ApiError as exc:
            await self.error(exc.code, exc.message)
            return
        if self.utt is not None:
            self.utt.closed = True
            self.utt.stop_decodes()
        self.counter += 1
        self.utt = Utterance(
            self.counter, event.format, language, event.prompt, event.interim, StreamResampler(event.format.rate, RATE)
        )
        await self.send(SttReady(utterance=self.counter))

    async def on_audio(self, frame: bytes) -> None:
        u = self.utt
        if u is None:
            await self.error("no_utterance", "send a start event before audio frames")
            return
        try:
            samples = u.resampler(pcm_to_mono_float(frame, u.fmt))
        except AudioError as exc:
            await self.error("invalid_audio", str(exc))
            return
        if (u.total + len(samples)) / RATE > self.settings.max_audio_s:
            await self.error("audio_too_long", f"utterance over {self.settings.max_audio_s:.0f} s")
            return
        u.chunks.append(samples)
        if samples.size and float(np.sqrt(np.mean(samples**2))) >= SILENT_RMS:
            u.quiet_ms, u.eager_pending = 0.0, False
        else:
            before = u.quiet_ms
            u.quiet_ms += len(samples) * 1000 / RATE
            if before < EAGER_SILENCE_MS <= u.quiet_ms:
                u.eager_pending = True
        now = time.monotonic()
        u.decodes = {d: stop for d, stop in u.decodes.items() if not d.done()}
        idle = not u.decodes
        # on a slow machine a decode takes longer than the interval: space interims by twice the last
        # decode's time, so they never take more than half of the CPU the eager decode and final need
        interval = max(self.settings.interim_interval_ms / 1000, 2 * u.last_decode_s)
        # a regular interim only shows words early: it runs when no other decode does, so under load the
        # cores go to finals and eager decodes (which a reply waits for), not to other streams' interims
        regular = u.interim and idle and now - u.last_decode >= interval and self.limiter.active == 0
        # the eager decode does not wait for a running interim: it is the one the final will likely reuse
        if (regular or u.eager_pending) and u.total - u.offset >= RATE // 4 and self.limiter.free_now():
            if u.eager_pending:
                logger.debug("utterance %d: eager decode at %.0f ms (quiet %.0f ms)", u.id, u.total / 16, u.quiet_ms)
            eager, u.last_decode, u.eager_pending = u.eager_pending, now, False
            if eager and u.decodes and u.superseded < MAX_SUPERSEDED:
                # the decodes under way cover less of the same audio: on two cores they would halve the
                # speed of this one, the likely final (a 6 s utterance: ~0.8 s instead of ~0.4 s)
                u.stop_decodes()
                u.superseded += 1
            stop = threading.Event()
            u.decodes[self.spawn(self.interim(u, eager, stop))] = stop

    async def decode(self, u: Utterance, kind: str, priority: float, stop: threading.Event | None = None) -> Hypothesis:
        audio, offset = u.audio().copy(), u.offset
        # timestamps are only needed to commit segments of long utterances; short ones decode faster without
        timestamps = len(audio) / RATE >= self.settings.commit_after_s
        r = await self.limiter.run_in_thread(
            self.engine.transcribe,
            audio,
            language=u.language,
            prompt=u.prompt_text(),
            temperature=0.0,
            timestamps=timestamps,
            stop=stop,
            draft=u.draft,
            priority=priority,
        )
        u.remember(offset, r)
        self.decode_seconds.labels(kind).observe(r.processing_ms / 1000)
        u.last_decode_s = r.processing_ms / 1000
        logger.debug(
            "utterance %d: %s decode of %.0f ms audio took %.0f ms", u.id, kind, len(audio) / 16, r.processing_ms
        )
        segments = _segments(r.segments, offset)
        length = len(audio) / RATE
        # commits only while the utterance is open (offset unchanged), so a final never sees one happen
        commit = kind == "interim" and not u.closed and offset == u.offset
        if commit and length >= self.settings.commit_after_s and len(r.segments) >= 2:
            stable = [s for s in r.segments[:-1] if s.end <= length - 1.0]
            if stable:
                u.commit(int(stable[-1].end * RATE), segments[: len(stable)])
                segments = segments[len(stable) :]
                return Hypothesis(u.offset, offset + len(audio), segments, r.language)
        return Hypothesis(offset, offset + len(audio), segments, r.language)

    async def interim(self, u: Utterance, eager: bool = False, stop: threading.Event | None = None) -> None:
        """Decode what has arrived; the newest result is kept as `u.hypothesis` for the final to reuse.
        An eager decode (at the first quiet) is announced even without interims: it is the likely final,
        so a client may start its reply on it."""
        try:
            # the eager decode is the likely final: it goes before other streams' interims
            hyp = await self.decode(u, "interim", EAGER if eager else BACKGROUND, stop)
        except Superseded:
            logger.debug("utterance %d: a decode was superseded by a newer eager one", u.id)
            return
        except ApiError:
            return
        u.superseded = 0
        if hyp.offset != u.offset:
            return  # a decode that finished later committed text this one repeats
        if u.hypothesis is None or u.hypothesis.offset != u.offset or hyp.covered >= u.hypothesis.covered:
            u.hypothesis = hyp
        if (u.interim or eager) and not u.closed:
            text = u.text(hyp.segments)
            await self.send(Interim(utterance=u.id, text=text, audio_ms=round(hyp.covered / 16), eager=eager))

    async def final(self, u: Utterance) -> None:
        t0 = time.perf_counter()
        hyp = None
        latest = next(reversed(u.decodes), None)
        if latest is not None and not latest.done():
            # the latest decode is under way: it usually covers all but the VAD's hangover; older ones are stale
            u.stop_decodes(keep=latest)
            await asyncio.shield(latest)
        h = u.hypothesis
        if h is not None and h.offset == u.offset and u.silent_after(h.covered):
            hyp = h
            logger.debug("utterance %d: reused the decode up to %d of %d samples", u.id, hyp.covered, u.total)
        else:
            logger.debug(
                "utterance %d: final decode needed (hypothesis up to %s of %d samples)",
                u.id,
                u.hypothesis.covered if u.hypothesis else None,
                u.total,
            )
            try:
                hyp = await self.decode(u, "final", URGENT)
            except ApiError as exc:
                await self.error(exc.code, exc.message)
                return
        await self.send(
            Final(
                utterance=u.id,
                text=u.text(hyp.segments),
                language=hyp.language,
                duration_ms=round(u.total / 16),
                processing_ms=round((time.perf_counter() - t0) * 1000, 1),
                segments=[*u.committed, *hyp.segments],
            )
        )
