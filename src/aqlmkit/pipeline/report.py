"""Per-block statistics of a quantization run: JSON for machines, a PNG for people."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from aqlmkit.config import Scheme
from aqlmkit.nn import QuantizedLinear


def bits_summary(model: nn.Module) -> dict:
    """Average bits per weight over quantized linears (codebooks + scales included) and whole model
    (everything else counted at 16 bits, as it is stored in fp16)."""
    q_bits = q_n = other = 0.0
    seen = set()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            n = m.in_features * m.out_features
            q_bits += m.bits_per_weight * n
            q_n += n
            if m.bias is not None:
                other += m.bias.numel()
            seen.update(id(p) for p in m.parameters())
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            other += p.numel()
    return {"avg_bits_quantized": q_bits / q_n if q_n else 16.0,
            "avg_bits_model": (q_bits + 16 * other) / (q_n + other) if q_n + other else 16.0,
            "quantized_params": int(q_n), "other_params": int(other)}


def _plot(stats: list[dict]):
    """A ``save_report`` plot callable: layer errors per block, fine-tune loss before/after."""
    return lambda fig: _draw(fig, stats)


def _draw(fig, stats: list[dict]) -> None:
    fig.set_size_inches(11, 4)
    a, b = fig.subplots(1, 2)
    names = sorted({s["name"].split(".")[-1] for st in stats for s in st["linears"]})
    for n in names:
        xs = [st["block"] for st in stats for s in st["linears"] if s["name"].endswith("." + n)]
        ys = [s["rel_error"] for st in stats for s in st["linears"] if s["name"].endswith("." + n)]
        a.plot(xs, ys, marker=".", label=n)
    a.set(xlabel="block", ylabel="relative error tr(ΔHΔᵀ)/tr(WHWᵀ)", title="layer error", yscale="log")
    a.legend(fontsize=7)
    blocks = [st["block"] for st in stats]
    b.plot(blocks, [st["finetune_loss_before"] for st in stats], marker=".", label="before")
    b.plot(blocks, [st["finetune_loss_after"] for st in stats], marker=".", label="after")
    b.set(xlabel="block", ylabel="relative block-output MSE", title="block fine-tuning", yscale="log")
    b.legend()


def write_report(stem: Path, model: nn.Module, scheme: Scheme, stats: list[dict], seconds: float) -> dict:
    data = {"scheme": scheme.name, "seconds_this_run": round(seconds, 2), **bits_summary(model),
            "blocks": stats}
    try:
        from aqlmkit.eval.report import save_report
    except ImportError:  # eval not installed yet: the JSON alone
        from aqlmkit.utils import atomic_save_json

        atomic_save_json(f"{stem}.json", data)
        return data
    save_report(str(stem), data, plot=_plot(stats) if stats else None)
    return data
