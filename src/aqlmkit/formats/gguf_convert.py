"""GGUF -> cached safetensors HF folder.

Dequantizing a GGUF through transformers takes tens of seconds, so it is done once per file and
the result is kept as an ordinary HF folder (config, float32 safetensors, tokenizer, generation
config). The folder is built in a temp dir and renamed into place, under a file lock, so two
processes never see or write a half-built model.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
from pathlib import Path
from typing import Iterator

from aqlmkit.errors import AqlmkitError
from aqlmkit.utils import atomic_dir, cache_dir

GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """Reject a missing or foreign file before transformers fails on it with a deep traceback."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise AqlmkitError(f"cannot read GGUF file {path}: {e.strerror}") from e
    if magic != GGUF_MAGIC:
        raise AqlmkitError(f"{path} is not a GGUF file (it does not start with the GGUF magic); "
                           "pass a real .gguf model, an HF folder or a hub id")


def file_key(size: int, mtime: float, extra: str = "") -> str:
    """Short cache key: a changed file (size or mtime) gets a fresh conversion."""
    return hashlib.sha256(f"{size}:{int(mtime)}:{extra}".encode()).hexdigest()[:12]


def cached_folder(name: str, key: str) -> Path:
    return cache_dir() / "models" / f"{name}-{key}"


def is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Serialize conversions of one model across processes (others wait, then reuse the result)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers' gguf loader and save a plain HF folder to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    check_gguf(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a damaged GGUF body fails anywhere in the parser
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise AqlmkitError(f"transformers could not read GGUF {gguf} ({type(e).__name__}: {first}); the "
                           "file is damaged or of an unsupported architecture") from None
    # The weights are plain floats now; a leftover "gguf" quantization_config would make
    # from_pretrained look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    gen = GenerationConfig.from_model_config(model.config)
    gen.save_pretrained(out)


def gguf_to_folder(gguf: Path, name: str | None = None, key: str | None = None) -> Path:
    """Cached HF folder for ``gguf``; converts on first use (atomic, locked)."""
    gguf = Path(gguf)
    if key is None:
        check_gguf(gguf)
        st = gguf.stat()
        key = file_key(st.st_size, st.st_mtime, str(gguf.resolve()))
    folder = cached_folder(name or gguf.stem, key)
    if is_complete(folder):
        return folder
    with folder_lock(folder):
        if is_complete(folder):
            return folder
        with atomic_dir(folder) as tmp:  # replaces an incomplete folder; cleans killed runs' temps
            convert_gguf(gguf, tmp)
    return folder
