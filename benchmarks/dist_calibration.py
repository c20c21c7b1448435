"""Calibration over torch.distributed vs one process: time per block and agreement of the results.

A Llama-2-7B-shaped model with random weights (``--blocks`` decoder blocks, fp16 on CUDA) is
quantized by ``quantize_model`` once as a plain process and once per ``--worlds`` entry under
torchrun (NCCL on CUDA, gloo on CPU), on the same random calibration tokens. Reported per scheme
and world size: seconds per block (from the checkpoint's per-block stats), their ratio to the single
process, and how far the quantized blocks differ (world 1 must be bit-identical).
Writes benchmarks/results/<date>_<device>_dist_calibration.json.
Usage: PYTHONPATH=src python benchmarks/dist_calibration.py [--worlds 1,2] [--schemes 2x8g8,1x16g8]
       [--quick]   (--quick: a small model on the CPU over gloo, to check the script)
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


def run(args, scheme: str, world: int | None, root: Path) -> dict:
    out = root / f"{scheme}_{world or 'single'}"
    out.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable] if world is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={world}"]
    cmd = launch + [str(HERE), "--worker", "--scheme", scheme, "--out", str(out), *args.passthrough]
    t = time.time()
    print(f"--- {scheme} {'single process' if world is None else f'world {world}'}", flush=True)
    p = subprocess.run(cmd, env={**os.environ, **NO_MULTICAST})  # progress streams to this log
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed with exit status {p.returncode}")
    times = json.loads((out / "times.json").read_text())
    return {"world": world or 0, "process_seconds": round(time.time() - t, 1), **times, "dir": out}


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
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.device, args.shape, args.nsamples, args.seqlen, args.blocks = "cpu", "quick", 16, 64, 2
    args.passthrough = ["--blocks", str(args.blocks), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                        "--aq-epochs", str(args.aq_epochs), "--aq-steps", str(args.aq_steps), "--ft-epochs",
                        str(args.ft_epochs), "--device", args.device, "--shape", args.shape]
    if args.worker:
        return worker(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            single = run(args, scheme, None, Path(tmp))
            for w in [int(x) for x in args.worlds.split(",")]:
                r = run(args, scheme, w, Path(tmp))
                agree = compare(single["dir"] / "blocks.safetensors", r["dir"] / "blocks.safetensors")
                mean = lambda x: sum(x["block_seconds"]) / len(x["block_seconds"])  # noqa: E731
                row = {"scheme": scheme, "world": w, "single_block_seconds": single["block_seconds"],
                       "dist_block_seconds": r["block_seconds"], "single_wall": single["wall"], "dist_wall": r["wall"],
                       "block_time_ratio_dist_over_single": mean(r) / mean(single),
                       "loss_after_single": single["loss_after"], "loss_after_dist": r["loss_after"], **agree}
                print(f"{scheme} world {w}: {mean(r):.1f} s/block vs single {mean(single):.1f} "
                      f"(ratio {row['block_time_ratio_dist_over_single']:.3f}); bit-identical {agree['bit_identical']}, "
                      f"max |dfloat| {agree['max_abs_float_diff']:.2e}, codes differ {agree['codes_differing_fraction']:.2e}",
                      flush=True)
                results.append(row)
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
