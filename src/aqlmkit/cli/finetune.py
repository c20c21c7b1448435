"""`aqlmkit finetune`: distil an AQLM checkpoint from its fp teacher (P-steps + PV-tuning V-steps)."""
from __future__ import annotations

from aqlmkit.cli._common import add_model_args, add_overwrite_arg


def register(sub) -> None:
    p = sub.add_parser("finetune", help="global fine-tuning / PV-tuning of an AQLM checkpoint",
                       description="End-to-end KL distillation of a quantized model (--model) from its "
                                   "full-precision teacher; V-steps (PV-tuning) also update the codes.")
    add_model_args(p)
    p.add_argument("--teacher", default="default", help="fp teacher (default: the embedded model)")
    p.add_argument("-o", "--output", required=True, help="output folder (AQLM HF format)")
    add_overwrite_arg(p)
    p.add_argument("--dataset", default="default", help="training corpus (calibration split)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5, help="Adam lr of the P-step")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pv", action="store_true", help="P-steps only (no code updates)")
    p.add_argument("--v-lr", type=float, default=0.3, help="V-step size, in units of rms(W)")
    p.add_argument("--v-max-change", type=float, default=0.05, help="max fraction of codes changed per V-step")
    p.add_argument("--v-every", type=int, default=10, help="P-steps between V-steps")
    p.set_defaults(func=run)


def run(args) -> int:
    from aqlmkit.config import FinetuneConfig
    from aqlmkit.data.calibration import calibration_batches
    from aqlmkit.errors import AqlmkitError
    from aqlmkit.formats.aqlm_hf import check_output_dir, save_quantized
    from aqlmkit.formats.loading import load_model
    from aqlmkit.nn import QuantizedLinear
    from aqlmkit.pipeline.finetune_global import finetune_global
    from aqlmkit.pipeline.pv_tuning import VStepConfig

    check_output_dir(args.output, overwrite=args.overwrite, sources=[args.model, args.teacher])
    student, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    layers = [m for m in student.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise AqlmkitError(f"{args.model} is not an AQLM checkpoint (no quantized layers): quantize it "
                           "first with `aqlmkit quantize`")
    teacher, _ = load_model(args.teacher, device=args.device, dtype=args.dtype)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise AqlmkitError(f"teacher vocab {teacher.config.vocab_size} != student vocab "
                           f"{student.config.vocab_size}: give the fp model the student was quantized from")
    ids = calibration_batches(tok, args.dataset, args.nsamples, args.seqlen, args.seed)
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    v = None if args.no_pv else VStepConfig(args.v_lr, args.v_max_change, args.v_every)
    st = finetune_global(student, teacher, ids, cfg, args.device, v_step=v)
    save_quantized(student, tok, args.output, layers[0].scheme,
                   card={"finetune": f"KL distillation{'' if v is None else ' + PV-tuning'}, "
                                     f"{args.nsamples}x{args.seqlen} tokens, {st.steps} steps"},
                   overwrite=args.overwrite)
    print(f"KL(teacher||student): {st.kl_before:.5f} -> {st.kl_after:.5f} "
          f"({st.steps} steps, {st.codes_changed} code groups changed)")
    print(f"saved {args.output}")
    return 0
