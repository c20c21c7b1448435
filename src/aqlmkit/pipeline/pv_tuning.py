"""PV-tuning's V-step (Malinovskii et al. 2024, arXiv 2405.14852) for AQLM layers.

The P-step (Adam on codebooks, scales, norms) cannot move codes. For the codes we keep, per
quantized weight, a straight-through delta D: every training step adds to it an Adam step along
dL/dŴ, normalized as in LAMB so that ||ΔD|| = ``code_lr``·||Ŵ||. The dense target the codes should
follow is W̃ = Ŵ + D. Keeping the delta rather than an absolute copy means the P-step's own moves
of the codebooks never look like evidence for changing codes. A V-step re-encodes only the
``max_change`` fraction of code groups whose target moved furthest, by beam search in weight
space (the AQ code search with an identity Hessian), keeps the changes, most deviating first,
only while the total change stays within ``trust_ratio``·||Ŵ||, and removes the realized part of
the move from D. Both limits keep each update inside the region where the gradient is
informative, which is what stops the divergence a full re-encoding causes.

Whether a V-step is kept is decided by the caller on held-out KL (see ``finetune_global``):
:meth:`StraightThrough.v_step` returns what it changed so it can be undone with :meth:`undo`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aqlmkit.config import PVConfig, Scheme
from aqlmkit.engine.code_search import beam_search_codes
from aqlmkit.engine.layout import decode, from_units, to_units
from aqlmkit.kernels import reference
from aqlmkit.kernels.reference import unsigned_codes
from aqlmkit.nn import QuantizedLinear
from aqlmkit.nn.linear import pack_codes


@contextlib.contextmanager
def straight_through_forward(layers: list[QuantizedLinear]):
    """Run each layer on a dense Ŵ built with autograd, keeping Ŵ so backward yields dL/dŴ.

    Gradients still reach codebooks and scales (the P-step) through the differentiable
    dequantization; ``layer._st_weight.grad`` is the straight-through gradient for the V-step.
    """
    def make(mod: QuantizedLinear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            w = reference.dequantize(mod.codes, mod.codebooks, mod.scales)
            if torch.is_grad_enabled():
                if w.requires_grad:
                    w.retain_grad()
                else:  # codebooks and scales frozen: Ŵ is a leaf of its own
                    w = w.detach().requires_grad_(True)
                mod._st_weight = w
            return F.linear(x, w.to(x.dtype), None if mod.bias is None else mod.bias.to(x.dtype))
        return forward

    for m in layers:
        m.forward = make(m)
    try:
        yield layers
    finally:
        for m in layers:
            del m.forward
            m._st_weight = None


@dataclass
class VChange:
    """What one V-step changed in one layer (enough to undo it)."""

    layer: QuantizedLinear
    flat_idx: torch.Tensor     # changed code groups (flat index over [U, J])
    old_codes: torch.Tensor    # their previous codes [n, K] (stored dtype)


class StraightThrough:
    """Straight-through deltas D of every quantized weight, their Adam state, and the V-step."""

    def __init__(self, layers: list[QuantizedLinear], cfg: PVConfig) -> None:
        self.layers, self.cfg = layers, cfg
        self.buffers = [torch.zeros(m.out_features, m.in_features, device=m.codes.device) for m in layers]
        self.sq = [torch.zeros_like(b) for b in self.buffers]
        self.steps = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """One Adam (beta1 = 0) step of every D along the last backward's dL/dŴ, LAMB-normalized."""
        self.steps += 1
        b2 = self.cfg.beta2
        for m, buf, sq in zip(self.layers, self.buffers, self.sq):
            w = getattr(m, "_st_weight", None)
            if w is None or w.grad is None:
                continue
            g = w.grad.float()
            sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            u = g / (sq / (1 - b2 ** self.steps)).sqrt().add_(1e-12)
            scale = self.cfg.code_lr * float(w.detach().norm()) / max(float(u.norm()), 1e-30)
            buf.add_(u, alpha=-scale)
            w.grad = None

    @torch.no_grad()
    def v_step(self) -> list[VChange]:
        """Re-encode the most-moved groups of every layer toward W̃; returns the changes made."""
        changes = []
        for m, buf in zip(self.layers, self.buffers):
            ch = _v_step_layer(m, buf, self.cfg)
            if ch is not None:
                changes.append(ch)
        return changes

    @torch.no_grad()
    def undo(self, changes: list[VChange]) -> None:
        """Restore the codes a V-step changed and clear those groups' D.

        Clearing D there (not keeping the deviation) stops the next V-step from proposing the
        same rejected change again; the evidence for them starts over.
        """
        index = {id(m): i for i, m in enumerate(self.layers)}
        for ch in changes:
            m = ch.layer
            _set_codes(m, ch.flat_idx, ch.old_codes)
            buf = self.buffers[index[id(m)]]
            units = to_units(buf, m.scheme)
            _subtract_groups(buf, m.scheme, ch.flat_idx, units.reshape(-1, units.shape[-1])[ch.flat_idx].clone())

    @torch.no_grad()
    def reset(self) -> None:
        """Clear every D (after a rollback restored older weights)."""
        for buf in self.buffers:
            buf.zero_()

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (b, s) in enumerate(zip(self.buffers, self.sq)):
            out[f"st.{i}.buffer"], out[f"st.{i}.sq"] = b, s
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], steps: int) -> None:
        for i in range(len(self.buffers)):
            self.buffers[i].copy_(tensors[f"st.{i}.buffer"])
            self.sq[i].copy_(tensors[f"st.{i}.sq"])
        self.steps = steps


def _group_sq_norms(delta: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """[out, in] -> squared norm of each code group, flat over [U, J]."""
    return to_units(delta, scheme).pow(2).sum(-1).reshape(-1)


def _set_codes(m: QuantizedLinear, flat_idx: torch.Tensor, values: torch.Tensor) -> None:
    """Write codes of the given groups in place; drop the layer's kernel cache (codes changed)."""
    k = m.codes.shape[-1]
    with torch.no_grad():  # on the Parameter itself, so its version counter moves too
        m.codes.view(-1, k)[flat_idx] = values.to(m.codes.dtype)
    m.invalidate_kernel_cache()


def _subtract_groups(buf: torch.Tensor, scheme: Scheme, flat_idx: torch.Tensor, delta: torch.Tensor) -> None:
    """D[g] -= ΔŴ[g] for the changed groups: the part of the move the codes now realize."""
    units = to_units(buf, scheme).reshape(-1, delta.shape[-1])
    units[flat_idx] -= delta
    buf.copy_(from_units(units.view(buf.shape[0] // scheme.out_group_size, -1, delta.shape[-1]), scheme))


def _v_step_layer(m: QuantizedLinear, buf: torch.Tensor, cfg: PVConfig) -> VChange | None:
    scheme = m.scheme
    w = m.dequantize().float()
    deviation = _group_sq_norms(buf, scheme)
    n_groups = deviation.numel()
    n_pick = max(1, int(math.ceil(cfg.max_change * n_groups)))
    cand = deviation.topk(min(n_pick, n_groups)).indices           # most-moved groups first
    cand = cand[deviation[cand] > 0]
    if cand.numel() == 0:
        return None
    k_books, size, og, g = m.codebooks.shape
    nbits = size.bit_length() - 1
    d = og * g
    books = m.codebooks.detach().float().reshape(k_books, size, d)
    n_j = m.codes.shape[1]
    scales = m.scales.detach().float().reshape(-1)[cand // n_j]     # [n]
    target = to_units(w + buf, scheme).reshape(-1, 1, d)[cand]      # W̃ = Ŵ + D, [n, 1, D]
    old = unsigned_codes(m.codes.detach().reshape(-1, k_books)[cand], nbits)  # [n, K]
    eye_g = torch.eye(g, dtype=books.dtype, device=books.device)
    eye_d = torch.eye(d, dtype=books.dtype, device=books.device).unsqueeze(0)
    group_scheme = Scheme(k_books, nbits, g, og)
    new = beam_search_codes(target, eye_g, eye_d, old.unsqueeze(1), books, scales, group_scheme,
                            beam=cfg.beam_size).squeeze(1)          # [n, K]
    moved = (new != old).any(-1)
    if not bool(moved.any()):
        return None
    # Size of each accepted change: ||ΔŴ|| per group, accumulated in priority order.
    delta = (decode(new[:, None], books) - decode(old[:, None], books))[:, 0] * scales[:, None]
    change = delta.pow(2).sum(-1) * moved
    if cfg.trust_ratio is not None:
        budget = (cfg.trust_ratio * float(w.norm())) ** 2
        cum = change.cumsum(0)
        keep_n = int((cum <= budget).sum()) + 1                     # one change past it is allowed
        moved[keep_n:] = False
    idx = cand[moved]
    if idx.numel() == 0:
        return None
    old_stored = m.codes.detach().reshape(-1, k_books)[idx].clone()
    _set_codes(m, idx, pack_codes(new[moved], nbits))
    _subtract_groups(buf, scheme, idx, delta[moved])
    return VChange(m, idx, old_stored)


def quantized_layers(model: nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]
