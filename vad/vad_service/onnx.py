"""One way to open an ONNX model for the VAD service's engines: CPU, a thread count, a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def onnx_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `make models`")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
