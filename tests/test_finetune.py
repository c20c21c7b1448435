"""Global fine-tuning (KL distillation) and PV-tuning: tiny models for the mechanics, the embedded
model for whether PV actually helps (tiny models are not evidence for real ones)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from _pipeline_helpers import fast_configs
from aqlmkit.config import GlobalFinetuneConfig, LayerQuantConfig, PVConfig
from aqlmkit.errors import AqlmkitError
from aqlmkit.nn import QuantizedLinear
from aqlmkit.pipeline import finetune_global as fg
from aqlmkit.pipeline.finetune_global import evaluate_kl, finetune_global
from aqlmkit.pipeline.pv_tuning import StraightThrough, quantized_layers, straight_through_forward
from aqlmkit.pipeline.quantize import quantize_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(fp teacher, roughly quantized student, ids): few AQ iterations leave room for fine-tuning."""
    from conftest import tiny_model

    teacher = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 512, (8, 24), generator=torch.Generator().manual_seed(0))
    calib, _, ft = fast_configs(nsamples=8, seqlen=24, epochs=0)
    layer = LayerQuantConfig(max_epochs=1, steps_per_epoch=1, init_max_iter=2)
    student = quantize_model(copy.deepcopy(teacher), None, "1x4g8", calib, layer, ft,
                             tmp_path_factory.mktemp("wd"), calibration_data=ids, progress=False)
    return teacher, student, ids


def _codes(model):
    return [m.codes.clone() for m in quantized_layers(model)]


def test_p_steps_lower_held_out_kl_and_keep_codes(pair):
    teacher, student, ids = pair
    s = copy.deepcopy(student)
    codes, flags = _codes(s), [p.requires_grad for p in s.parameters()]
    cfg = GlobalFinetuneConfig(steps=8, lr=1e-3, batch_size=2, eval_every=2)
    st = finetune_global(s, teacher, ids[:6], cfg, val_ids=ids[6:], progress=False)
    assert st.kl_after < st.kl_before
    assert st.kl_after == pytest.approx(evaluate_kl(s, teacher, ids[6:], "cpu"), rel=1e-5)  # kept = best
    assert all(torch.equal(a, b) for a, b in zip(codes, _codes(s)))
    assert flags == [p.requires_grad for p in s.parameters()]


def test_rollback_keeps_the_model_from_getting_worse(pair):
    teacher, student, ids = pair
    s = copy.deepcopy(student)
    cfg = GlobalFinetuneConfig(steps=6, lr=3.0, batch_size=2, eval_every=1, tolerance=0.0)
    st = finetune_global(s, teacher, ids[:6], cfg, val_ids=ids[6:], progress=False)
    assert st.rollbacks > 0
    assert st.kl_after <= st.kl_before
    assert evaluate_kl(s, teacher, ids[6:], "cpu") == pytest.approx(st.kl_after, rel=1e-5)


def _accumulated(student, teacher, ids, cfg: PVConfig, steps: int = 3) -> StraightThrough:
    layers = quantized_layers(student)
    st = StraightThrough(layers, cfg)
    for _ in range(steps):
        with straight_through_forward(layers), torch.enable_grad():
            fg.kl_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits).backward()
            st.accumulate()
    return st


def test_v_step_respects_limits_moves_toward_buffer_and_undoes(pair):
    teacher, student, ids = pair
    s = copy.deepcopy(student)
    cfg = PVConfig(code_lr=0.2, max_change=0.05, trust_ratio=0.02)
    st = _accumulated(s, teacher, ids[:4], cfg)
    before = [(m.dequantize().clone(), m.codes.clone(), m.dequantize() + d) for m, d in zip(st.layers, st.buffers)]
    changes = st.v_step()
    assert changes, "a large straight-through step must move some codes"
    for m, (w0, c0, target) in zip(st.layers, before):
        groups = c0.shape[0] * c0.shape[1]
        changed = (m.codes != c0).any(-1)
        n_changed = int(changed.sum())
        assert n_changed <= max(1, int(0.05 * groups + 0.999))
        if n_changed:
            assert (m.dequantize() - target).norm() < (w0 - target).norm()       # toward W̃ = Ŵ + D
            per_group = (m.dequantize() - w0).reshape(c0.shape[0], -1, 8).pow(2).sum(-1)
            largest = float(per_group.max().sqrt())
            assert float((m.dequantize() - w0).norm()) <= 0.02 * float(w0.norm()) + largest + 1e-6  # trust
    st.undo(changes)
    assert all(torch.equal(m.codes, c0) for m, (_, c0, _) in zip(st.layers, before))


def test_pv_changes_codes_only_when_held_out_kl_allows(pair):
    teacher, student, ids = pair
    s = copy.deepcopy(student)
    cfg = GlobalFinetuneConfig(steps=6, lr=1e-3, batch_size=2, eval_every=2)
    st = finetune_global(s, teacher, ids[:6], cfg, pv=PVConfig(code_lr=0.1, max_change=0.05), val_ids=ids[6:],
                         progress=False)
    assert st.v_kept + st.v_undone > 0
    changed = sum(int((a != b).any(-1).sum()) for a, b in zip(_codes(student), _codes(s)))
    assert (changed > 0) == (st.v_kept > 0)
    assert st.kl_after <= st.kl_before
    assert evaluate_kl(s, teacher, ids[6:], "cpu") == pytest.approx(st.kl_after, rel=1e-5)


def test_resume_after_interruption_matches_uninterrupted(pair, tmp_path, monkeypatch):
    teacher, student, ids = pair
    cfg = GlobalFinetuneConfig(steps=6, lr=1e-3, batch_size=2, eval_every=2, checkpoint_every=2)
    pv = PVConfig(code_lr=0.1, max_change=0.05)
    ref = copy.deepcopy(student)
    finetune_global(ref, teacher, ids[:6], cfg, pv=pv, val_ids=ids[6:], progress=False)

    s = copy.deepcopy(student)
    real = fg._Run.train_step

    def crash_at_5(self, batch, t):
        if self.step == 4:
            raise KeyboardInterrupt
        return real(self, batch, t)

    monkeypatch.setattr(fg._Run, "train_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        finetune_global(s, teacher, ids[:6], cfg, pv=pv, val_ids=ids[6:], work_dir=tmp_path, progress=False)
    monkeypatch.setattr(fg._Run, "train_step", real)
    s2 = copy.deepcopy(student)  # a fresh process would start from the saved student, not s
    st = finetune_global(s2, teacher, ids[:6], cfg, pv=pv, val_ids=ids[6:], work_dir=tmp_path, progress=False)
    assert st.steps == 6
    for a, b in zip(ref.state_dict().values(), s2.state_dict().values()):
        assert torch.equal(a, b)
    # a state written for other settings is refused, with the way out
    with pytest.raises(AqlmkitError, match="--fresh"):
        finetune_global(copy.deepcopy(student), teacher, ids[:6], GlobalFinetuneConfig(steps=4, batch_size=2),
                        pv=pv, val_ids=ids[6:], work_dir=tmp_path, progress=False)
    (tmp_path / "global_state.safetensors").write_bytes(b"damaged")
    with pytest.raises(AqlmkitError, match="damaged"):
        finetune_global(copy.deepcopy(student), teacher, ids[:6], cfg, pv=pv, val_ids=ids[6:],
                        work_dir=tmp_path, progress=False)


def test_bad_inputs_are_one_line_errors(pair):
    from conftest import tiny_model

    teacher, student, ids = pair
    cfg = GlobalFinetuneConfig(steps=2, batch_size=2)
    with pytest.raises(AqlmkitError, match="empty"):
        finetune_global(copy.deepcopy(student), teacher, ids[:0], cfg, progress=False)
    with pytest.raises(AqlmkitError, match="max_change"):
        finetune_global(copy.deepcopy(student), teacher, ids, cfg, pv=PVConfig(max_change=0.0), progress=False)
    other = tiny_model("llama", num_hidden_layers=2, vocab_size=256)
    with pytest.raises(AqlmkitError, match="vocab"):
        finetune_global(copy.deepcopy(student), other, ids, cfg, progress=False)
    deeper = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(AqlmkitError, match="num_hidden_layers"):
        finetune_global(copy.deepcopy(student), deeper, ids, cfg, progress=False)
    with pytest.raises(AqlmkitError, match="QuantizedLinear"):
        finetune_global(copy.deepcopy(teacher), teacher, ids, cfg, progress=False)


@pytest.mark.slow
def test_finetune_cli_roundtrip(tiny_llama_dir, tmp_path):
    from aqlmkit.cli import main
    from aqlmkit.formats.aqlm_hf import load_quantized

    q = tmp_path / "q"
    assert main(["quantize", "-m", str(tiny_llama_dir), "-o", str(q), "--scheme", "1x4g8", "--nsamples", "4",
                 "--seqlen", "32", "--epochs", "1", "--finetune-epochs", "0", "--no-eval", "--no-global",
                 "--work-dir", str(tmp_path / "wd")]) == 0
    out = tmp_path / "ft"
    args = ["finetune", "-m", str(q), "--teacher", str(tiny_llama_dir), "-o", str(out), "--nsamples", "4",
            "--val-samples", "2", "--seqlen", "32", "--lr", "1e-3", "--steps", "2", "--pv-steps", "2",
            "--eval-every", "1", "--batch-size", "2", "--work-dir", str(tmp_path / "ftwd")]
    assert main(args) == 0
    model, _ = load_quantized(out, device="cpu", dtype="float32")
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert main(["finetune", "-m", str(tiny_llama_dir), "-o", str(tmp_path / "x"), "--nsamples", "2",
                 "--seqlen", "16"]) == 2  # an fp model is not a student
    assert main(args[:-2] + ["--max-change", "0", "--work-dir", str(tmp_path / "w2")]) == 2


def _cheap_student(model, scheme: str):
    """Quantize every decoder linear of the real model in weight space (identity Hessian), cheaply:
    a coarse but real AQLM student, so the test measures PV on real weights and activations."""
    from aqlmkit.config import Scheme
    from aqlmkit.engine import quantize_linear

    s = Scheme.parse(scheme)
    cfg = LayerQuantConfig(max_epochs=0, steps_per_epoch=0, init_max_iter=3, init_max_points=2 ** 12)
    for name, lin in [(n, m) for n, m in model.named_modules()
                      if type(m) is torch.nn.Linear and ".layers." in f".{n}"]:
        w = lin.weight.detach().float()
        qw = quantize_linear(w, torch.eye(w.shape[1]), s, cfg, progress=False)
        model.set_submodule(name, QuantizedLinear.from_quantized(qw, dtype=torch.float32))
    return model


@pytest.mark.slow
def test_pv_converges_on_the_embedded_model(default_model_dir):
    """Same steps, same data on SmolLM2-135M: PV keeps V-steps that lower the validation KL, ends
    below P-only there, and does not diverge on held-out text (PV once went 0.72 -> 46.8 here).

    With this crude student and 2 x 128 validation tokens, held-out KL of PV measured 4.90 vs
    P-only 4.69 (2026-12-04): the small validation set is a weak guide. The claim that PV ends
    below P-only on held-out text rests on benchmarks/quality_smollm2.py (H200, standard recipe).
    """
    from aqlmkit.data.calibration import calibration_batches
    from aqlmkit.data.corpora import load_corpus
    from aqlmkit.formats.loading import load_model

    torch.manual_seed(0)
    teacher, tok = load_model(str(default_model_dir), device="cpu", dtype="float32")
    student = _cheap_student(copy.deepcopy(teacher), "2x8g8")
    train = calibration_batches(tok, "default", 8, 128, seed=0)
    val = calibration_batches(tok, "default", 2, 128, seed=1)
    held_out = calibration_batches(tok, load_corpus("default", "eval"), 4, 128, seed=2)
    cfg = GlobalFinetuneConfig(steps=8, lr=1e-4, batch_size=1, eval_every=4)
    p_only, pv, student_start = copy.deepcopy(student), student, copy.deepcopy(student)
    st_p = finetune_global(p_only, teacher, train, cfg, val_ids=val, progress=False)
    st_pv = finetune_global(pv, teacher, train, cfg, pv=PVConfig(code_lr=3e-2), val_ids=val, progress=False)
    kl_p, kl_pv = (evaluate_kl(m, teacher, held_out, "cpu") for m in (p_only, pv))
    print(f"held-out KL: P-only {kl_p:.4f}, PV {kl_pv:.4f}; V-steps kept {st_pv.v_kept}, undone "
          f"{st_pv.v_undone}, groups changed {st_pv.codes_changed}; val {st_p.kl_after:.4f} / {st_pv.kl_after:.4f}")
    assert st_pv.v_kept > 0 and st_pv.codes_changed > 0
    assert st_pv.kl_after < st_p.kl_after < st_p.kl_before
    kl_start = evaluate_kl(student_start, teacher, held_out, "cpu")
    assert kl_pv < kl_start and kl_pv < 1.1 * kl_p


def test_fp16_student_trains_in_fp32_and_comes_back_fp16(pair):
    """Adam on fp16 codebooks and scales turns NaN; the stage trains in fp32 and restores fp16."""
    teacher, student, ids = pair
    cfg = GlobalFinetuneConfig(steps=8, lr=1e-3, batch_size=2, eval_every=2)
    ref = finetune_global(copy.deepcopy(student), teacher, ids[:6], cfg, val_ids=ids[6:], progress=False)
    s = copy.deepcopy(student).half()
    dtypes = {n: t.dtype for n, t in list(s.named_parameters()) + list(s.named_buffers())}
    st = finetune_global(s, teacher, ids[:6], cfg, val_ids=ids[6:], progress=False)
    assert math.isfinite(st.kl_after) and st.kl_after < st.kl_before
    gain, ref_gain = st.kl_before - st.kl_after, ref.kl_before - ref.kl_after
    assert gain == pytest.approx(ref_gain, rel=0.1)  # the fp32 run's gain, up to fp16 rounding
    assert dtypes == {n: t.dtype for n, t in list(s.named_parameters()) + list(s.named_buffers())}
    assert st.kl_after == pytest.approx(evaluate_kl(s, teacher, ids[6:], "cpu", 2), rel=1e-6)
