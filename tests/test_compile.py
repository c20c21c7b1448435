"""torch.compile: QuantizedLinear traces with no graph breaks, and a quantized model compiles on CPU."""
from __future__ import annotations

import pytest
import torch

from aqlmkit.nn import QuantizedLinear
from nn_helpers import fill_random, logits, random_quantized


@pytest.mark.parametrize("scheme,nbits", [("2x8g8", 8), ("1x16g8", 16)])
def test_layer_fullgraph_no_breaks(scheme, nbits):
    torch._dynamo.reset()
    layer = QuantizedLinear(64, 48, scheme, bias=True)
    fill_random(layer, torch.Generator().manual_seed(0), nbits)
    x = torch.randn(5, 64)
    with torch.no_grad():
        eager = layer(x)
        explain = torch._dynamo.explain(layer)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(torch.randn(2, 3, 64)).shape, torch.Size([2, 3, 48]))
    # training path (input needs grad -> differentiable reference) also traces in one graph
    xg = x.clone().requires_grad_(True)
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(xg)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), eager, rtol=1e-5, atol=1e-5)
    assert xg.grad is not None and xg.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_quantized_model_compiles(backend, make_tiny_model):
    """Whole tiny Llama; inductor (the real CPU codegen) takes ~1 min on 2 cores, hence slow."""
    torch._dynamo.reset()
    model = random_quantized(make_tiny_model("llama", vocab_size=128, num_hidden_layers=1), "2x8g8", seed=2)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    eager = logits(model, ids)
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(logits(compiled, ids), eager, rtol=1e-4, atol=1e-4)
