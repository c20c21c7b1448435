"""`quantize_model`: block-by-block AQLM calibration of a HF causal LM, resumable.

Flow: record block-0 inputs (and each block's call kwargs) on the calibration set, then for each
block: fp outputs (targets) -> per-stage Hessians -> AQ per linear -> block fine-tuning ->
quantized outputs (next inputs) -> checkpoint. The checkpoint makes a killed run continue from
the last finished block with bit-identical results.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from aqlmkit.config import CalibrationConfig, FinetuneConfig, LayerQuantConfig, Scheme
from aqlmkit.errors import AqlmkitError
from aqlmkit.models import get_layout
from aqlmkit.nn import QuantizedLinear
from aqlmkit.pipeline.activations import capture_block_inputs
from aqlmkit.nn.linear import is_skipped
from aqlmkit.pipeline.block import quantize_block, set_submodule
from aqlmkit.pipeline.checkpoint import Checkpoint, model_fingerprint, tensor_hash
from aqlmkit.pipeline.report import write_report


def calibration_ids(tokenizer, calib: CalibrationConfig) -> torch.Tensor:
    from aqlmkit.data.calibration import calibration_batches

    return calibration_batches(tokenizer, calib.dataset, calib.nsamples, calib.seqlen, calib.seed)


def _check_ids(ids: torch.Tensor, calib: CalibrationConfig) -> torch.Tensor:
    if ids.dim() != 2 or ids.shape[0] < calib.nsamples or ids.shape[1] < calib.seqlen:
        raise AqlmkitError(
            f"the calibration set gave {tuple(ids.shape)} tokens but {calib.nsamples} samples of "
            f"{calib.seqlen} tokens were requested: lower --nsamples/--seqlen or use a larger dataset")
    return ids[: calib.nsamples, : calib.seqlen].long()


def _restore_block(block: nn.Module, state: dict, names: list[str], scheme: Scheme, dtype) -> None:
    """Rebuild a finished block from its checkpoint: swap in empty QuantizedLinears, load state."""
    for n in names:
        if f"{n}.codes" not in state:
            continue
        lin = block.get_submodule(n)
        q = QuantizedLinear(lin.in_features, lin.out_features, scheme, bias=lin.bias is not None,
                            device=lin.weight.device, dtype=dtype)
        set_submodule(block, n, q)
    block.load_state_dict(state, strict=True)


def _identity(model, scheme, calib, layer, finetune, ids) -> dict:
    calib_d = {k: v for k, v in asdict(calib).items() if k not in ("device", "offload_activations")}
    calib_d["skip"] = list(calib.skip)
    return {"fingerprint": model_fingerprint(model), "scheme": scheme.name, "calib": calib_d,
            "layer": asdict(layer), "finetune": asdict(finetune), "data_hash": tensor_hash(ids),
            "skip": list(calib.skip)}


def quantize_model(model: nn.Module, tokenizer, scheme: Scheme | str, calib: CalibrationConfig | None = None,
                   layer: LayerQuantConfig | None = None, finetune: FinetuneConfig | None = None,
                   work_dir: str | Path | None = None, resume: bool = True, *,
                   calibration_data: torch.Tensor | None = None, progress: bool = True,
                   micro_batch: int = 8) -> nn.Module:
    """Quantize every decoder-block linear of ``model`` in place with AQLM and return it.

    ``resume=False`` discards an existing checkpoint in ``work_dir`` (the CLI's ``--fresh``).
    ``calibration_data`` (LongTensor [n, seqlen]) overrides drawing from ``calib.dataset``.
    Per-block stats go to ``work_dir/quantize_report.json`` (+ .png).
    """
    scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
    calib, layer, finetune = calib or CalibrationConfig(), layer or LayerQuantConfig(), finetune or FinetuneConfig()
    device = torch.device(calib.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model.eval()
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None:  # calibration runs whole windows; a KV cache would only cost memory
        config.use_cache = False
    layout = get_layout(model)
    ids = _check_ids(calibration_data if calibration_data is not None else calibration_ids(tokenizer, calib), calib)
    identity = _identity(model, scheme, calib, layer, finetune, ids)
    ckpt = Checkpoint(work_dir or _default_work_dir(identity), identity)
    start, stats = _resume_point(ckpt, resume)

    store = torch.device("cpu") if calib.offload_activations else device
    model.to(device)
    inps, kwargs = capture_block_inputs(model, layout.blocks, ids, device, store)
    prefix_of = _prefixes(model, layout)
    dtype = next(layout.blocks[0].parameters()).dtype
    for i in range(start):
        _restore_block(layout.blocks[i], ckpt.load_block_state(i), layout.linear_names(i), scheme, dtype)
    if start:
        inps = ckpt.load_inputs(start).to(store)
    total = sum(1 for i in range(len(layout.blocks)) for n in layout.linear_names(i)
                if not is_skipped(prefix_of[i] + n, calib.skip))
    done = sum(len(s["linears"]) for s in stats)
    bar = tqdm(total=total, initial=done, desc=f"AQLM {scheme.name}", unit="linear", disable=not progress)

    def tick(name: str, err: float) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{name.split('layers.')[-1]} rel_err={err:.4f}")

    t0 = time.time()
    try:
        for i in range(start, len(layout.blocks)):
            block = layout.blocks[i]
            inps, st = quantize_block(block, i, layout.stages(i), inps, kwargs[i], scheme, layer, finetune,
                                      device, calib.skip, micro_batch, tick, progress, prefix_of[i])
            stats.append(st)
            ckpt.save_block(i, block, inps, stats)
            bar.set_postfix_str(f"block {i} ft {st['finetune_loss_before']:.3e}->{st['finetune_loss_after']:.3e}")
    finally:
        bar.close()
        if config is not None:  # the saved checkpoint must still generate with a KV cache
            config.use_cache = use_cache
    write_report(ckpt.dir / "quantize_report", model, scheme, stats, time.time() - t0)
    return model


def _prefixes(model: nn.Module, layout) -> list[str]:
    ids = {id(m): n for n, m in model.named_modules()}
    return [ids[id(b)] + "." for b in layout.blocks]


def _default_work_dir(identity: dict) -> Path:
    from aqlmkit.utils import cache_dir

    return cache_dir() / "runs" / f"{identity['fingerprint']}_{identity['scheme']}"


def _resume_point(ckpt: Checkpoint, resume: bool) -> tuple[int, list[dict]]:
    manifest = ckpt.load_manifest() if resume else None
    if manifest is None:
        ckpt.reset()
        return 0, []
    ckpt.check(manifest)
    return int(manifest["next_block"]), list(manifest.get("stats", []))
