"""The `aqlmkit quantize` main job: load -> calibrate -> global FT -> PV -> save, PPL per stage.

Kept apart from the CLI so the benchmark script and tests drive the very same code. Every stage
resumes from its own state in the work dir; the table row of each stage gives in-domain and
out-of-domain perplexity.
"""
from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path

import torch

from aqlmkit.app.recipes import Recipe
from aqlmkit.errors import AqlmkitError


def stage_ppl(model, tokenizer, recipe: Recipe, evaluate: bool = True) -> dict:
    """``{"ppl": in-domain, "ood_ppl": out-of-domain}`` on the eval splits (None when skipped)."""
    from aqlmkit.eval.perplexity import perplexity

    if not evaluate:
        return {"ppl": None, "ood_ppl": None}
    ev = recipe.eval

    def one(dataset):
        if dataset is None:
            return None
        return perplexity(model, tokenizer, dataset, seqlen=ev.seqlen, limit_tokens=ev.tokens).ppl

    return {"ppl": one(ev.dataset), "ood_ppl": one(ev.ood_dataset)}


def default_work_dir(output: str | Path) -> Path:
    """Resume state lives in the cache (it is big), keyed by the output folder."""
    from aqlmkit.utils import cache_dir

    key = hashlib.sha1(str(Path(output).resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "runs" / f"{Path(output).name}-{key}"


def global_data(tokenizer, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out windows of the global stages, from the calibration split.

    The held-out windows are drawn with another seed; they steer rollback and keep-best only,
    while the perplexities in the table come from the eval split, which no stage trains on.
    """
    from aqlmkit.data.calibration import calibration_batches

    g, ds = recipe.global_ft, recipe.calibration.dataset
    train = calibration_batches(tokenizer, ds, g.nsamples, g.seqlen, g.seed)
    val = calibration_batches(tokenizer, ds, g.val_samples, g.seqlen, g.seed + 7919)
    return train, val


def pv_stage_config(recipe: Recipe):
    """The PV stage's global-FT knobs: the global section's, with the PV stage's steps and lr."""
    from dataclasses import replace

    return replace(recipe.global_ft, steps=recipe.pv.steps, lr=recipe.pv.lr or recipe.global_ft.lr)


def run_global_stages(model, teacher, tokenizer, recipe: Recipe, work_dir: Path, fresh: bool,
                      on_stage=None, dist=None) -> list[dict]:
    """Global P-step distillation, then the PV stage; returns one stats dict per stage run.

    ``on_stage`` (evaluation) runs on rank 0 only; the other ranks wait for it at a barrier.
    """
    from dataclasses import asdict

    from aqlmkit.pipeline.finetune_global import finetune_global

    if recipe.global_ft is None:
        return []
    train, val = global_data(tokenizer, recipe)
    device = str(dist.device) if dist is not None else recipe.calibration.device
    out = []
    stages = [("global", recipe.global_ft, None)]
    if recipe.pv is not None:
        stages.append(("pv", pv_stage_config(recipe), recipe.pv.v))
    for name, cfg, v in stages:
        t = time.time()
        st = finetune_global(model, teacher, train, cfg, device, pv=v, val_ids=val,
                             work_dir=work_dir / name, resume=not fresh,
                             **({"dist": dist, "progress": dist.is_main} if dist is not None else {}))
        rec = {"stage": name, "seconds": round(time.time() - t, 1),
               **{k: val_ for k, val_ in asdict(st).items() if k != "history"}}
        out.append(rec)
        if on_stage is not None and (dist is None or dist.is_main):
            on_stage(name, rec)
        if dist is not None:
            dist.barrier(f"evaluation after the {name} stage")
    return out


def check_data(recipe: Recipe) -> None:
    """Fail on a bad corpus name in about a second, not after the model load and the fp eval."""
    from aqlmkit.data.corpora import calibration_sources, load_corpus

    calibration_sources(recipe.calibration.dataset)
    for ds in (recipe.eval.dataset, recipe.eval.ood_dataset):
        if ds is not None:
            load_corpus(ds, "eval")


def run_job(model_spec: str, output: str | Path, recipe: Recipe, work_dir: str | Path | None,
            fresh: bool = False, dtype: str = "auto", evaluate: bool = True, overwrite: bool = False,
            dist_timeout: float = 1800.0) -> list[dict] | None:
    """Quantize ``model_spec`` into ``output`` (AQLM HF format); returns the table rows.

    Under torchrun every rank runs this: calibration and the global stages are spread over the
    ranks, rank 0 alone evaluates, writes and returns the rows; the other ranks return None.
    """
    from aqlmkit.app.launch import join

    dist = join(recipe.calibration.device, dist_timeout)
    try:
        return _run_job(model_spec, output, recipe, work_dir, fresh, dtype, evaluate, overwrite, dist)
    finally:
        if dist is not None:
            dist.close()


def _run_job(model_spec, output, recipe: Recipe, work_dir, fresh, dtype, evaluate, overwrite, dist):
    from aqlmkit.formats.aqlm_hf import check_output_dir, save_quantized
    from aqlmkit.formats.loading import load_model
    from aqlmkit.pipeline.quantize import quantize_model
    from aqlmkit.pipeline.report import bits_summary
    from aqlmkit.utils import atomic_save_json

    main = dist is None or dist.is_main
    device = str(dist.device) if dist is not None else recipe.calibration.device
    wd = Path(work_dir) if work_dir else default_work_dir(output)

    def checks() -> None:  # before any work
        check_output_dir(output, overwrite=overwrite, sources=[model_spec, wd])
        if evaluate:
            check_data(recipe)

    dist.on_main(checks, "checking the output folder") if dist is not None else checks()
    model, tok = load_model(model_spec, device=device, dtype=dtype)
    evaluate = evaluate and main
    rows: list[dict] = []
    if evaluate:
        t = time.time()
        rows.append({"method": "fp", "scheme": str(next(model.parameters()).dtype).replace("torch.", ""),
                     "avg_bits": 16.0, **stage_ppl(model, tok, recipe), "seconds": round(time.time() - t, 1)})
    keep_fp = recipe.baselines or recipe.global_ft is not None
    fp_model = copy.deepcopy(model) if keep_fp else None
    t = time.time()
    model = quantize_model(model, tok, recipe.scheme, recipe.calibration, recipe.layer, recipe.finetune, wd,
                           resume=not fresh, dist=dist)
    bits = bits_summary(model)
    base = {"method": "AQLM", "scheme": recipe.scheme.name, "avg_bits": bits["avg_bits_quantized"],
            "model_bits": bits["avg_bits_model"]}
    rows.append({**base, "stage": "calibration", **stage_ppl(model, tok, recipe, evaluate),
                 "seconds": round(time.time() - t, 1)})
    if dist is not None:
        dist.barrier("evaluation after calibration")
    stats = []
    if recipe.global_ft is not None:
        def on_stage(name, rec):
            label = "global FT" if name == "global" else "PV"
            rows.append({**base, "stage": label, **stage_ppl(model, tok, recipe, evaluate),
                         "seconds": rec["seconds"], "kl_before": rec["kl_before"], "kl_after": rec["kl_after"],
                         "codes_changed": rec["codes_changed"]})

        stats = run_global_stages(model, fp_model, tok, recipe, wd, fresh, on_stage, dist=dist)
    if not main:
        return None
    card = {"recipe": recipe.name,
            "calibration": f"{recipe.calibration.dataset} {recipe.calibration.nsamples}x{recipe.calibration.seqlen}"}
    if stats:
        card["finetune"] = ", ".join(f"{s['stage']} {s['steps']} steps" for s in stats)
    save_quantized(model, tok, output, recipe.scheme, skip=recipe.calibration.skip, card=card,
                   overwrite=overwrite)
    report = wd / "quantize_report.json"
    if report.exists():
        from aqlmkit.utils import atomic_copy

        atomic_copy(report, Path(output) / "quantize_report.json")
    if recipe.baselines:
        from aqlmkit.app.baselines import baseline_rows

        rows += baseline_rows(fp_model, tok, recipe, bits_target=bits["avg_bits_quantized"],
                              ppl=lambda m: stage_ppl(m, tok, recipe, evaluate))
    atomic_save_json(Path(output) / "quantize_results.json",
                     {"rows": rows, "stages": stats, "recipe": recipe.to_dict()})
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'method':<8} {'scheme':<10} {'stage':<12} {'avg bits':>9} {'model bits':>10} {'PPL':>10} "
            f"{'OOD PPL':>10} {'seconds':>8}")
    lines = [head, "-" * len(head)]

    def num(v, fmt="{:.3f}"):
        return fmt.format(v) if v is not None else "-"

    for r in rows:
        lines.append(f"{r['method']:<8} {r['scheme']:<10} {r.get('stage', ''):<12} {r['avg_bits']:>9.3f} "
                     f"{num(r.get('model_bits')):>10} {num(r.get('ppl')):>10} {num(r.get('ood_ppl')):>10} "
                     f"{r['seconds']:>8}")
    return "\n".join(lines)


def check_recipe_device(recipe: Recipe) -> None:
    if recipe.calibration.device.startswith("cuda") and not torch.cuda.is_available():
        raise AqlmkitError("--device cuda was given but no CUDA device is available; use --device cpu")
