"""The AQLM Hugging Face checkpoint format: save and load, compatible with transformers + ``aqlm``.

A checkpoint is a ``save_pretrained`` folder whose config.json carries
``quantization_config = {quant_method: "aqlm", nbits_per_codebook, num_codebooks, in_group_size,
out_group_size, linear_weights_not_to_quantize}``; every other linear stores ``codes``,
``codebooks``, ``scales`` (and ``bias``) exactly as the official ``aqlm.QuantizedLinear``.
Loading builds the model on the meta device and assigns the stored tensors, so dense weights of
quantized layers never exist in memory.

MoE models are quantized per expert (``models.moe``), so their checkpoints store
``experts.{e}.gate_proj/up_proj/down_proj`` while transformers 5 builds fused 3-D experts; we mark
them with ``quantization_config[UNFUSED_KEY] = True`` (ignored by transformers) and unfuse the meta
model before loading. Plain transformers + ``aqlm`` cannot load them (see the model card).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from aqlmkit.config import Scheme
from aqlmkit.errors import AqlmkitError
from aqlmkit.formats import safetensors_io as st
from aqlmkit.models.moe import has_unfused_experts, modern_expert_name, names_per_expert, unfuse_experts
from aqlmkit.nn import (HALF_DTYPES, QuantizedLinear, half_dense_fast, half_dense_names, replace_linears,
                        use_half_dense)

UNFUSED_KEY = "aqlmkit_unfused_experts"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------- save
def quantized_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


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


def average_bits(model: nn.Module) -> float:
    """Storage bits per weight over the quantized linears (codebooks and scales included)."""
    bits = weights = 0.0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            n = m.in_features * m.out_features
            bits += m.bits_per_weight * n
            weights += n
    return bits / max(weights, 1)


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


def model_card(scheme: Scheme, model: nn.Module, card: dict | None) -> str:
    card = dict(card or {})
    base = card.pop("base_model", getattr(model.config, "_name_or_path", "") or "unknown")
    code_bits = scheme.num_codebooks * scheme.nbits_per_codebook / (scheme.in_group_size * scheme.out_group_size)
    lines = [
        "---", "library_name: transformers", "tags: [aqlm, quantized, aqlmkit]", "---", "",
        f"# {Path(str(base)).name or base} — AQLM {scheme.name}", "",
        f"Quantized with [aqlmkit](https://arxiv.org/abs/2401.06118) (Additive Quantization of Language "
        f"Models): {scheme.num_codebooks} codebook(s) of 2^{scheme.nbits_per_codebook} codewords over "
        f"groups of {scheme.in_group_size} weights.", "",
        "| field | value |", "|---|---|",
        f"| base model | {base} |",
        f"| scheme | {scheme.name} |",
        f"| code bits per weight | {code_bits:.3f} |",
        f"| average bits per weight (codes + codebooks + scales) | {average_bits(model):.3f} |",
        f"| quantized linears | {len(quantized_names(model))} |",
    ]
    if "perplexity" in card:
        lines.append(f"| perplexity | {card.pop('perplexity')} |")
    lines += [f"| {k} | {v} |" for k, v in card.items()]
    lines += ["", _loading_note(model), ""]
    return "\n".join(lines)


def _loading_note(model: nn.Module) -> str:
    if not has_unfused_experts(model):
        return ("Load with `transformers.AutoModelForCausalLM.from_pretrained(path)` (needs `pip install aqlm`)"
                " or `aqlmkit.load(path)`.")
    return ("**Load with `aqlmkit.load(path)`** (or `aqlmkit.formats.aqlm_hf.load_quantized(path)`). "
            "This mixture-of-experts model was quantized one expert at a time, so its checkpoint stores "
            "`experts.{e}.gate_proj/up_proj/down_proj` codes. transformers 5 builds MoE experts as fused "
            "3-D tensors that the `aqlm` package cannot quantize: `AutoModelForCausalLM.from_pretrained` "
            "would report the per-expert tensors as UNEXPECTED and `experts.gate_up_proj`/`down_proj` as "
            "MISSING, and run with randomly initialised experts. Do not load it with plain transformers.")


def _write_folder(model, tokenizer, folder: Path, scheme: Scheme, skip, card, max_shard_size,
                  dense_dtype) -> None:
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config(model, scheme, skip)
    config.dtype = next(m.codebooks.dtype for m in model.modules() if isinstance(m, QuantizedLinear))
    config.save_pretrained(folder)
    st.save_sharded(state_dict_for_save(model, dense_dtype), folder, max_shard_size)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(scheme, model, card), encoding="utf-8")


def save_quantized(model: nn.Module, tokenizer, out_dir, scheme: Scheme | str, skip=(), card: dict | None = None,
                   max_shard_size: str | int = "5GB", dense_dtype: torch.dtype | None = torch.float16) -> Path:
    """Write an AQLM HF checkpoint folder atomically (temp folder next to ``out_dir``, then rename).

    Unquantized linears and embeddings held in fp32 are stored as ``dense_dtype`` (fp16 by default,
    as AQLM checkpoints store them: half the file, and ``load_quantized`` then runs the lm_head
    with the 16-bit-weight CPU kernel); ``None`` stores every tensor in its in-memory dtype.
    Codebooks, scales and norms keep their dtype.
    """
    scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
    _check_scheme(model, scheme)
    with atomic_dir(out_dir) as tmp:
        _write_folder(model, tokenizer, tmp, scheme, skip, card, max_shard_size, dense_dtype)
    return Path(out_dir)


@contextlib.contextmanager
def atomic_dir(out_dir) -> Iterator[Path]:
    """Yield a temp folder next to ``out_dir`` that replaces it only if the block succeeds."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AqlmkitError(f"{out} exists and is not a folder; choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------- load
def read_config(path: Path) -> tuple[dict, Scheme]:
    """config.json and its scheme; refuses anything that is not an AQLM checkpoint."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise AqlmkitError(f"{path} has no config.json: point at a save_pretrained-style folder")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise AqlmkitError(f"{cfg_file} is not valid JSON ({e})") from None
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict):
        raise AqlmkitError(f"{cfg_file} has no quantization_config: this is not an AQLM checkpoint "
                           "(load it as a plain HF model, or quantize it with aqlmkit quantize)")
    return raw, Scheme.from_hf(qc)


def resolve_dtype(dtype, device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise AqlmkitError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


def build_empty(path: Path, raw: dict, scheme: Scheme, dtype: torch.dtype) -> nn.Module:
    """The architecture on the meta device (buffers real), its linears swapped for QuantizedLinear."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    qc = raw["quantization_config"]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # keep transformers' own quantizer out of from_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if qc.get(UNFUSED_KEY) or names_per_expert(_tensor_names(path)):
        unfuse_experts(model)  # the meta model must have the per-expert linears the codes belong to
    skip = [modern_expert_name(n, config.model_type) for n in qc.get("linear_weights_not_to_quantize") or []]
    replace_linears(model, scheme, skip=skip)
    model.config.quantization_config = qc
    return model


def _tensor_names(path: Path) -> list[str]:
    """Tensor names from the index or the safetensors headers; [] if unreadable (load_state reports it)."""
    from safetensors import safe_open

    names: list[str] = []
    try:
        for file in st.weight_files(path):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names += list(f.keys())
    except Exception:  # noqa: BLE001 - corrupt or missing files get a precise error from load_state
        return []
    return names


def _check_tensor(name: str, t: torch.Tensor, expected: torch.Tensor, file: Path, scheme: Scheme) -> None:
    if tuple(t.shape) != tuple(expected.shape):
        raise AqlmkitError(f"{file.name}: tensor {name} has shape {tuple(t.shape)} but the config "
                           f"({scheme.name}) implies {tuple(expected.shape)}")
    if name.endswith(".codes"):
        if t.dtype != expected.dtype:
            raise AqlmkitError(f"{file.name}: {name} is {t.dtype}, expected {expected.dtype} for "
                               f"{scheme.nbits_per_codebook}-bit codes")
        b = scheme.nbits_per_codebook
        if b not in (8, 16) and t.numel() and (int(t.min()) < 0 or int(t.max()) >= 1 << b):
            raise AqlmkitError(f"{file.name}: {name} holds codes in [{int(t.min())}, {int(t.max())}] "
                               f"but nbits_per_codebook={b} allows [0, {(1 << b) - 1}]")
    elif name.endswith((".codebooks", ".scales")) and not torch.isfinite(t).all():
        raise AqlmkitError(f"{file.name}: {name} contains NaN/inf; the checkpoint is damaged")


def load_state(model: nn.Module, path: Path, scheme: Scheme, dtype: torch.dtype, device,
               half_dense: bool = False) -> None:
    """Assign the checkpoint's tensors; with ``half_dense`` fp16/bf16-stored dense linears and
    embeddings keep their 16 bits and become HalfLinear/HalfEmbedding (fp32 math)."""
    expected = dict(model.state_dict())
    keep16 = half_dense_names(model) if half_dense else set()
    loaded: dict[str, torch.Tensor] = {}
    model_type = getattr(model.config, "model_type", None)
    for name, t, file in st.iter_tensors(st.weight_files(path)):
        name = modern_expert_name(name, model_type)
        if name not in expected:
            raise AqlmkitError(f"{file.name}: unexpected tensor {name} (not in the {type(model).__name__} "
                               f"built from config.json with {scheme.name}); is the config right?")
        _check_tensor(name, t, expected[name], file, scheme)
        keep = name in keep16 and t.dtype in HALF_DTYPES
        loaded[name] = t.to(device=device, dtype=dtype if t.is_floating_point() and not keep else t.dtype)
    model.load_state_dict(loaded, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    if half_dense:
        use_half_dense(model, dtype)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise AqlmkitError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                           "the checkpoint is incomplete")


def _finish(model: nn.Module, path: Path, device) -> nn.Module:
    from transformers import GenerationConfig

    model.to(device)
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError):
            pass
    return model.eval()


def load_tokenizer(path: Path):
    """The folder's tokenizer, or None when it ships none."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path)


def load_quantized(path, device="cpu", dtype="auto", half_dense: bool | None = None):
    """(model, tokenizer) of an AQLM HF checkpoint (ours or official), without dense weights.

    ``half_dense``: unquantized linears/embeddings stored in fp16/bf16 stay 16-bit
    (HalfLinear/HalfEmbedding, fp32 math) instead of being upcast to ``dtype``; default (None):
    for fp32 inference on CPU when the CPU kernel builds (``nn.half_dense_fast``).
    """
    path = Path(path)
    raw, scheme = read_config(path)
    torch_dtype = resolve_dtype(dtype, device)
    model = build_empty(path, raw, scheme, torch_dtype)
    keep = half_dense_fast(device, torch_dtype) if half_dense is None else bool(half_dense)
    load_state(model, path, scheme, torch_dtype, device, keep)
    return _finish(model, path, device), load_tokenizer(path)


__all__ = ["save_quantized", "load_quantized", "atomic_dir", "quantization_config", "average_bits", "read_config"]
