from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from voice_common.models import MODELS, install, is_installed
from voice_common.settings import default_models_dir


def test_all_models_installed_and_checked() -> None:
    r = subprocess.run([sys.executable, "-m", "voice_common.models", "check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    for model in MODELS:
        for out in model.outputs:
            assert is_installed(default_models_dir(), out), out.path


def test_install_is_idempotent_and_repairs_a_changed_file(tmp_path: Path, capsys) -> None:
    vad = next(m for m in MODELS if m.service == "vad")
    out = vad.outputs[0]
    src = default_models_dir() / out.path
    dest = tmp_path / out.path
    dest.parent.mkdir(parents=True)
    shutil.copy(src, dest)
    shutil.copy(src.with_name(src.name + ".sha256"), dest.with_name(dest.name + ".sha256"))
    assert not is_installed(tmp_path, out)  # a copy has another mtime: the stamp no longer vouches for it
    install(tmp_path, {"vad"})
    assert "already present, sha256 ok" in capsys.readouterr().out  # re-hashed, not downloaded again
    assert is_installed(tmp_path, out)
    install(tmp_path, {"vad"})
    assert "already installed" in capsys.readouterr().out
    with dest.open("ab") as fh:
        fh.write(b"tampered")
    assert not is_installed(tmp_path, out)
    install(tmp_path, {"vad"})
    assert is_installed(tmp_path, out)
    assert dest.stat().st_size == src.stat().st_size
