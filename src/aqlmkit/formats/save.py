"""Saving an AQLM HF checkpoint: config with quantization_config, codes/codebooks/scales, card.

A checkpoint is a ``save_pretrained`` folder whose config.json carries
``quantization_config = {quant_method: "aqlm", nbits_per_codebook, num_codebooks, in_group_size,
out_group_size, linear_weights_not_to_quantize}``; every other linear stores ``codes``,
``codebooks``, ``scales`` (and ``bias``) exactly as the official ``aqlm.QuantizedLinear``.
The folder is built next to the output and swapped in whole (``formats.output``), so a killed
save leaves the previous output intact.

MoE models are quantized per expert (``models.moe``), so their checkpoints store
``experts.{e}.gate_proj/up_proj/down_proj`` while transformers 5 builds fused 3-D experts; we mark
them with ``quantization_config[UNFUSED_KEY] = True`` (ignored by transformers) and unfuse the meta
model before loading.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from aqlmkit.config import Scheme
from aqlmkit.errors import AqlmkitError
from aqlmkit.formats import safetensors_io as st
from aqlmkit.formats.card import model_card, quantized_names
from aqlmkit.formats.output import CHECKPOINT, output_folder
from aqlmkit.models.moe import has_unfused_experts
from aqlmkit.nn import QuantizedLinear, half_dense_names
from aqlmkit.utils import atomic_write, fault_point

UNFUSED_KEY = "aqlmkit_unfused_experts"


def not_quantized_weights(model: nn.Module, skip=()) -> list[str]:
    """Full weight names of linears/embeddings left dense (transformers' skip list), plus ``skip``."""
    names = [f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Embedding)) and not isinstance(m, QuantizedLinear)]
    extra = [s if s.endswith(".weight") else f"{s}.weight" for s in skip]
    return list(dict.fromkeys(names + [s for s in extra if s not in names]))


def quantization_config(model: nn.Module, scheme: Scheme, skip=()) -> dict:
    """config.json's quantization_config; also lists module names so transformers 5's matcher skips them."""
    qc = scheme.to_hf()
    weights = not_quantized_weights(model, skip)
    # transformers >= 5 matches these entries against *module* names (prefix/suffix), so a weight
    # name alone no longer keeps e.g. lm_head dense there; 4.x compared "<module>.weight". List both.
    modules = [w[: -len(".weight")] for w in weights
               if isinstance(_get(model, w[: -len(".weight")]), nn.Linear)]
    qc["linear_weights_not_to_quantize"] = weights + [m for m in modules if m not in weights]
    if has_unfused_experts(model):
        qc[UNFUSED_KEY] = True
    return qc


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_scheme(model: nn.Module, scheme: Scheme) -> list[str]:
    names = quantized_names(model)
    if not names:
        raise AqlmkitError("the model has no QuantizedLinear layers: quantize it first "
                           "(aqlmkit quantize) or load an AQLM checkpoint")
    for n in names:
        s = model.get_submodule(n).scheme
        if (s.num_codebooks, s.nbits_per_codebook, s.in_group_size, s.out_group_size) != (
                scheme.num_codebooks, scheme.nbits_per_codebook, scheme.in_group_size, scheme.out_group_size):
            raise AqlmkitError(f"layer {n} uses scheme {s.name} but the checkpoint is declared {scheme.name}: "
                               "the AQLM HF format has one scheme per model")
    return names


def state_dict_for_save(model: nn.Module, dense_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict without duplicates of tied tensors (transformers re-ties them on load), with
    fp32 tensors of unquantized linears/embeddings stored as ``dense_dtype`` (see save_quantized)."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        out[k] = v
    if dense_dtype is None:
        return out
    return _dense_as(out, half_dense_names(model, subclasses=True), dense_dtype)  # lm_head, embeddings


def _dense_as(sd: dict, names: set[str], dtype: torch.dtype) -> dict:
    """fp32 dense tensors -> ``dtype``, unless a value would not fit (then it stays fp32)."""
    limit = torch.finfo(dtype).max
    out = {}
    for k, v in sd.items():
        if k in names and v.dtype == torch.float32 and v.numel() and float(v.abs().max()) <= limit:
            v = v.to(dtype)
        out[k] = v
    return out


def _write_folder(model, tokenizer, folder: Path, scheme: Scheme, skip, card, max_shard_size,
                  dense_dtype) -> None:
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config(model, scheme, skip)
    config.dtype = next(m.codebooks.dtype for m in model.modules() if isinstance(m, QuantizedLinear))
    config.save_pretrained(folder)
    fault_point("save:config")
    st.save_sharded(state_dict_for_save(model, dense_dtype), folder, max_shard_size)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    fault_point("save:tokenizer")
    with atomic_write(folder / "README.md", encoding="utf-8") as f:
        f.write(model_card(scheme, model, card))


def save_quantized(model: nn.Module, tokenizer, out_dir, scheme: Scheme | str, skip=(), card: dict | None = None,
                   max_shard_size: str | int = "5GB", dense_dtype: torch.dtype | None = torch.float16,
                   *, overwrite: bool = False) -> Path:
    """Write an AQLM HF checkpoint folder atomically (temp folder next to ``out_dir``, then swap).

    ``out_dir`` must be new, empty, or (with ``overwrite``) an aqlmkit checkpoint: anything else is
    refused before a byte is written. Unquantized linears and embeddings held in fp32 are stored
    as ``dense_dtype`` (fp16 by default, as AQLM checkpoints store them: half the file, and
    ``load_quantized`` then runs the lm_head with the 16-bit-weight CPU kernel); ``None`` stores
    every tensor in its in-memory dtype. Codebooks, scales and norms keep their dtype.
    """
    scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
    _check_scheme(model, scheme)
    st.parse_size(max_shard_size)
    with output_folder(out_dir, overwrite=overwrite, kind=CHECKPOINT) as tmp:
        _write_folder(model, tokenizer, tmp, scheme, skip, card, max_shard_size, dense_dtype)
    return Path(out_dir)
