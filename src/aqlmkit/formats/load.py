"""Loading an AQLM HF checkpoint (ours or official) without ever building dense quantized weights.

The model is built on the meta device and the stored tensors are assigned, after each one is
checked against what config.json implies: name, shape, dtype, finite values, code range. Every
file the checkpoint names must lie inside its folder (``safetensors_io.weight_files``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from aqlmkit.config import Scheme
from aqlmkit.dtypes import resolve_dtype
from aqlmkit.errors import AqlmkitError
from aqlmkit.formats import safetensors_io as st
from aqlmkit.formats.save import UNFUSED_KEY
from aqlmkit.models.moe import modern_expert_name, names_per_expert, unfuse_experts
from aqlmkit.nn import HALF_DTYPES, half_dense_fast, half_dense_names, replace_linears, use_half_dense

_INT_FIELDS = ("nbits_per_codebook", "num_codebooks", "in_group_size", "out_group_size")


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold an object; anything else is one clear error naming the file."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise AqlmkitError(f"cannot read {file}: {e}") from None
    except ValueError as e:
        raise AqlmkitError(f"cannot read {file}: it is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AqlmkitError(f"{file} holds a JSON {type(raw).__name__}, not an object; it is not a "
                           "model config")
    return raw


def check_quant_method(qc, file: Path) -> dict:
    """An object whose quant_method is aqlm; anything else is refused, naming the file."""
    if not isinstance(qc, dict):
        raise AqlmkitError(f"{file}: quantization_config is a {type(qc).__name__}, not an object; "
                           "the checkpoint config is damaged")
    if qc.get("quant_method") != "aqlm":
        raise AqlmkitError(f"{file}: quant_method is {qc.get('quant_method')!r}, not 'aqlm'; aqlmkit loads "
                           "AQLM checkpoints and plain (unquantized) HF models only")
    return qc


def check_quantization_config(qc, file: Path) -> dict:
    """Types of the AQLM fields (Scheme checks their ranges): integers, a list of names."""
    check_quant_method(qc, file)
    for k in _INT_FIELDS:
        v = qc.get(k, 1 if k == "out_group_size" else None)
        if type(v) is not int:
            raise AqlmkitError(f"{file}: quantization_config.{k} must be an integer (got {v!r}); "
                               "the checkpoint config is damaged")
    skip = qc.get("linear_weights_not_to_quantize")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise AqlmkitError(f"{file}: quantization_config.linear_weights_not_to_quantize must be a list "
                           "of names")
    return qc


def read_config(path: Path) -> tuple[dict, Scheme]:
    """config.json and its scheme; refuses anything that is not an AQLM checkpoint."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise AqlmkitError(f"{path} has no config.json: point at a save_pretrained-style folder")
    raw = read_json_object(cfg_file)
    if "quantization_config" not in raw:
        raise AqlmkitError(f"{cfg_file} has no quantization_config: this is not an AQLM checkpoint "
                           "(load it as a plain HF model, or quantize it with aqlmkit quantize)")
    qc = check_quantization_config(raw["quantization_config"], cfg_file)
    return raw, Scheme.from_hf(qc)


def build_empty(path: Path, raw: dict, scheme: Scheme, dtype: torch.dtype) -> nn.Module:
    """The architecture on the meta device (buffers real), its linears swapped for QuantizedLinear."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        qc = raw["quantization_config"]
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # keep transformers' own quantizer out of from_config
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AqlmkitError(f"{path}/config.json does not describe a model transformers can build "
                           f"({first})") from None
    if qc.get(UNFUSED_KEY) or names_per_expert(tensor_names(path)):
        unfuse_experts(model)  # the meta model must have the per-expert linears the codes belong to
    skip = [modern_expert_name(n, config.model_type) for n in qc.get("linear_weights_not_to_quantize") or []]
    replace_linears(model, scheme, skip=skip)
    model.config.quantization_config = qc
    return model


def tensor_names(path: Path) -> list[str]:
    """Tensor names from the safetensors headers; [] if unreadable (load_state reports it)."""
    from safetensors import safe_open

    names: list[str] = []
    try:
        for file in st.weight_files(path):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names += list(f.keys())
    except Exception:  # noqa: BLE001 - corrupt or missing files get a precise error from load_state
        return []
    return names


def check_tensor(name: str, t: torch.Tensor, expected: torch.Tensor, file: Path, scheme: Scheme) -> None:
    """Shape, dtype kind, finiteness and code range of one stored tensor."""
    if tuple(t.shape) != tuple(expected.shape):
        raise AqlmkitError(f"{file.name}: tensor {name} has shape {tuple(t.shape)} but the config "
                           f"({scheme.name}) implies {tuple(expected.shape)}; the checkpoint is damaged")
    if expected.is_floating_point():
        if not t.is_floating_point():
            raise AqlmkitError(f"{file.name}: {name} is stored as {t.dtype}, expected a float tensor; "
                               "the checkpoint is damaged")
        if not torch.isfinite(t).all():
            raise AqlmkitError(f"{file.name}: {name} contains NaN/inf; the checkpoint is damaged")
        return
    if t.dtype != expected.dtype:
        raise AqlmkitError(f"{file.name}: {name} is {t.dtype}, expected {expected.dtype}"
                           + (f" for {scheme.nbits_per_codebook}-bit codes" if name.endswith(".codes") else ""))
    b = scheme.nbits_per_codebook
    if name.endswith(".codes") and b not in (8, 16) and t.numel() and (int(t.min()) < 0 or int(t.max()) >= 1 << b):
        raise AqlmkitError(f"{file.name}: {name} holds codes in [{int(t.min())}, {int(t.max())}] "
                           f"but nbits_per_codebook={b} allows [0, {(1 << b) - 1}]")


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
        check_tensor(name, t, expected[name], file, scheme)
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
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AqlmkitError(f"the tokenizer files in {path} cannot be read ({first}); re-export them") from None


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
