"""Arguments several subcommands share, defined once."""
from __future__ import annotations

import argparse

from aqlmkit.dtypes import NAMES as DTYPE_NAMES


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="default",
                   help="HF folder, AQLM checkpoint, .gguf file, hub id, or 'default' "
                        "(embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="compute dtype (auto: float32 on CPU, float16 on CUDA)")


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT if it is an aqlmkit output of the same kind (anything else is "
                        "never replaced)")


def check_positive(**values: int | None) -> None:
    """One clear line for a count flag below 1 (``--batch-size 0``, ``--iters -1``)."""
    from aqlmkit.errors import AqlmkitError

    for flag, v in values.items():
        if v is not None and v < 1:
            raise AqlmkitError(f"--{flag.replace('_', '-')} must be >= 1 (got {v})")


def add_dist_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (torch.distributed)")
    g.add_argument("--nproc", type=int, help="run as N processes on this machine (one per GPU), via "
                                              "torchrun; for several machines call torchrun -m aqlmkit")
    g.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds a rank may lag before the job stops naming it (default 1800)")


def maybe_relaunch(args: argparse.Namespace) -> int | None:
    """With ``--nproc N``: the exit status of the torchrun workers running this command, else None."""
    if args.nproc is None:
        return None
    from aqlmkit.app.launch import relaunch

    return relaunch(args.nproc, args.argv)
