"""`aqlmkit finetune`: distil an AQLM checkpoint from its fp teacher (P-steps, then PV-tuning)."""
from __future__ import annotations

import argparse
from pathlib import Path

from aqlmkit.app.recipes import RECIPES
from aqlmkit.cli._common import add_dist_args, add_model_args, add_overwrite_arg, maybe_relaunch

# flag dest -> (recipe section, field); only flags the user gives override the recipe.
_FLAGS = {
    "dataset": ("calibration", "dataset"), "nsamples": ("global", "nsamples"), "seqlen": ("global", "seqlen"),
    "val_samples": ("global", "val_samples"), "steps": ("global", "steps"), "lr": ("global", "lr"),
    "batch_size": ("global", "batch_size"), "eval_every": ("global", "eval_every"),
    "seed": ("global", "seed"), "pv_steps": ("pv", "steps"),
}
_V_FLAGS = {"code_lr": "code_lr", "max_change": "max_change", "trust_ratio": "trust_ratio",
            "beam_size": "beam_size"}


def register(sub) -> None:
    p = sub.add_parser("finetune", help="global fine-tuning / PV-tuning of an AQLM checkpoint",
                       description="End-to-end KL distillation of a quantized model (--model) from its "
                                   "full-precision teacher (P-steps), then PV-tuning (V-steps also update the "
                                   "codes). Held-out KL is checked every --eval-every steps: worse rounds are "
                                   "rolled back and the best state is saved. Resumable.")
    add_model_args(p)
    p.add_argument("--teacher", default="default", help="fp teacher (default: the embedded model)")
    p.add_argument("-o", "--output", required=True, help="output folder (AQLM HF format)")
    add_overwrite_arg(p)
    p.add_argument("--recipe", default="quick", choices=sorted(RECIPES),
                   help="defaults of the global and pv sections (default quick)")
    p.add_argument("--dataset", help="training corpus (its calibration split)")
    p.add_argument("--nsamples", type=int, help="training windows")
    p.add_argument("--val-samples", type=int, help="held-out windows for the KL check")
    p.add_argument("--seqlen", type=int)
    p.add_argument("--steps", type=int, help="P-step (global) stage steps")
    p.add_argument("--pv-steps", type=int, help="PV stage steps")
    p.add_argument("--lr", type=float, help="Adam lr of the P-step")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int, help="steps between held-out checks (and V-steps)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-pv", action="store_true", help="P-steps only (no code updates)")
    p.add_argument("--code-lr", type=float, help="relative step of the straight-through weights per step")
    p.add_argument("--max-change", type=float, help="max fraction of code groups one V-step changes")
    p.add_argument("--trust-ratio", type=float, help="max ||dW||/||W|| of one V-step")
    p.add_argument("--beam-size", type=int, help="beam of the V-step's code search")
    p.add_argument("--work-dir", help="resume state folder (default: in the aqlmkit cache)")
    p.add_argument("--fresh", action="store_true", help="discard a previous run's resume state")
    add_dist_args(p)
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict:
    out: dict = {"calibration": {"device": args.device}}
    for dest, (section, name) in _FLAGS.items():
        v = getattr(args, dest)
        if v is not None:
            out.setdefault(section, {})[name] = v
    v = {k: getattr(args, d) for d, k in _V_FLAGS.items() if getattr(args, d) is not None}
    if v:
        out.setdefault("pv", {})["v"] = v
    if args.no_pv:
        out["pv"] = None
    return out


def run(args) -> int:
    from aqlmkit.app.finetune_job import run_finetune_job
    from aqlmkit.app.job import check_recipe_device, default_work_dir
    from aqlmkit.app.recipes import build_recipe

    recipe = build_recipe(args.recipe, None, _overrides(args))
    check_recipe_device(recipe)
    code = maybe_relaunch(args)
    if code is not None:
        return code
    wd = Path(args.work_dir) if args.work_dir else default_work_dir(args.output) / "finetune"
    stats = run_finetune_job(args.model, args.teacher, args.output, recipe, wd, fresh=args.fresh,
                             dtype=args.dtype, overwrite=args.overwrite, dist_timeout=args.dist_timeout)
    if stats is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    for s in stats:
        print(f"{s['stage']:>6}: held-out KL {s['kl_before']:.5f} -> {s['kl_after']:.5f} ({s['steps']} steps, "
              f"{s['codes_changed']} code groups changed, {s['v_kept']} V-steps kept / {s['v_undone']} undone, "
              f"{s['rollbacks']} rollbacks)")
    print(f"saved {args.output}")
    return 0
