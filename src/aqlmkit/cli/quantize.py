"""`aqlmkit quantize`: AQLM-quantize a model (default: the embedded SmolLM2-135M) and report PPL."""
from __future__ import annotations

import argparse

from aqlmkit.cli._common import add_dist_args, add_model_args, add_overwrite_arg, maybe_relaunch
from aqlmkit.app.recipes import RECIPES
from aqlmkit.config import PRESETS

# flag dest -> (config section, field); only flags the user gives override the config file.
_FLAGS = {
    "dataset": ("calibration", "dataset"), "nsamples": ("calibration", "nsamples"),
    "seqlen": ("calibration", "seqlen"), "offload": ("calibration", "offload_activations"),
    "seed": ("calibration", "seed"), "beam_size": ("layer", "beam_size"), "epochs": ("layer", "max_epochs"),
    "steps_per_epoch": ("layer", "steps_per_epoch"), "lr": ("layer", "lr"),
    "init_iters": ("layer", "init_max_iter"), "finetune_epochs": ("finetune", "epochs"),
    "finetune_lr": ("finetune", "lr"), "global_steps": ("global", "steps"), "global_lr": ("global", "lr"),
    "pv_steps": ("pv", "steps"),
}


def register(sub) -> None:
    p = sub.add_parser("quantize", help="AQLM-quantize a model, save it in the AQLM HF format, report PPL",
                       description="Block-by-block AQLM calibration, then global KL fine-tuning and "
                                   "PV-tuning (every stage resumable: rerun the same command after an "
                                   "interruption). The default recipe 'quick' fits the embedded 135M model on "
                                   "2 CPU cores in about 15 minutes; 'standard' is the GPU recipe.")
    add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="output folder (AQLM HF format)")
    add_overwrite_arg(p)
    p.add_argument("--scheme", default=None,
                   help=f"KxB[gG], e.g. 2x8g8 (default) or a preset: {', '.join(PRESETS)}")
    p.add_argument("--recipe", default="quick", choices=sorted(RECIPES),
                   help="named settings for the whole job (default quick; standard for GPUs)")
    p.add_argument("--config", help="JSON file overriding recipe sections: {scheme, calibration, layer, "
                                    "finetune, global, pv, eval} (null disables global/pv)")
    g = p.add_argument_group("calibration")
    g.add_argument("--dataset", help="calibration corpus (default: the embedded default text)")
    g.add_argument("--nsamples", type=int, help="calibration sequences (default 16)")
    g.add_argument("--seqlen", type=int, help="tokens per calibration sequence (default 512)")
    g.add_argument("--offload", action="store_true", default=None, help="keep activations on CPU")
    g.add_argument("--skip", help="comma-separated linears to keep in full precision (e.g. down_proj)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("layer optimisation (AQ)")
    g.add_argument("--beam-size", type=int)
    g.add_argument("--epochs", type=int, help="max AQ epochs per layer (default 4)")
    g.add_argument("--steps-per-epoch", type=int, help="codebook Adam steps per epoch (default 20)")
    g.add_argument("--lr", type=float, help="codebook Adam learning rate")
    g.add_argument("--init-iters", type=int, help="k-means iterations of the codebook init (default 10)")
    g = p.add_argument_group("block fine-tuning")
    g.add_argument("--finetune-epochs", type=int, help="0 disables (default 1)")
    g.add_argument("--finetune-lr", type=float)
    g = p.add_argument_group("global fine-tuning and PV-tuning")
    g.add_argument("--global-steps", type=int, help="KL distillation steps of the whole model")
    g.add_argument("--global-lr", type=float)
    g.add_argument("--pv-steps", type=int, help="steps of the PV-tuning stage (P-steps + V-steps on codes)")
    g.add_argument("--no-global", action="store_true", help="skip global fine-tuning and PV-tuning")
    g.add_argument("--no-pv", action="store_true", help="skip the PV-tuning stage")
    g = p.add_argument_group("run")
    g.add_argument("--work-dir", help="resume state folder (default: in the aqlmkit cache)")
    g.add_argument("--fresh", action="store_true", help="discard a previous run's checkpoint")
    g.add_argument("--eval-dataset", help="in-domain eval corpus (default: default)")
    g.add_argument("--ood-dataset", help="out-of-domain eval corpus (default: ood; 'none' skips it)")
    g.add_argument("--eval-tokens", type=int, help="PPL token budget per corpus (0: whole text)")
    g.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    g.add_argument("--baselines", action="store_true", help="add RTN and GPTQ rows at about the same bits")
    add_dist_args(p)
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict[str, dict]:
    out: dict[str, dict] = {"calibration": {"device": args.device,
                                            "dtype": "float32" if args.dtype == "auto" else args.dtype}}
    for dest, (section, name) in _FLAGS.items():
        v = getattr(args, dest)
        if v is not None:
            out.setdefault(section, {})[name] = v
    if args.skip is not None:
        out["calibration"]["skip"] = [s.strip() for s in args.skip.split(",") if s.strip()]
    ev = {}
    if args.eval_dataset is not None:
        ev["dataset"] = args.eval_dataset
    if args.ood_dataset is not None:
        ev["ood_dataset"] = None if args.ood_dataset.lower() == "none" else args.ood_dataset
    if args.eval_tokens is not None:
        ev["tokens"] = args.eval_tokens or None
    if ev:
        out["eval"] = ev
    if args.scheme is not None:
        out["scheme"] = args.scheme
    if args.baselines:
        out["baselines"] = True
    if args.no_pv or args.no_global:
        out["pv"] = None
    if args.no_global:
        out["global"] = None
    return out


def run(args) -> int:
    from aqlmkit.app.job import check_recipe_device, format_table, run_job
    from aqlmkit.app.recipes import build_recipe, load_config_file

    recipe = build_recipe(args.recipe, load_config_file(args.config), _overrides(args))
    check_recipe_device(recipe)
    code = maybe_relaunch(args)
    if code is not None:
        return code
    rows = run_job(args.model, args.output, recipe, args.work_dir, fresh=args.fresh, dtype=args.dtype,
                   evaluate=not args.no_eval, overwrite=args.overwrite, dist_timeout=args.dist_timeout)
    if rows is None:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    print(format_table(rows))
    print(f"saved {args.output}")
    return 0
