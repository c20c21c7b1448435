"""`aqlmkit serve` throughput: the AQLM checkpoint vs the same server on the dense model, one run.

    PYTHONPATH=src python benchmarks/serve_throughput.py [--model default|llama2-7b-random]
        [--device cpu|cuda] [--scheme 2x8g8] [--concurrency 1 4 16 32] [--max-tokens 64]
        [--prompt-tokens 32] [--rounds 2] [--compile] [--threads N] [--variants dense aqlm]

For each variant a real server (runtime.Engine + the FastAPI app under uvicorn, on a free loopback
port) is started; at each concurrency level C, ``rounds`` x C streaming completions (fixed length:
``ignore_eos``) are sent by C client threads at once, over plain HTTP (stdlib), and timed:
output tokens/s (all tokens / wall time), time to first token (p50/p99) and per-token latency
(gaps between a stream's tokens, p50/p99). The AQLM model has random codes (speed only: the same
work as trained codes) and goes through save + aqlmkit.load like a user's checkpoint. Writes
benchmarks/results/<date>_<device>_serve_throughput.json with the device, date, settings and
load average (the CPU machine is shared).

``--model llama2-7b-random``: a Llama-2-7B-shaped model (random weights, fp16, no download) with a
byte-level tokenizer built in place; for the GPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from aqlmkit.utils import atomic_save_json

RESULTS = Path(__file__).resolve().parent / "results"


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer (plus eos), for models shipped without one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def llama2_7b_random(device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), byte_tokenizer(), "Llama-2-7B-shaped Llama, random weights"


def dense_model(name: str, device: str, dtype: str):
    import aqlmkit

    if name == "llama2-7b-random":
        return llama2_7b_random(device, torch.float16 if dtype == "auto" else getattr(torch, dtype))
    model, tok = aqlmkit.load(name, device=device, dtype=dtype)
    return model.eval(), tok, "embedded SmolLM2-135M-Instruct" if name == "default" else name


def aqlm_model(dense, scheme: str, device: str):
    """Random-code AQLM copy of ``dense`` (every block linear), saved and loaded as a user would."""
    import tempfile

    import aqlmkit
    from aqlmkit.cli._bench_models import quantize_random
    from aqlmkit.config import Scheme

    s = Scheme.parse(scheme)
    with tempfile.TemporaryDirectory(prefix="aqlmkit-serve-bench-") as tmp:
        aqlmkit.save(quantize_random(dense.cpu() if device == "cpu" else dense, s, official=False),
                     None, Path(tmp) / "q", s)
        model, _ = aqlmkit.load(Path(tmp) / "q", device=device)
    return model.eval()


def stream_one(port: int, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
    """One streaming completion; (send time, arrival time of each token)."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True, "return_token_ids": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    arrivals = []
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        now = time.perf_counter()
        arrivals += [now] * len(json.loads(data)["choices"][0].get("token_ids", []))
    conn.close()
    return t0, arrivals


def run_level(port: int, conc: int, rounds: int, prompt_tokens: int, max_tokens: int, vocab: int) -> dict:
    """``rounds * conc`` requests from ``conc`` client threads at once; latency and throughput."""
    results: list[tuple[float, list[float]]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(rounds):
            g = torch.Generator().manual_seed(1000 * i + r)
            prompt = torch.randint(10, vocab, (prompt_tokens,), generator=g).tolist()
            out = stream_one(port, prompt, max_tokens)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(len(a) for _, a in results)
    ttft = [a[0] - s for s, a in results if a]
    gaps = [b - a for _, arr in results for a, b in zip(arr, arr[1:])]
    return {"concurrency": conc, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall, **_pcts("ttft_s", ttft), **_pcts("tpot_s", gaps)}


def _pcts(name: str, xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {f"{name}_p50": statistics.median(xs), f"{name}_p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))]}


def bench_variant(model, tok, args) -> dict:
    from aqlmkit.runtime import Engine
    from aqlmkit.runtime.api import ServerConfig
    from aqlmkit.runtime.server import BackgroundServer

    ctx = args.prompt_tokens + args.max_tokens + 1
    engine = Engine(model, tok, max_batch=max(args.concurrency), context=ctx, compile=args.compile,
                    max_queue=4 * max(args.concurrency), prefill_chunk=256)
    vocab = min(model.config.vocab_size, len(tok))
    out = {}
    with BackgroundServer(engine, tok, ServerConfig("bench", max_tokens_limit=args.max_tokens)) as url:
        port = int(url.rsplit(":", 1)[1])
        t = time.perf_counter()
        stream_one(port, list(range(10, 10 + args.prompt_tokens)), args.max_tokens)  # warm-up
        out["warmup_s"] = time.perf_counter() - t
        for conc in args.concurrency:
            if args.compile:  # compile this level's batch bucket outside the timed rounds
                run_level(port, conc, 1, args.prompt_tokens, min(8, args.max_tokens), vocab)
            row = run_level(port, conc, args.rounds, args.prompt_tokens, args.max_tokens, vocab)
            print(f"  c={conc:3d}  {row['output_tok_s']:8.1f} tok/s  ttft p50 {row['ttft_s_p50']*1e3:7.1f} ms "
                  f"p99 {row['ttft_s_p99']*1e3:7.1f} ms  tpot p50 {row['tpot_s_p50']*1e3:6.1f} ms "
                  f"p99 {row['tpot_s_p99']*1e3:6.1f} ms", flush=True)
            out[str(conc)] = row
    out["decode_steps"] = engine.steps
    return out


def _commit() -> str:
    """The code that ran: git commit, '+dirty' when the tree had uncommitted changes."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def machine(device: str) -> dict:
    info = {"commit": _commit(), "device": device, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "loadavg": list(os.getloadavg()),
            "date": dt.datetime.now().isoformat(timespec="seconds")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="default (embedded SmolLM2), llama2-7b-random, or a path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="dense model dtype (auto: fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--scheme", default="2x8g8")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="requests per client thread per level")
    p.add_argument("--compile", action="store_true", help="serve with --compile (per-bucket graphs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--variants", nargs="+", default=["dense", "aqlm"], choices=["dense", "aqlm"])
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<date>_<dev>_serve_throughput.json)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    info = machine(a.device)
    dense, tok, desc = dense_model(a.model, a.device, a.dtype)
    report = {"machine": info, "model": desc, "scheme": a.scheme,
              "aqlm_checkpoint": "random codes (benchmarks' quantize_random), saved and loaded with aqlmkit.save/load",
              "settings": {k: v for k, v in vars(a).items() if k != "out"},
              "server": "aqlmkit.runtime Engine (continuous batching, max_batch = max concurrency) + FastAPI/uvicorn, "
                        "clients: stdlib HTTP threads on the same machine, streaming, ignore_eos",
              "variants": {}}
    dense_dtype = str(next(dense.parameters()).dtype)
    for v in a.variants:
        model = dense if v == "dense" else aqlm_model(dense, a.scheme, a.device)
        print(f"{v} ({dense_dtype if v == 'dense' else a.scheme}):", flush=True)
        report["variants"][v] = {"weights": dense_dtype if v == "dense" else a.scheme, **bench_variant(model, tok, a)}
    if {"dense", "aqlm"} <= set(report["variants"]):
        d, q = report["variants"]["dense"], report["variants"]["aqlm"]
        report["aqlm_over_dense_tok_s"] = {str(c): q[str(c)]["output_tok_s"] / d[str(c)]["output_tok_s"]
                                           for c in a.concurrency}
        print("aqlm / dense tok/s:", {k: round(x, 2) for k, x in report["aqlm_over_dense_tok_s"].items()})
    info["loadavg_end"] = list(os.getloadavg())
    tag = "cpu" if a.device == "cpu" else torch.cuda.get_device_name(0).replace(" ", "_")
    out = Path(a.out) if a.out else RESULTS / f"{dt.date.today().isoformat()}_{tag}_serve_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(out, report)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
