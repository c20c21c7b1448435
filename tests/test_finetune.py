"""Global fine-tuning (KL distillation) and PV-tuning's V-step on tiny models."""
from __future__ import annotations

import copy

import pytest
import torch

from _pipeline_helpers import fast_configs
from aqlmkit.config import FinetuneConfig, LayerQuantConfig
from aqlmkit.nn import QuantizedLinear
from aqlmkit.pipeline.finetune_global import evaluate_kl, finetune_global
from aqlmkit.pipeline.pv_tuning import VStepConfig, dense_weights, v_step_layer
from aqlmkit.pipeline.quantize import quantize_model


@pytest.fixture(autouse=True)
def _reference_kernel(monkeypatch):
    monkeypatch.setenv("AQLMKIT_KERNEL", "reference")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(fp teacher, roughly quantized student, ids): few AQ iterations leave room for the V-step."""
    from conftest import tiny_model

    teacher = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(0))
    calib, _, ft = fast_configs(nsamples=4, seqlen=24, epochs=0)
    layer = LayerQuantConfig(max_epochs=1, steps_per_epoch=1, init_max_iter=2)
    student = quantize_model(copy.deepcopy(teacher), None, "1x4g8", calib, layer, ft,
                             tmp_path_factory.mktemp("wd"), calibration_data=ids, progress=False)
    return teacher, student, ids


def test_kl_falls_and_codes_stay_without_v_step(pair):
    teacher, student, ids = pair
    s = copy.deepcopy(student)
    codes = [m.codes.clone() for m in s.modules() if isinstance(m, QuantizedLinear)]
    flags = [p.requires_grad for p in s.parameters()]
    st = finetune_global(s, teacher, ids, FinetuneConfig(epochs=3, lr=1e-3, batch_size=2), progress=False)
    assert st.kl_after < 0.9 * st.kl_before
    assert st.kl_after == pytest.approx(evaluate_kl(s, teacher, ids, "cpu"), rel=1e-5)
    assert all(torch.equal(a, m.codes) for a, m in zip(codes, [m for m in s.modules() if isinstance(m, QuantizedLinear)]))
    assert flags == [p.requires_grad for p in s.parameters()]  # flags restored


def test_v_step_lowers_kl_beyond_p_step(pair):
    teacher, student, ids = pair
    cfg = FinetuneConfig(epochs=2, lr=1e-3, batch_size=2)
    p_only, pv = copy.deepcopy(student), copy.deepcopy(student)
    st_p = finetune_global(p_only, teacher, ids, cfg, progress=False)
    st_pv = finetune_global(pv, teacher, ids, cfg, v_step=VStepConfig(lr=0.3, max_change=0.1, every=1),
                            progress=False)
    assert st_pv.codes_changed > 0
    assert st_pv.kl_after < st_p.kl_after


def test_v_step_respects_cap_and_improves_linearized_objective(pair):
    teacher, student, ids = pair
    s = copy.deepcopy(student)
    with dense_weights(s) as layers:
        from aqlmkit.pipeline.finetune_global import kl_loss

        kl_loss(s(input_ids=ids[:2]).logits, teacher(input_ids=ids[:2]).logits).backward()
        grads = [(m, m._dense.grad.clone()) for m in layers]
    cfg = VStepConfig(lr=0.5, max_change=0.1)
    for m, g in grads:
        w0, c0 = m.dequantize(), m.codes.clone()
        step = cfg.lr * w0.pow(2).mean().sqrt() / g.pow(2).mean().sqrt()
        target = w0 - step * g
        changed = v_step_layer(m, g, cfg)
        groups = c0.shape[0] * c0.shape[1]
        assert changed <= int(0.1 * groups)
        assert int((m.codes != c0).any(-1).sum()) == changed
        if changed:
            assert (m.dequantize() - target).pow(2).sum() < (w0 - target).pow(2).sum()


@pytest.mark.slow
def test_finetune_cli_roundtrip(tiny_llama_dir, tmp_path, monkeypatch):
    from aqlmkit.cli import main
    from aqlmkit.formats.aqlm_hf import load_quantized

    q = tmp_path / "q"
    assert main(["quantize", "-m", str(tiny_llama_dir), "-o", str(q), "--scheme", "1x4g8", "--nsamples", "4",
                 "--seqlen", "32", "--epochs", "1", "--finetune-epochs", "0", "--no-eval",
                 "--work-dir", str(tmp_path / "wd")]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", "-m", str(q), "--teacher", str(tiny_llama_dir), "-o", str(out),
                 "--nsamples", "4", "--seqlen", "32", "--lr", "1e-3", "--v-every", "2"]) == 0
    model, _ = load_quantized(out, device="cpu", dtype="float32")
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert main(["finetune", "-m", str(tiny_llama_dir), "-o", str(tmp_path / "x"), "--nsamples", "2",
                 "--seqlen", "16"]) == 2  # an fp model is not a student
