"""``load_model``: one entry point for every kind of model input.

Accepted specs: ``"default"`` (embedded SmolLM2-135M-Instruct), a local HF folder, an AQLM
checkpoint folder (delegated to ``formats.aqlm_hf``), a ``.gguf`` file (dequantized once and
cached), or a hub id (only when a hub is reachable; ``HF_HUB_OFFLINE`` is respected).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from aqlmkit.dtypes import resolve_dtype
from aqlmkit.errors import AqlmkitError
from aqlmkit.formats.default_model import resolve_default_model
from aqlmkit.formats.gguf_convert import gguf_to_folder

__all__ = ["load_model", "resolve_default_model", "resolve_device", "resolve_dtype"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_device(device: str | torch.device) -> torch.device:
    """Validate the device early, so a missing GPU is one clear line rather than a CUDA trace."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise AqlmkitError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AqlmkitError(f"CUDA was requested but it is not available here (torch "
                               f"{torch.__version__}, no usable GPU); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AqlmkitError(f"CUDA was requested but device {dev} does not exist "
                               f"({torch.cuda.device_count()} GPU(s)); pick a lower index")
    elif dev.type != "cpu":
        raise AqlmkitError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def _read_config(folder: Path) -> dict:
    from aqlmkit.formats.load import read_json_object

    path = folder / "config.json"
    if not path.is_file():
        raise AqlmkitError(f"{folder} has no config.json, so it is not a Hugging Face model "
                           "folder; pass an HF/AQLM folder, a .gguf file or 'default'")
    return read_json_object(path)


def _is_aqlm(config: dict, path: Path) -> bool:
    """True for an AQLM config; a damaged or foreign quantization_config is refused here."""
    if "quantization_config" not in config:
        return False
    from aqlmkit.formats.load import check_quant_method

    check_quant_method(config["quantization_config"], path / "config.json")
    return True


def _check_plain(folder: Path) -> None:
    """A plain folder must hold safetensors inside it and no AQLM tensors (a config that lost
    its quantization_config would otherwise load with random linears)."""
    from aqlmkit.formats import safetensors_io as st
    from aqlmkit.formats.load import tensor_names

    st.weight_files(folder)
    quantized = [n for n in tensor_names(folder) if n.endswith((".codes", ".codebooks"))]
    if quantized:
        raise AqlmkitError(f"{folder} holds AQLM tensors ({quantized[0]} ...) but its config.json has no "
                           "quantization_config; the config is damaged: restore it from the original "
                           "checkpoint")


def _check_finite(model, source: str) -> None:
    import torch

    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise AqlmkitError(f"model {source}: tensor {name} contains NaN/inf; the weights are damaged")


def _load_tokenizer(source: str, **kwargs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; it is always masked out
    return tok


def _load_hf(source: str, device: torch.device, dtype: torch.dtype, **kwargs):
    """Plain transformers load, with every failure turned into one AqlmkitError."""
    from transformers import AutoModelForCausalLM

    try:
        tok = _load_tokenizer(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
    except AqlmkitError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AqlmkitError(f"cannot load model {source!r}: {first}") from e
    _check_finite(model, source)
    return model.to(device).eval(), tok


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype):
    config = _read_config(folder)
    if _is_aqlm(config, folder):
        from aqlmkit.formats.aqlm_hf import load_quantized

        return load_quantized(folder, device, dtype)
    _check_plain(folder)
    return _load_hf(str(folder), device, dtype)


def _load_hub(spec: str, device: torch.device, dtype: torch.dtype):
    """Hub ids go through from_pretrained; offline, only what is already in the HF cache works."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    try:
        return _load_hf(spec, device, dtype, local_files_only=offline)
    except AqlmkitError as e:
        hint = " (HF_HUB_OFFLINE is set, and it is not in the local HF cache)" if offline else ""
        raise AqlmkitError(f"{spec!r} is not a local path and could not be loaded from the "
                           f"Hugging Face hub{hint}: {e}") from e


def load_model(spec: str | os.PathLike = "default", device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "auto"):
    """Return ``(model, tokenizer)`` in eval mode on ``device``; every bad input is an AqlmkitError."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    spec_s = str(spec)
    if spec_s == "default":
        return _load_folder(resolve_default_model(), dev, dt)
    path = Path(spec_s).expanduser()
    if path.is_dir():
        return _load_folder(path, dev, dt)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _load_folder(gguf_to_folder(path), dev, dt)
        if path.name == "config.json":
            return _load_folder(path.parent, dev, dt)
        raise AqlmkitError(f"{path} is a file but not a .gguf model; pass an HF/AQLM folder, "
                           "a .gguf file, a hub id or 'default'")
    if _HUB_ID.match(spec_s) and not spec_s.startswith((".", "/", "~")):
        return _load_hub(spec_s, dev, dt)
    raise AqlmkitError(f"model {spec_s!r} not found: no such file or folder (and not a hub id "
                       "like org/name)")
