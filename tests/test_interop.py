"""Interop with transformers' AQLM integration and the official ``aqlm`` package (v1.1.7), on CPU.

Finding: aqlm 1.1.7's CPU kernel for 8-bit codebooks (``numba_gemm_lut``, ``parallel=True``) adds
into ``output_vec[i]`` from a ``prange`` over input groups, a data race: with >1 numba thread its
logits are wrong and change run to run (max |diff| ~0.3 on a tiny Llama). With one numba thread it
is exact, so these tests pin ``numba.set_num_threads(1)`` while the official model runs. The
1x16 path on CPU is the official dequantize-then-matmul and needs nothing special. The official
layer also permutes ``codes`` in place on its first CPU forward (8-bit codebooks), so an official
model must be saved before it is run.
"""
from __future__ import annotations

import pytest
import torch

from aqlmkit.formats.aqlm_hf import load_quantized, save_quantized
from aqlmkit.nn import QuantizedLinear
from nn_helpers import fill_random, logits, random_quantized, round_dense_to_fp16

aqlm = pytest.importorskip("aqlm")
numba = pytest.importorskip("numba")
IDS = torch.tensor([[1, 7, 42, 300, 12, 5, 77], [3, 9, 100, 200, 4, 8, 2]])


@pytest.fixture
def one_numba_thread():
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


@pytest.mark.parametrize("scheme", ["2x8g8", "1x16g8"])
def test_aqlmkit_checkpoint_loads_in_transformers(scheme, tmp_path, make_tiny_model, tiny_tokenizer,
                                                  one_numba_thread):
    from transformers import AutoModelForCausalLM

    model = random_quantized(make_tiny_model("llama", vocab_size=len(tiny_tokenizer)), scheme, seed=5)
    round_dense_to_fp16(model)  # the lm_head/embeddings are stored fp16, as AQLM checkpoints do
    out = save_quantized(model, tiny_tokenizer, tmp_path / scheme, scheme)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(theirs.model.layers[0].mlp.up_proj, aqlm.QuantizedLinear)
    assert type(theirs.lm_head) is torch.nn.Linear
    ours, _ = load_quantized(out)
    expected = logits(ours, IDS)
    torch.testing.assert_close(logits(theirs, IDS), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(expected, logits(model, IDS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme,g", [("2x8g8", 8), ("1x16g8", 8),
                                      pytest.param("1x8g4", 4, marks=pytest.mark.slow)])
def test_official_checkpoint_loads_in_aqlmkit(scheme, g, tmp_path, make_tiny_model, one_numba_thread):
    """Build the model the way transformers does for AQLM, fill it, save_pretrained, load here."""
    from transformers import AqlmConfig
    import transformers.modeling_utils  # noqa: F401  (imported first: avoids a circular import in 5.x)
    from transformers.integrations.aqlm import replace_with_aqlm_linear

    k, b = (int(v) for v in scheme.split("g")[0].split("x"))
    qcfg = AqlmConfig(in_group_size=g, out_group_size=1, num_codebooks=k, nbits_per_codebook=b,
                      linear_weights_not_to_quantize=["lm_head"])
    model = make_tiny_model("llama", vocab_size=512)
    dense_state = {n: p.detach().clone() for n, p in model.named_parameters() if "proj" not in n}
    replace_with_aqlm_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qcfg)
    gen = torch.Generator().manual_seed(11)
    for m in model.modules():
        if isinstance(m, aqlm.QuantizedLinear):
            m.to_empty(device="cpu")  # transformers builds them on the meta device
            fill_random(m, gen, b)
    model.load_state_dict(dense_state, strict=False, assign=True)
    model.config.quantization_config = qcfg
    model.save_pretrained(tmp_path / "official")  # before any forward: see the module docstring
    ours, _ = load_quantized(tmp_path / "official")
    assert isinstance(ours.model.layers[1].self_attn.v_proj, QuantizedLinear)
    assert ours.model.layers[1].self_attn.v_proj.scheme.name == scheme
    torch.testing.assert_close(logits(ours, IDS), logits(model.eval(), IDS), rtol=1e-4, atol=1e-4)
