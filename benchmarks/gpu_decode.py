"""End-to-end batch-1 decode tokens/s of a Llama-2-7B-shaped model: fp16 vs AQLM 2x8g8 / 1x16g8.

A plain-PyTorch Llama block stack (32 layers, 4096/11008, 32 heads, RoPE, RMSNorm, SwiGLU, static
KV cache) with random weights built directly on the GPU. One decode step (embedding -> 32 blocks ->
lm_head -> argmax fed back as the next token) is captured in a CUDA graph and replayed, so the
numbers measure kernels, not Python. The AQLM variants swap every block linear for
aqlmkit.nn.QuantizedLinear with random codes (lm_head and embeddings stay fp16, as in AQLM models).
With --compile the step is also compiled by torch.compile (fullgraph; inductor fuses the norms,
RoPE and SwiGLU elementwise work; our kernels stay opaque custom ops) before it is captured, which
is closer to a tuned runtime (gpt-fast) than the eager step. Both runs go in the JSON.
Writes benchmarks/results/<date>_<device>_gpu_decode.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aqlmkit.utils import atomic_save_json

HID, INTER, LAYERS, HEADS, VOCAB, MAXLEN = 4096, 11008, 32, 32, 32000, 512
LINEARS = {"q": (HID, HID), "k": (HID, HID), "v": (HID, HID), "o": (HID, HID),
           "gate": (HID, INTER), "up": (HID, INTER), "down": (INTER, HID)}


def make_linear(in_f: int, out_f: int, scheme: str | None) -> nn.Module:
    if scheme is None:
        lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.float16)
        nn.init.normal_(lin.weight, std=in_f ** -0.5)
        return lin
    from aqlmkit.nn import QuantizedLinear

    q = QuantizedLinear(in_f, out_f, scheme, device="cuda", dtype=torch.float16)
    info = torch.iinfo(q.codes.dtype)
    k = q.codebooks.shape[0]
    nbits = q.codebooks.shape[1].bit_length() - 1
    lo = info.min if nbits == info.bits else 0
    q.codes.data.copy_(torch.randint(lo, lo + (1 << nbits), q.codes.shape, device="cuda"))
    q.codebooks.data.normal_(std=(in_f * k) ** -0.5)
    q.scales.data.uniform_(0.8, 1.2)
    return q


class Block(nn.Module):
    def __init__(self, scheme: str | None):
        super().__init__()
        self.lin = nn.ModuleDict({n: make_linear(i, o, scheme) for n, (i, o) in LINEARS.items()})
        self.n1 = nn.Parameter(torch.ones(HID, device="cuda", dtype=torch.float16))
        self.n2 = nn.Parameter(torch.ones(HID, device="cuda", dtype=torch.float16))
        shape = (1, HEADS, MAXLEN, HID // HEADS)
        self.kc = torch.zeros(shape, device="cuda", dtype=torch.float16)
        self.vc = torch.zeros(shape, device="cuda", dtype=torch.float16)

    def forward(self, h, pos, cos, sin, mask):
        L, d = self.lin, HID // HEADS
        x = F.rms_norm(h, (HID,), self.n1, 1e-5)
        q, k, v = (L[n](x).view(1, 1, HEADS, d).transpose(1, 2) for n in "qkv")
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.kc.index_copy_(2, pos, k)
        self.vc.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, self.kc, self.vc, attn_mask=mask)
        h = h + L["o"](a.transpose(1, 2).reshape(1, 1, HID))
        x = F.rms_norm(h, (HID,), self.n2, 1e-5)
        return h + L["down"](F.silu(L["gate"](x)) * L["up"](x))


def rope(t, cos, sin):
    t1, t2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-t2, t1), dim=-1) * sin


class Model(nn.Module):
    def __init__(self, scheme: str | None):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HID, device="cuda", dtype=torch.float16)
        self.blocks = nn.ModuleList(Block(scheme) for _ in range(LAYERS))
        self.head = nn.Linear(HID, VOCAB, bias=False, device="cuda", dtype=torch.float16)
        nn.init.normal_(self.head.weight, std=HID ** -0.5)
        d = HID // HEADS
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
        ang = torch.outer(torch.arange(MAXLEN, device="cuda").float(), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.cos, self.sin = ang.cos().half(), ang.sin().half()
        self.ar = torch.arange(MAXLEN, device="cuda")

    def step(self, tok, pos):
        """One decode step in place: tok <- argmax(logits), pos <- pos + 1 (graph-capturable)."""
        h = self.emb(tok).view(1, 1, HID)
        cos, sin = self.cos[pos].view(1, 1, 1, -1), self.sin[pos].view(1, 1, 1, -1)
        mask = (self.ar <= pos).view(1, 1, 1, MAXLEN)
        for b in self.blocks:
            h = b(h, pos, cos, sin, mask)
        logits = self.head(F.rms_norm(h, (HID,), None, 1e-5))
        tok.copy_(logits.view(-1).argmax().view(1))
        pos.add_(1)


def kernel_census(model: nn.Module, tok: torch.Tensor, pos: torch.Tensor, top: int = 8) -> dict:
    """GPU kernels one decode step launches (count, total us, the costliest names): what the
    step spends outside the linears is what caps the end-to-end ratio."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.step(tok, pos)
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.count]
    evs.sort(key=lambda e: -e.device_time_total)
    return {"kernels": sum(e.count for e in evs),
            "us": round(sum(e.device_time_total for e in evs), 1),
            "top": [(e.key[:60], e.count, round(e.device_time_total, 1)) for e in evs[:top]]}


@torch.inference_mode()
def tokens_per_s(scheme: str | None, steps: int, compile_step: bool = False,
                 census: dict | None = None, fuse: bool = False) -> float:
    model = Model(scheme)
    if fuse:  # q/k/v and gate/up as one launch each (aqlmkit.nn.fused)
        from aqlmkit.nn.fused import fuse_siblings

        assert fuse_siblings(model, groups=(("q", "k", "v"), ("gate", "up"))) == 2 * LAYERS
    if compile_step:  # the whole step as one graph; fullgraph: a graph break is an error
        model.step = torch.compile(model.step, fullgraph=True, dynamic=False)
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.step(tok, pos)
    torch.cuda.current_stream().wait_stream(s)
    if census is not None:
        census.update(kernel_census(model, tok, pos))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model.step(tok, pos)
    pos.zero_()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    pos.zero_()
    t0 = time.perf_counter()
    for _ in range(steps):
        g.replay()
    torch.cuda.synchronize()
    tps = steps / (time.perf_counter() - t0)
    del g, model
    torch.cuda.empty_cache()
    return tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--schemes", default="2x8g8,2x8g8+fused,1x16g8,1x16g8+fused",
                    help="comma list; NAME+fused groups q/k/v and gate/up into one launch each")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd step")
    ap.add_argument("--census", action="store_true", help="profile one step: kernels launched")
    args = ap.parse_args()
    assert args.steps < MAXLEN - 10
    torch.manual_seed(0)
    data = {"device": torch.cuda.get_device_name(0), "date": dt.date.today().isoformat(),
            "model": "llama-2-7b-shaped, random weights", "batch": 1}
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        res, census = {}, {}
        for sch in ["fp16", *args.schemes.split(",")]:
            census[sch] = {}
            base, fuse = sch.removesuffix("+fused"), sch.endswith("+fused")
            try:
                res[sch] = tokens_per_s(None if sch == "fp16" else base, args.steps, mode == "compiled",
                                        census[sch] if args.census else None, fuse=fuse)
            except Exception as e:  # noqa: BLE001 - record the failure, keep measuring the rest
                print(f"[{mode}] {sch} FAILED: {type(e).__name__}: {str(e)[:600]}", flush=True)
                data.setdefault("failures", {})[f"{mode}/{sch}"] = f"{type(e).__name__}: {str(e)[:600]}"
                res[sch] = float("nan")
                continue
            print(f"[{mode}] {sch}: {res[sch]:.1f} tok/s = {res[sch] / res['fp16']:.2f}x fp16", flush=True)
            if args.census:
                print(f"    one step: {census[sch]['kernels']} kernels, {census[sch]['us']} us of "
                      f"kernel time; top: {census[sch]['top'][:4]}", flush=True)
        key = "" if mode == "eager" else "compiled_"
        data[f"{key}tokens_per_s"] = res
        data[f"{key}speedup_vs_fp16"] = {k: v / res["fp16"] for k, v in res.items()}
        if args.census:
            data[f"{key}kernel_census"] = census
    name, date = data["device"], data["date"]
    out = Path(args.out) / f"{date}_{name.replace(' ', '_')}_gpu_decode.json"
    atomic_save_json(out, data)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
