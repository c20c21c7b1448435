"""A fixed-slot batched KV cache, driven through the model's own attention modules.

Why our own tensors instead of transformers' caches: continuous batching needs every row of the
batch at its own position (one request is at token 900, its neighbour at token 3), and a row's
cache must be writable while other rows keep decoding. transformers' caches share one
``cache_position`` across the batch, and left-padding would shift RoPE. Here each request owns a
*slot* (one row of per-layer ``[slots, kv_heads, context + 1, head_dim]`` K/V tensors); a step passes
``position_ids`` per row (RoPE stays exact), the rows to write, and a boolean mask per row.

The model keeps its q/k/v/o projections, RoPE and MLP; only the attention kernel is swapped, via
transformers' ``AttentionInterface`` (``config._attn_implementation = "aqlmkit_slots"``). Without a
:class:`StepBatch` in the call's kwargs the function falls back to stock SDPA, so ``model.generate``
keeps working on the same model object.

The extra last column is a trash column: batch rows that are padding (a decode bucket of 8 with 5
live requests) write there (position ``context``), so they can never overwrite what a request that
is still reading its prompt in that slot has written; no request ever reads that column.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aqlmkit.errors import AqlmkitError

ATTN_NAME = "aqlmkit_slots"


@dataclass
class StepBatch:
    """What one forward needs to read and write the slot cache.

    ``write_rows`` [B]: the cache row each batch row writes;
    ``positions`` [B, T]: each token's position (also the column it is written to; the trash
    column ``context`` for padding rows);
    ``read_start``: batch row b reads cache row ``read_start + b``; ``read_len``: columns read;
    ``mask`` [B, 1, T, read_len] bool: True where a query may attend.
    """

    cache: "SlotCache"
    write_rows: torch.Tensor
    positions: torch.Tensor
    read_start: int
    read_len: int
    mask: torch.Tensor


class SlotCache:
    """Per-layer K/V tensors for ``slots`` requests of up to ``context`` tokens (plus a trash column)."""

    def __init__(self, config, slots: int, context: int, device: torch.device, dtype: torch.dtype) -> None:
        if slots < 1 or context < 2:
            raise AqlmkitError(f"need at least 1 slot and a context of 2 tokens (got {slots}, {context})")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (slots, kv_heads, context + 1, head_dim)
        layers = config.num_hidden_layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        if device.type == "cuda":  # CUDA graphs mutate them in place (see compiled.compile_step)
            for t in self.keys + self.values:
                torch._dynamo.mark_static_address(t)
        self.slots, self.context, self.trash = slots, context, context
        self.groups = heads // kv_heads

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def _write(cache: torch.Tensor, new: torch.Tensor, step: StepBatch) -> None:
    """new [B, kv_heads, T, D] -> cache[write_rows[b], :, positions[b, t]]."""
    cache[step.write_rows[:, None], :, step.positions] = new.transpose(1, 2).to(cache.dtype)


def slot_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """AttentionInterface function: write this step's K/V into the slots, attend over each row's slot.

    Grouped-query attention without copying the cache: the ``groups`` query heads sharing a KV head
    are folded into the query-length axis ([B, kv_heads, groups*T, D]), so SDPA reads each cached
    K/V row once.
    """
    step: StepBatch | None = kwargs.get("aqlmkit_step")
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    cache, layer = step.cache, module.layer_idx
    _write(cache.keys[layer], key, step)
    _write(cache.values[layer], value, step)
    b, heads, t, d = query.shape
    rows = slice(step.read_start, step.read_start + b)
    k = cache.keys[layer][rows, :, : step.read_len]
    v = cache.values[layer][rows, :, : step.read_len]
    kv_heads = k.shape[1]
    q = query.reshape(b, kv_heads, (heads // kv_heads) * t, d)
    mask = step.mask.expand(b, heads // kv_heads, t, step.read_len).reshape(b, 1, -1, step.read_len)
    out = torch.nn.functional.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask,
                                                           scale=scaling)
    return out.reshape(b, heads, t, d).transpose(1, 2).contiguous(), None


_REGISTERED = False


def install(model: nn.Module) -> None:
    """Route the model's attention through :func:`slot_attention` (idempotent)."""
    global _REGISTERED
    from transformers import AttentionInterface

    if not _REGISTERED:
        AttentionInterface.register(ATTN_NAME, slot_attention)
        try:  # mask creation is skipped anyway (a 4D mask is passed); register a no-op for safety
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

            ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
        except ImportError:  # older transformers: masks were built elsewhere
            pass
        _REGISTERED = True
    check_supported(model.config)
    model.config._attn_implementation = ATTN_NAME


def check_supported(config) -> None:
    """Refuse models whose attention the slot cache would compute wrongly."""
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if types - {"full_attention"} or window:
        raise AqlmkitError(f"the serving runtime supports full-attention decoders only; this "
                           f"{config.model_type} model uses {sorted(types)} layers (sliding window "
                           f"{window}); serve it with `aqlmkit generate` instead")
