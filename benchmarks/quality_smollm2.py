"""Quality vs bits on the embedded SmolLM2-135M: AQLM settings vs RTN and GPTQ, same harness.

Every method sees the same calibration windows and is scored by the same perplexity call on the
default eval text. Bits are true storage costs (codebooks/scales for AQLM, fp16 scale+zero per
group for RTN/GPTQ). Writes benchmarks/results/<date>_cpu_quality.json and .png (bits vs PPL).

  python benchmarks/quality_smollm2.py                  # full run (~45-60 min on 2 quiet cores)
  python benchmarks/quality_smollm2.py --smoke          # seconds: tiny settings, pipeline check
"""
from __future__ import annotations

import argparse
import copy
import os
import datetime as dt
import time
from pathlib import Path

import torch

from aqlmkit.config import Scheme
from aqlmkit.eval.perplexity import perplexity
from aqlmkit.eval.report import save_report
from aqlmkit.formats.loading import load_model
from aqlmkit.app.baselines import baseline_bits, gptq_model, rtn_model
from aqlmkit.app.job import build_configs
from aqlmkit.pipeline.quantize import calibration_ids, quantize_model
from aqlmkit.pipeline.report import bits_summary
from aqlmkit.utils import cache_dir

RESULTS = Path(__file__).parent / "results"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--schemes", default="2x8g8,4x8g16,3x8g8")
    p.add_argument("--bits", default="2,3,4", help="RTN/GPTQ bit widths")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--finetune-epochs", type=int, default=None, help="block fine-tuning epochs (default: the CLI's)")
    p.add_argument("--smoke", action="store_true", help="tiny settings to check the script runs")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args()


def main() -> None:
    a = parse()
    overrides = {"calibration": {"nsamples": a.nsamples, "seqlen": a.seqlen}}
    if a.finetune_epochs is not None:
        overrides["finetune"] = {"epochs": a.finetune_epochs}
    if a.smoke:
        overrides = {"calibration": {"nsamples": 2, "seqlen": 64},
                     "layer": {"max_epochs": 1, "steps_per_epoch": 2, "init_max_iter": 2},
                     "finetune": {"epochs": 0}}
        a.eval_tokens, a.eval_seqlen = 1024, 256
    calib, layer, ft = build_configs({}, overrides)
    model, tok = load_model(a.model, device="cpu", dtype="float32")
    if a.smoke:  # two blocks are enough to exercise every path
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
    ppl = lambda m: perplexity(m, tok, "default", seqlen=a.eval_seqlen, limit_tokens=a.eval_tokens).ppl  # noqa: E731
    rows = [{"method": "fp32", "scheme": "fp32", "bits": 16.0, "ppl": ppl(model), "seconds": 0.0}]
    ids = calibration_ids(tok, calib)
    for name in a.schemes.split(","):
        scheme = Scheme.parse(name)
        t = time.time()
        q = quantize_model(copy.deepcopy(model), tok, scheme, calib, layer, ft,
                           cache_dir() / "bench_quality" / f"{name}{'_smoke' if a.smoke else ''}",
                           calibration_data=ids)
        rows.append({"method": "AQLM", "scheme": name, "bits": bits_summary(q)["avg_bits_quantized"],
                     "ppl": ppl(q), "seconds": round(time.time() - t, 1)})
        print(rows[-1], flush=True)
        del q
    for bits in [int(b) for b in a.bits.split(",")]:
        for method, fn in (("RTN", lambda m: rtn_model(m, bits, a.group_size)),
                           ("GPTQ", lambda m: gptq_model(m, ids, bits, a.group_size))):
            t = time.time()
            m = fn(copy.deepcopy(model))
            rows.append({"method": method, "scheme": f"int{bits}g{a.group_size}",
                         "bits": baseline_bits(bits, a.group_size), "ppl": ppl(m),
                         "seconds": round(time.time() - t, 1)})
            print(rows[-1], flush=True)
            del m
    data = {"model": a.model, "date": dt.datetime.now().isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "smoke": a.smoke, "eval_tokens": a.eval_tokens,
            "calibration": f"{calib.nsamples}x{calib.seqlen}", "finetune_epochs": ft.epochs,
            "load_average": os.getloadavg(), "rows": rows}
    stem = Path(a.out) / f"{dt.date.today().isoformat()}_cpu_quality{'_smoke' if a.smoke else ''}"
    save_report(stem, data, plot=lambda fig: _plot(fig, rows))
    for r in rows:
        print(f"{r['method']:<5} {r['scheme']:<10} {r['bits']:6.3f} bits  ppl {r['ppl']:10.3f}  {r['seconds']}s")
    print(f"wrote {stem}.json/.png")


def _plot(fig, rows: list[dict]) -> None:
    ax = fig.add_subplot(1, 1, 1)
    fp = next(r["ppl"] for r in rows if r["method"] == "fp32")
    for method, marker in (("AQLM", "o"), ("GPTQ", "s"), ("RTN", "^")):
        pts = sorted((r["bits"], r["ppl"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=method)
    ax.axhline(fp, color="gray", ls="--", label=f"fp32 ({fp:.2f})")
    ax.set(xlabel="average bits per weight (incl. codebooks/scales)", ylabel="perplexity (log)",
           yscale="log", title="SmolLM2-135M: quality vs bits")
    ax.legend()
    ax.grid(True, alpha=0.3)


if __name__ == "__main__":
    main()
