"""PEFT LoRA on aqlmkit QuantizedLinear: adapters attach, the loss falls, quantized tensors stay put."""
from __future__ import annotations

import pytest
import torch

from aqlmkit.errors import AqlmkitError
from aqlmkit.nn import QuantizedLinear
from aqlmkit.nn.lora import add_lora, lora_layer_class
from nn_helpers import random_quantized

pytest.importorskip("peft")


def test_lora_trains_and_keeps_quantized_tensors(make_tiny_model):
    model = random_quantized(make_tiny_model("llama", vocab_size=128), "2x8g8", seed=4)
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = add_lora(model, r=4, alpha=8)
    wrapped = [m for m in peft_model.modules() if isinstance(m, lora_layer_class())]
    assert len(wrapped) == 14 and all(isinstance(m.base_layer, QuantizedLinear) for m in wrapped)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 16), generator=gen)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # adapters in the first layer got gradients through later quantized layers (input grads flow)
    first = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert first.lora_A["default"].weight.grad.abs().sum() > 0
    inner = peft_model.base_model.model
    checked = 0
    for k, v in frozen.items():
        if k.endswith((".codes", ".codebooks", ".scales")):
            owner, attr = k.rsplit(".", 1)
            mod = inner.get_submodule(owner)
            base = getattr(mod, "base_layer", mod)
            assert torch.equal(getattr(base, attr), v), f"{k} changed during LoRA training"
            checked += 1
    assert checked == 14 * 3
    with pytest.raises(AqlmkitError, match="cannot be merged"):
        first.merge()
