"""Moonshine (Useful Sensors, MIT) on onnxruntime: the default English transcriber.

Why Moonshine rather than Whisper for live speech: Whisper's encoder always reads a 30 s window, so every
decode of a 2 s utterance costs the same as a 30 s one (~0.7–1 s on our 2 cores, the floor of every
reply). Moonshine's encoder reads only the audio there is: a 3 s utterance is transcribed in ~0.2 s, and
base-en is more accurate than Whisper tiny.en. The model files are converted at install time
(`voice_common.onnx_convert`): a float encoder and a two-part int8 decoder ("first" fills the
cross-attention cache from the encoder output, "step" adds one token).

What it lacks against Whisper: no word timestamps, no prompt, no translation, English only. Segments come
from pauses in the audio (each stretch of speech between pauses of `PAUSE_S` is decoded on its own), which
also keeps any one decode short and never feeds the model pure silence (where it would invent words).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from voice_common.errors import ApiError

from .engine import RATE, Seg, Transcript, check_stop, check_task

FRAME = 320  # 20 ms
SILENT_RMS = 0.01  # -40 dBFS: a pause
QUIETEST_SPEECH_RMS = 0.002  # -54 dBFS: below this there is nothing to transcribe
PAUSE_S = 0.3  # a segment boundary
MARGIN_S = 0.2  # quiet kept around each stretch of speech
MAX_CHUNK_S = 20.0  # Moonshine is trained on utterances up to ~30 s
TOKENS_PER_S = 6.5  # a cap on the decode (the reference implementation's), so noise cannot loop forever
BOS, EOS = 1, 2


def load_tokens(path: Path) -> list[bytes]:
    """Moonshine's tokenizer.bin: per token a length (one byte, or two when ≥128) and the UTF-8 bytes."""
    data = path.read_bytes()
    tokens, i = [], 0
    while i < len(data):
        n = data[i]
        i += 1
        if n >= 128:
            n = (n - 128) + (data[i] << 7)
            i += 1
        tokens.append(data[i : i + n])
        i += n
    return tokens


def speech_chunks(audio: np.ndarray, *, split: bool) -> list[tuple[int, int]]:
    """Sample ranges of speech: silent audio gives none; with `split`, cut in the middle of every pause of
    `PAUSE_S` or more; a stretch longer than `MAX_CHUNK_S` is cut at its quietest 20 ms. Each range is
    trimmed to its speech and `MARGIN_S` either side."""
    n = len(audio) // FRAME
    if n == 0:
        return []
    rms = np.sqrt((audio[: n * FRAME].reshape(n, FRAME) ** 2).mean(axis=1))
    if rms.max() < QUIETEST_SPEECH_RMS:
        return []
    loud = rms >= min(SILENT_RMS, 0.1 * float(rms.max()))  # a quiet recording has quieter pauses
    if not split:
        bounds = [(0, len(audio))]
    else:
        bounds, start, quiet_from = [], 0, None
        pause = int(PAUSE_S * RATE / FRAME)
        for i, is_loud in enumerate(loud):
            if not is_loud:
                quiet_from = i if quiet_from is None else quiet_from
                continue
            if quiet_from is not None and i - quiet_from >= pause and loud[:quiet_from].any():
                cut = (quiet_from + i) // 2 * FRAME
                bounds.append((start, cut))
                start = cut
            quiet_from = None
        bounds.append((start, len(audio)))
    out = []
    limit = int(MAX_CHUNK_S * RATE)
    for a, b in bounds:
        while b - a > limit:
            lo, hi = (a + limit // 2) // FRAME, (a + limit) // FRAME
            cut = (lo + int(np.argmin(rms[lo:hi]))) * FRAME
            out.append((a, cut))
            a = cut
        out.append((a, b))
    margin = int(MARGIN_S * RATE)
    trimmed = []
    for a, b in out:
        frames = np.flatnonzero(loud[a // FRAME : max(a // FRAME + 1, b // FRAME)])
        if frames.size:  # leading and trailing silence cost time and, long enough, words
            first, last = (a // FRAME + frames[0]) * FRAME, (a // FRAME + frames[-1] + 1) * FRAME
            trimmed.append((max(a, first - margin), min(b, last + margin)))
    return trimmed


def _logprob(logits: np.ndarray, token: int) -> float:
    top = float(logits.max())
    return float(logits[token]) - (top + float(np.log(np.exp(logits - top).sum())))


class Moonshine:
    multilingual = False

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        needed = ("encoder.onnx", "decoder_first.onnx", "decoder_step.onnx", "tokenizer.bin")
        if not all((path / f).exists() for f in needed):
            raise FileNotFoundError(f"no Moonshine model in {path}: run `make models`")
        self.name = path.name
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: between decodes the cores belong to the other services
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(name: str) -> Any:
            return ort.InferenceSession(str(path / name), opts, providers=["CPUExecutionProvider"])

        self.encoder = session("encoder.onnx")
        self.first = session("decoder_first.onnx")
        self.step = session("decoder_step.onnx")
        self.step_outputs = [o.name for o in self.step.get_outputs()]
        self.first_outputs = [o.name for o in self.first.get_outputs()]
        self.tokens = load_tokens(path / "tokenizer.bin")

    def decode_chunk(
        self, audio: np.ndarray, stop: threading.Event | None = None, draft: Sequence[int] = ()
    ) -> tuple[str, list[int], float]:
        """Greedy decode of one stretch of speech: text, tokens, mean log-probability.

        `draft`: the tokens of an earlier decode of the same stretch's beginning (a live utterance's last
        interim). They are checked in one decoder pass, the ones the model agrees with are kept, and
        generation goes on from the first it does not: the words said before the interim cost one pass, not
        a step each (a final ~half the time). The int8 activations are quantised per call, so in a near tie
        a token may differ from a decode without the draft (a comma for a full stop, in 6 of 70 checks)."""
        check_stop(stop)
        limit = int(len(audio) / RATE * TOKENS_PER_S) + 8
        draft = list(draft)[:limit]
        hidden = self.encoder.run(None, {"input_values": audio[None, :].astype(np.float32, copy=False)})[0]
        ids = np.array([[BOS, *draft]], np.int64)
        out = self.first.run(None, {"input_ids": ids, "encoder_hidden_states": hidden})
        rows = out[0][0]  # logits after BOS and after each draft token
        agreed = 0
        while agreed < len(draft) and int(rows[agreed].argmax()) == draft[agreed]:
            agreed += 1
        tokens = draft[:agreed]
        logprob = sum(_logprob(rows[i], t) for i, t in enumerate(tokens))
        feeds: dict[str, np.ndarray] = {  # the self-attention cache of the agreed tokens only
            name.replace("present", "past_key_values"): (
                np.ascontiguousarray(value[:, :, : 1 + agreed]) if ".decoder." in name else value
            )
            for name, value in zip(self.first_outputs[1:], out[1:], strict=True)
        }
        logits = rows[agreed]
        for _ in range(limit - agreed):
            token = int(logits.argmax())
            logprob += _logprob(logits, token)
            if token == EOS:
                break
            check_stop(stop)
            tokens.append(token)
            feeds["input_ids"] = np.array([[token]], np.int64)
            out = self.step.run(None, feeds)
            for name, value in zip(self.step_outputs[1:], out[1:], strict=True):
                feeds[name.replace("present", "past_key_values")] = value
            logits = out[0][0, -1]
        text = b"".join(self.tokens[t] for t in tokens).decode("utf-8", "replace").replace("\u2581", " ").strip()
        return text, tokens, logprob / max(1, len(tokens) + 1)

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
        word_timestamps: bool = False,
        timestamps: bool = True,
        task: str = "transcribe",
        on_segment: Callable[[Seg], None] | None = None,
        stop: threading.Event | None = None,
        draft: Transcript | None = None,
    ) -> Transcript:
        """`prompt` and `temperature` are accepted and not used (Moonshine decodes greedily, unprompted).
        A `draft` segment that starts where a stretch of speech does drafts that stretch's tokens."""
        t0 = time.perf_counter()
        check_task(self, task)
        if word_timestamps:
            raise ApiError(
                400,
                "word_timestamps_unsupported",
                f"{self.name} gives segment timestamps only; word timestamps need a Whisper model "
                "(STT_MODEL=whisper-base)",
            )
        drafts = {round(s.start * RATE): s.tokens for s in draft.segments} if draft is not None else {}
        segs = []
        for a, b in speech_chunks(audio, split=timestamps or len(audio) > MAX_CHUNK_S * RATE):
            text, tokens, logprob = self.decode_chunk(audio[a:b], stop, drafts.get(a, ()))
            seg = Seg(a / RATE, b / RATE, text, avg_logprob=round(logprob, 4), tokens=tokens)
            segs.append(seg)
            if on_segment is not None:
                on_segment(seg)
        return Transcript(
            text=" ".join(s.text for s in segs if s.text).strip(),
            language="en",
            language_probability=1.0,
            duration=len(audio) / RATE,
            segments=segs,
            processing_ms=round((time.perf_counter() - t0) * 1000, 1),
        )
