"""Calibration over torch.distributed vs one process: time per block and agreement of the results.

A Llama-2-7B-shaped model with random weights (``--blocks`` decoder blocks, fp16 on CUDA) is
quantized by ``quantize_model`` once as a plain process and once per ``--worlds`` entry under
torchrun (NCCL on CUDA, gloo on CPU), on the same random calibration tokens. Reported per scheme
and world size: seconds per block (from the checkpoint's per-block stats), their ratio to the single
process, and how far the quantized blocks differ.

GPU kernels (atomics in cuBLAS split-K, index_add) make two single-process runs differ too, and AQ
search is chaotic: one flipped code changes later ones. So ``--repeats R`` runs the sequence
(single, each world) R times interleaved, which measures single-vs-single agreement as the
baseline for dist-vs-single, and pools the timings (the steady ratio leaves out each run's block
0, which pays the process's warm-up). ``--deterministic`` runs every process with
``torch.use_deterministic_algorithms`` (warn only) and CUBLAS_WORKSPACE_CONFIG=:4096:8.
Writes benchmarks/results/<date>_<device>_dist_calibration_<schemes>_w<worlds>.json.
Usage: PYTHONPATH=src python benchmarks/dist_calibration.py [--worlds 1,2] [--schemes 2x8g8,1x16g8]
       [--repeats 2] [--deterministic] [--quick]   (--quick: a small model on the CPU over gloo)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SHAPES = {"llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000),
          "quick": dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4,
                        vocab_size=512)}


def build_model(shape: str, blocks: int, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=blocks, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def configs(args):
    from aqlmkit.config import CalibrationConfig, FinetuneConfig, LayerQuantConfig

    calib = CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen, device=args.device)
    layer = LayerQuantConfig(max_epochs=args.aq_epochs, steps_per_epoch=args.aq_steps, init_max_iter=20, beam_size=1)
    ft = FinetuneConfig(epochs=args.ft_epochs, lr=1e-4, batch_size=4, val_fraction=0.1)
    return calib, layer, ft


def worker(args) -> None:
    """One quantization run (a plain process, or one rank under torchrun)."""
    from safetensors.torch import save_file

    from aqlmkit.pipeline.distributed import Dist, launched
    from aqlmkit.pipeline.quantize import quantize_model

    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dist = Dist.from_env(args.device, 1800) if launched() else None
    device = str(dist.device) if dist is not None else args.device
    model = build_model(args.shape, args.blocks, device, torch.float16 if "cuda" in device else torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(1))
    calib, layer, ft = configs(args)
    t0 = time.time()
    quantize_model(model, None, args.scheme, calib, layer, ft, args.out / "wd", resume=False,
                   calibration_data=ids, progress=True, dist=dist)
    wall = time.time() - t0
    if dist is None or dist.is_main:
        stats = json.loads((args.out / "wd" / "manifest.json").read_text())["stats"]
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".layers." in k}
        save_file(state, str(args.out / "blocks.safetensors"))
        (args.out / "times.json").write_text(json.dumps({"wall": wall, "block_seconds": [s["seconds"] for s in stats],
                                                         "loss_after": [s["finetune_loss_after"] for s in stats]}))
    if dist is not None:
        dist.close()


def compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    sa, sb = load_file(str(a)), load_file(str(b))
    floats = [(sa[k].float() - sb[k].float()).abs().max().item() for k in sa if sa[k].is_floating_point()]
    codes = [k for k in sa if not sa[k].is_floating_point()]
    differ = sum(int((sa[k] != sb[k]).sum()) for k in codes)
    total = sum(sa[k].numel() for k in codes)
    return {"bit_identical": all(torch.equal(sa[k], sb[k]) for k in sa), "max_abs_float_diff": max(floats),
            "codes_differing_fraction": differ / max(total, 1)}


def run(args, scheme: str, world: int | None, root: Path, rep: int) -> dict:
    out = root / f"{scheme}_{world or 'single'}_{rep}"
    out.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable] if world is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={world}"]
    cmd = launch + [str(HERE), "--worker", "--scheme", scheme, "--out", str(out), *args.passthrough]
    t = time.time()
    print(f"--- {scheme} {'single process' if world is None else f'world {world}'} (run {rep})", flush=True)
    env = {**os.environ, **NO_MULTICAST, **({"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if args.deterministic else {})}
    p = subprocess.run(cmd, env=env)  # progress streams to this log
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed with exit status {p.returncode}")
    times = json.loads((out / "times.json").read_text())
    return {"world": world or 0, "process_seconds": round(time.time() - t, 1), **times, "dir": out}


def _steady(runs: list[dict]) -> list[float]:
    """Block seconds pooled over runs, without each run's block 0 (its process warm-up)."""
    return [t for r in runs for t in (r["block_seconds"][1:] if len(r["block_seconds"]) > 1 else r["block_seconds"])]


def _median(x: list[float]) -> float:
    x = sorted(x)
    return (x[(len(x) - 1) // 2] + x[len(x) // 2]) / 2


def summarize(scheme: str, world: int | None, singles: list[dict], others: list[dict]) -> dict:
    """One row: ``others`` (world ``world``, or the later single runs) against the first single run."""
    ref, others = singles[0], (others if world is not None else singles[1:])
    agree = [compare(ref["dir"] / "blocks.safetensors", o["dir"] / "blocks.safetensors") for o in others]
    mean = lambda x: sum(x) / len(x)  # noqa: E731
    row = {"scheme": scheme, "compared": f"world {world}" if world else "single (another run)",
           "world": world or 0, "single_block_seconds": [r["block_seconds"] for r in singles],
           "other_block_seconds": [r["block_seconds"] for r in others],
           "steady_median_ratio_other_over_single": _median(_steady(others)) / _median(_steady(singles)),
           "all_blocks_mean_ratio_other_over_single": mean([t for r in others for t in r["block_seconds"]])
           / mean([t for r in singles for t in r["block_seconds"]]),
           "loss_after_single": [r["loss_after"] for r in singles], "loss_after_other": [r["loss_after"] for r in others],
           "agreement_with_first_single": agree}
    print(f"{scheme} {row['compared']}: steady median {_median(_steady(others)):.1f} s/block vs single "
          f"{_median(_steady(singles)):.1f} (ratio {row['steady_median_ratio_other_over_single']:.3f}); "
          + "; ".join(f"bit-identical {a['bit_identical']}, max |dfloat| {a['max_abs_float_diff']:.2e}, codes differ "
                      f"{a['codes_differing_fraction']:.2e}" for a in agree), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--scheme", default="2x8g8")
    ap.add_argument("--schemes", default="2x8g8,1x16g8")
    ap.add_argument("--worlds", default="1")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--aq-epochs", type=int, default=2)
    ap.add_argument("--aq-steps", type=int, default=50)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.device, args.shape, args.nsamples, args.seqlen, args.blocks = "cpu", "quick", 16, 64, 2
    args.passthrough = ["--blocks", str(args.blocks), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                        "--aq-epochs", str(args.aq_epochs), "--aq-steps", str(args.aq_steps), "--ft-epochs",
                        str(args.ft_epochs), "--device", args.device, "--shape", args.shape,
                        *(["--deterministic"] if args.deterministic else [])]
    if args.worker:
        return worker(args)
    results = []
    worlds = [int(x) for x in args.worlds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            runs = {w: [] for w in [None, *worlds]}
            for rep in range(args.repeats):
                for w in runs:
                    runs[w].append(run(args, scheme, w, Path(tmp), rep))
            results += [summarize(scheme, w, runs[None], runs[w]) for w in [None, *worlds]
                        if w is not None or args.repeats > 1]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    record = {"device": dev, "date": dt.date.today().isoformat(), "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "passthrough", "scheme")},
              "rows": results}
    name = f"{dt.date.today().isoformat()}_{dev.replace(' ', '_')}_dist_calibration_{args.schemes.replace(',', '+')}_w{args.worlds.replace(',', '+')}{'_quick' if args.quick else ''}.json"
    path = HERE.parent / "results" / name
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from aqlmkit.utils import atomic_save_json

    atomic_save_json(path, record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
