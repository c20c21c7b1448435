"""Quality vs bits on the embedded SmolLM2-135M: AQLM after every stage vs RTN and GPTQ.

Every method sees the same calibration windows and is scored by the same perplexity calls on the
in-domain eval text (``default``) and the out-of-domain one (``ood``, a genre calibration never
sees). Bits are true storage costs (codebooks/scales for AQLM, fp16 scale+zero per group for
RTN/GPTQ). For each AQLM scheme the recipe's stages run in order (calibration, global P-step
fine-tuning, PV-tuning); as a control, P-only tuning continues from the same state for the same
number of steps the PV stage takes, so "PV vs P-only at the same steps" is measured in one run,
with held-out KL on eval-split windows. Writes benchmarks/results/<date>_<device>_quality.json/.png.

  python benchmarks/quality_smollm2.py                                   # CPU, quick recipe
  python benchmarks/quality_smollm2.py --device cuda --recipe standard   # GPU
  python benchmarks/quality_smollm2.py --smoke                           # seconds: pipeline check
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from aqlmkit.app.baselines import baseline_bits, gptq_model, rtn_model
from aqlmkit.app.job import global_data, pv_stage_config
from aqlmkit.app.recipes import build_recipe
from aqlmkit.data.calibration import calibration_batches
from aqlmkit.eval.perplexity import perplexity
from aqlmkit.eval.report import save_report
from aqlmkit.formats.loading import load_model
from aqlmkit.pipeline.finetune_global import evaluate_kl, finetune_global
from aqlmkit.pipeline.quantize import calibration_ids, quantize_model
from aqlmkit.pipeline.report import bits_summary
from aqlmkit.utils import atomic_save_json, cache_dir

RESULTS = Path(__file__).parent / "results"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--recipe", default="quick")
    p.add_argument("--device", default="cpu")
    p.add_argument("--schemes", default="2x8g8,4x8g16,3x8g8")
    p.add_argument("--bits", default="2,3,4", help="RTN/GPTQ bit widths")
    p.add_argument("--group-sizes", default="128,64")
    p.add_argument("--ood-dataset", default="ood", help="out-of-domain eval corpus")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--kl-windows", type=int, default=8, help="eval-split windows for the held-out KL")
    p.add_argument("--no-control", action="store_true", help="skip the P-only control of the PV stage")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny settings to check the script runs")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args()


def _smoke_overrides() -> dict:
    return {"calibration": {"nsamples": 2, "seqlen": 64},
            "layer": {"max_epochs": 1, "steps_per_epoch": 2, "init_max_iter": 2}, "finetune": {"epochs": 0},
            "global": {"steps": 2, "eval_every": 1, "batch_size": 1, "nsamples": 4, "val_samples": 1, "seqlen": 64},
            "pv": {"steps": 2}}


class Scorer:
    """PPL in and out of domain, and held-out KL against the fp model on eval-split windows."""

    def __init__(self, teacher, tok, a) -> None:
        from aqlmkit.data.corpora import load_corpus

        self.teacher, self.tok, self.a = teacher, tok, a
        docs = load_corpus("default", "eval")
        self.kl_ids = calibration_batches(tok, docs, a.kl_windows, min(512, a.eval_seqlen), seed=1)

    def __call__(self, m, with_kl: bool = True) -> dict:
        a = self.a
        row = {name: perplexity(m, self.tok, ds, seqlen=a.eval_seqlen, limit_tokens=a.eval_tokens).ppl
               for name, ds in (("ppl", "default"), ("ood_ppl", a.ood_dataset))}
        if with_kl:
            row["heldout_kl"] = evaluate_kl(m, self.teacher, self.kl_ids, a.device)
        return row


def aqlm_rows(name: str, model, tok, recipe, ids, score: Scorer, a) -> list[dict]:
    rows = []
    t = time.time()
    scheme_recipe = replace(recipe, scheme=recipe.scheme.parse(name))
    q = quantize_model(copy.deepcopy(model), tok, scheme_recipe.scheme, recipe.calibration, recipe.layer,
                       recipe.finetune, cache_dir() / "bench_quality" / f"{name}_{recipe.name}{'_smoke' * a.smoke}",
                       calibration_data=ids)
    bits = bits_summary(q)["avg_bits_quantized"]
    base = {"method": "AQLM", "scheme": name, "bits": bits}
    rows.append({**base, "stage": "calibration", **score(q), "seconds": round(time.time() - t, 1)})
    print(rows[-1], flush=True)
    g = recipe.global_ft
    train, val = global_data(tok, recipe)
    t = time.time()
    st = finetune_global(q, model, train, g, a.device, val_ids=val)
    rows.append({**base, "stage": f"global P {g.steps}", **score(q), "val_kl": st.kl_after,
                 "rollbacks": st.rollbacks, "seconds": round(time.time() - t, 1)})
    print(rows[-1], flush=True)
    if recipe.pv is None:
        return rows
    pv_cfg = replace(pv_stage_config(recipe), seed=g.seed + 1)
    branches = [("PV", recipe.pv.v)] + ([] if a.no_control else [("P-only", None)])
    start = copy.deepcopy(q) if len(branches) > 1 else q
    for label, v in branches:
        m = q if label == "PV" else start
        t = time.time()
        st = finetune_global(m, model, train, pv_cfg, a.device, pv=v, val_ids=val)
        rows.append({**base, "stage": f"+{recipe.pv.steps} {label}", **score(m), "val_kl": st.kl_after,
                     "codes_changed": st.codes_changed, "v_kept": st.v_kept, "v_undone": st.v_undone,
                     "rollbacks": st.rollbacks, "seconds": round(time.time() - t, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    a = parse()
    recipe = build_recipe(a.recipe, _smoke_overrides() if a.smoke else None,
                          {"calibration": {"device": a.device}})
    if a.smoke:
        a.eval_tokens, a.eval_seqlen, a.kl_windows = 512, 128, 2
    model, tok = load_model(a.model, device=a.device, dtype="float32")
    if a.smoke:  # two blocks are enough to exercise every path
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
    score = Scorer(model, tok, a)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    tag = dev.replace(" ", "_") if dev != "cpu" else "cpu"
    stem = Path(a.out) / f"{dt.date.today().isoformat()}_{tag}_{recipe.name}_quality{a.tag}{'_smoke' * a.smoke}"
    rows = [{"method": "fp32", "scheme": "fp32", "bits": 16.0, **score(model, with_kl=False), "seconds": 0.0}]
    data = {"model": a.model, "date": dt.datetime.now().isoformat(timespec="seconds"), "device": dev,
            "threads": torch.get_num_threads(), "smoke": a.smoke, "eval_tokens": a.eval_tokens,
            "eval_seqlen": a.eval_seqlen, "ood_dataset": a.ood_dataset, "recipe": recipe.to_dict(),
            "load_average": os.getloadavg(), "complete": False, "rows": rows}
    ids = calibration_ids(tok, recipe.calibration)
    for name in a.schemes.split(","):
        rows += aqlm_rows(name, model, tok, recipe, ids, score, a)
        atomic_save_json(f"{stem}.json", data)  # partial results survive a run cut short
    for gs in ([] if a.no_baselines else [int(g) for g in a.group_sizes.split(",")]):
        for bits in [int(b) for b in a.bits.split(",")]:
            for method, fn in (("RTN", lambda m: rtn_model(m, bits, gs)),
                               ("GPTQ", lambda m: gptq_model(m, ids, bits, gs, a.device))):
                t = time.time()
                m = fn(copy.deepcopy(model))
                rows.append({"method": method, "scheme": f"int{bits}g{gs}", "bits": baseline_bits(bits, gs),
                             **score(m, with_kl=False), "seconds": round(time.time() - t, 1)})
                print(rows[-1], flush=True)
                atomic_save_json(f"{stem}.json", data)
                del m
    data.update(complete=True, load_average_end=os.getloadavg())
    save_report(stem, data, plot=lambda fig: _plot(fig, rows))
    for r in rows:
        print(f"{r['method']:<5} {r['scheme']:<10} {r.get('stage', ''):<14} {r['bits']:6.3f} bits  "
              f"ppl {r['ppl']:10.3f}  ood {r['ood_ppl']:10.3f}  kl {r.get('heldout_kl', float('nan')):.4f}")
    print(f"wrote {stem}.json/.png")


def _plot(fig, rows: list[dict]) -> None:
    fp = next(r for r in rows if r["method"] == "fp32")
    for i, key in enumerate(("ppl", "ood_ppl")):
        ax = fig.add_subplot(1, 2, i + 1)
        best = {}
        for r in rows:  # AQLM: the last stage of each scheme
            if r["method"] == "AQLM" and "P-only" not in r.get("stage", ""):
                best[r["scheme"]] = r
        series = {"AQLM (final stage)": sorted((r["bits"], r[key]) for r in best.values())}
        for method in ("GPTQ", "RTN"):
            for gs in sorted({r["scheme"].split("g")[-1] for r in rows if r["method"] == method}):
                series[f"{method} g{gs}"] = sorted((r["bits"], r[key]) for r in rows
                                                   if r["method"] == method and r["scheme"].endswith(f"g{gs}"))
        for label, pts in series.items():
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(fp[key], color="gray", ls="--", label=f"fp32 ({fp[key]:.2f})")
        ax.set(xlabel="average bits per weight (incl. codebooks/scales)", ylabel="perplexity (log)",
               yscale="log", title=("in-domain" if key == "ppl" else "out-of-domain") + " perplexity")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)


if __name__ == "__main__":
    main()
