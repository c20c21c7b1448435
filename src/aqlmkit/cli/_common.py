"""Arguments several subcommands share, defined once."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="default",
                   help="HF folder, AQLM checkpoint, .gguf file, hub id, or 'default' "
                        "(embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: float32 on CPU, float16 on CUDA)")
