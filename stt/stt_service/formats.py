"""OpenAI transcription response formats: json, text, verbose_json, srt, vtt."""

from __future__ import annotations

from typing import Any

from .engine import Transcript


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(r: Transcript) -> str:
    return "".join(
        f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text}\n\n" for i, s in enumerate(r.segments, 1)
    )


def to_vtt(r: Transcript) -> str:
    return "WEBVTT\n\n" + "".join(f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text}\n\n" for s in r.segments)


def openai_body(r: Transcript, fmt: str, words: bool, segments: bool) -> tuple[dict[str, Any] | str, str]:
    if fmt == "text":
        return r.text + "\n", "text/plain"
    if fmt == "srt":
        return to_srt(r), "text/plain"
    if fmt == "vtt":
        return to_vtt(r), "text/vtt"
    if fmt == "json":
        return {"text": r.text}, "application/json"
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": r.language,
        "duration": round(r.duration, 3),
        "text": r.text,
    }
    if segments:
        body["segments"] = [
            {
                "id": i,
                "seek": 0,
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": s.tokens,
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for i, s in enumerate(r.segments)
        ]
    if words:
        body["words"] = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for s in r.segments
            for w in s.words
        ]
    return body, "application/json"
