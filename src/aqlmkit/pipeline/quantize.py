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


def _swap_quantized(block: nn.Module, names: list[str], scheme: Scheme, dtype) -> None:
    """Replace the named linears by empty QuantizedLinears of the same shape (to load a state into)."""
    for n in names:
        lin = block.get_submodule(n)
        q = QuantizedLinear(lin.in_features, lin.out_features, scheme, bias=lin.bias is not None,
                            device=lin.weight.device, dtype=dtype)
        set_submodule(block, n, q)


def _restore_block(block: nn.Module, state: dict, names: list[str], scheme: Scheme, dtype) -> list[str]:
    """Rebuild a finished block from its checkpoint; returns the names of its quantized linears."""
    quantized = [n for n in names if f"{n}.codes" in state]
    _swap_quantized(block, quantized, scheme, dtype)
    block.load_state_dict(state, strict=True)
    return quantized


def _restore_blocks(blocks, names_of, ckpt: Checkpoint, start: int, scheme: Scheme, dtype, dist) -> None:
    """Blocks finished before ``start``: rank 0 reads them, the other ranks receive them."""
    for i in range(start):
        if dist is None or dist.world == 1:
            _restore_block(blocks[i], ckpt.load_block_state(i), names_of(i), scheme, dtype)
            continue
        quantized = dist.on_main(lambda: _restore_block(blocks[i], ckpt.load_block_state(i), names_of(i),
                                                        scheme, dtype), f"reading block {i} of the checkpoint")
        if not dist.is_main:
            _swap_quantized(blocks[i], quantized, scheme, dtype)
        dist.broadcast_module(blocks[i])


def _resume_inputs(ckpt: Checkpoint, start: int, inps: torch.Tensor, counts, dist) -> torch.Tensor:
    """This rank's shard of the inputs of block ``start`` (and rank 0's RNG state on every rank)."""
    if dist is None or dist.world == 1:
        return ckpt.load_inputs(start).to(inps.device)
    full: list[torch.Tensor] = []

    def load() -> torch.Tensor:
        full.append(ckpt.load_inputs(start))
        return torch.get_rng_state()

    torch.set_rng_state(dist.on_main(load, f"reading the inputs of block {start}"))
    return dist.scatter_rows(full[0] if full else None, counts, like=inps)


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
                   micro_batch: int = 8, dist=None) -> nn.Module:
    """Quantize every decoder-block linear of ``model`` in place with AQLM and return it.

    ``resume=False`` discards an existing checkpoint in ``work_dir`` (the CLI's ``--fresh``).
    ``calibration_data`` (LongTensor [n, seqlen]) overrides drawing from ``calib.dataset``.
    Per-block stats go to ``work_dir/quantize_report.json`` (+ .png).

    ``dist`` (:class:`aqlmkit.pipeline.distributed.Dist`, under torchrun) spreads the job over its
    ranks: each holds a micro-batch-aligned shard of the samples and their activations, rank 0
    alone reads and writes the work dir, and a block starts only when every rank finished the last
    one. The checkpoint does not depend on the world size, so a run resumes with any world size.
    """
    scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
    calib, layer, finetune = calib or CalibrationConfig(), layer or LayerQuantConfig(), finetune or FinetuneConfig()
    spread = dist is not None and dist.world > 1
    main = dist.is_main if dist is not None else True
    device = dist.device if dist is not None else torch.device(calib.device)
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
    if spread and dist.broadcast_object(identity) != identity:
        raise AqlmkitError(f"rank {dist.rank} on {dist.hosts[dist.rank]} sees another model, config or "
                           "calibration set than rank 0: give every node the same files and arguments")
    ckpt = Checkpoint(work_dir or _default_work_dir(identity), identity)
    start, stats = dist.on_main(lambda: _resume_point(ckpt, resume), "opening the work dir") if dist \
        else _resume_point(ckpt, resume)

    store = torch.device("cpu") if calib.offload_activations else device
    model.to(device)
    n = ids.shape[0]
    # whole micro-batches per rank, but never so coarse that ranks sit idle on a small set
    counts = dist.counts(n, max(1, min(micro_batch, -(-n // dist.world)))) if spread else [n]
    lo = sum(counts[: dist.rank]) if spread else 0
    rows = counts[dist.rank] if spread else n
    inps, kwargs = capture_block_inputs(model, layout.blocks, ids[lo:lo + rows] if rows else ids[:1], device, store)
    inps = inps[:rows]  # a rank without samples still records the blocks' call kwargs
    prefix_of = _prefixes(model, layout)
    dtype = next(layout.blocks[0].parameters()).dtype
    _restore_blocks(layout.blocks, layout.linear_names, ckpt, start, scheme, dtype, dist)
    if start:
        inps = _resume_inputs(ckpt, start, inps, counts, dist).to(store)
    total = sum(1 for i in range(len(layout.blocks)) for n in layout.linear_names(i)
                if not is_skipped(prefix_of[i] + n, calib.skip))
    done = sum(len(s["linears"]) for s in stats)
    progress = progress and main
    bar = tqdm(total=total, initial=done, desc=f"AQLM {scheme.name}", unit="linear", disable=not progress)

    def tick(name: str, err: float) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{name.split('layers.')[-1]} rel_err={err:.4f}")

    t0 = time.time()
    try:
        for i in range(start, len(layout.blocks)):
            block = layout.blocks[i]
            inps, st = quantize_block(block, i, layout.stages(i), inps, kwargs[i], scheme, layer, finetune,
                                      device, calib.skip, micro_batch, tick, progress, prefix_of[i], dist=dist)
            stats.append(st)
            if spread:
                dist.barrier(f"end of block {i}")
                full = dist.gather_rows(inps, counts)
                dist.on_main(lambda: ckpt.save_block(i, block, full, stats), f"checkpoint of block {i}")
            else:
                ckpt.save_block(i, block, inps, stats)
            bar.set_postfix_str(f"block {i} ft {st['finetune_loss_before']:.3e}->{st['finetune_loss_after']:.3e}")
    finally:
        bar.close()
        if config is not None:  # the saved checkpoint must still generate with a KV cache
            config.use_cache = use_cache
    if main:
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
