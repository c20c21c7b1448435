"""Block-by-block AQLM calibration: end to end on tiny models, resume after SIGKILL, bad inputs."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _pipeline_helpers import fast_configs
from aqlmkit.errors import AqlmkitError
from aqlmkit.nn import QuantizedLinear
from aqlmkit.pipeline.quantize import quantize_model

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _reference_kernel(monkeypatch):
    monkeypatch.setenv("AQLMKIT_KERNEL", "reference")  # no kernel compile inside these tests


def _ids(n=4, seqlen=16, seed=0):
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2})])
def test_quantize_model_end_to_end(make_tiny_model, tmp_path, family, extra):
    model = make_tiny_model(family, num_hidden_layers=2 if family == "llama" else 1, **extra)
    fp = copy.deepcopy(model)
    ids = _ids()
    calib, layer, ft = fast_configs(nsamples=4, seqlen=16)
    calib.skip = ("down_proj",)
    quantize_model(model, None, "2x4g8", calib, layer, ft, tmp_path, calibration_data=ids, progress=False)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert names and not any(n.endswith("down_proj") for n in names)
    assert all(not n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)
    assert isinstance(model.lm_head, torch.nn.Linear)  # embeddings/lm_head stay fp
    assert model.config.use_cache == fp.config.use_cache  # saved checkpoints keep their KV cache
    with torch.no_grad():
        q, ref = model(_ids(2, 16, 5)).logits, fp(_ids(2, 16, 5)).logits
    assert 0 < _rel(q, ref) < 0.5
    report = json.loads((tmp_path / "quantize_report.json").read_text())
    assert [b["block"] for b in report["blocks"]] == list(range(model.config.num_hidden_layers))
    lin = report["blocks"][0]["linears"]
    assert all(0 <= s["rel_error"] < 1 for s in lin) and len(lin) == len([n for n in names if "layers.0." in n])
    assert 1.5 < report["avg_bits_quantized"] < 3
    assert (tmp_path / "quantize_report.png").exists()


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    worker = [sys.executable, str(HERE / "_resume_worker.py")]
    env = {**os.environ, "AQLMKIT_KERNEL": "reference", "OMP_NUM_THREADS": "1"}
    subprocess.run(worker + [str(tmp_path / "wd_ref"), str(tmp_path / "ref.st")], env=env, check=True,
                   capture_output=True)
    proc = subprocess.Popen(worker + [str(tmp_path / "wd"), str(tmp_path / "resumed.st")],
                            env={**env, "SLOW": "1"}, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # first block checkpointed; the worker is now mid-run
    assert line.startswith("SAVED 0"), line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((tmp_path / "wd" / "manifest.json").read_text())
    assert manifest["next_block"] == 1 and not (tmp_path / "resumed.st").exists()
    out = subprocess.run(worker + [str(tmp_path / "wd"), str(tmp_path / "resumed.st")], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    ref, res = load_file(str(tmp_path / "ref.st")), load_file(str(tmp_path / "resumed.st"))
    assert ref.keys() == res.keys()
    for k in ref:
        assert torch.equal(ref[k], res[k]), k


def test_resume_of_another_job_names_the_difference(make_tiny_model, tmp_path):
    calib, layer, ft = fast_configs(nsamples=2, seqlen=16, epochs=0)
    model = make_tiny_model("llama", num_hidden_layers=1)
    quantize_model(model, None, "1x4g8", calib, layer, ft, tmp_path, calibration_data=_ids(2), progress=False)
    with pytest.raises(AqlmkitError, match=r"scheme.*1x4g8.*2x4g8.*--fresh"):
        quantize_model(make_tiny_model("llama", num_hidden_layers=1), None, "2x4g8", calib, layer, ft,
                       tmp_path, calibration_data=_ids(2), progress=False)
    with pytest.raises(AqlmkitError, match=r"fingerprint.*--fresh"):
        quantize_model(make_tiny_model("llama", num_hidden_layers=1, seed=7), None, "1x4g8", calib, layer,
                       ft, tmp_path, calibration_data=_ids(2), progress=False)
    # resume=False (--fresh) starts over instead
    quantize_model(make_tiny_model("llama", num_hidden_layers=1), None, "2x4g8", calib, layer, ft,
                   tmp_path, resume=False, calibration_data=_ids(2), progress=False)


def test_too_small_calibration_set(make_tiny_model, tmp_path):
    calib, layer, ft = fast_configs(nsamples=8, seqlen=16)
    with pytest.raises(AqlmkitError, match=r"8 samples of 16 tokens were requested"):
        quantize_model(make_tiny_model("llama"), None, "2x4g8", calib, layer, ft, tmp_path,
                       calibration_data=_ids(3), progress=False)


def test_nan_activations_name_the_block(make_tiny_model, tmp_path):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    calib, layer, ft = fast_configs(nsamples=2, seqlen=16, epochs=0)
    with pytest.raises(AqlmkitError, match=r"NaN/Inf in .*block 1"):
        quantize_model(model, None, "2x4g8", calib, layer, ft, tmp_path, calibration_data=_ids(2),
                       progress=False)


def test_block_finetune_lowers_loss_and_keeps_best(make_tiny_model):
    from aqlmkit.config import FinetuneConfig
    from aqlmkit.models import get_layout
    from aqlmkit.pipeline.activations import capture_block_inputs, run_block
    from aqlmkit.pipeline.block_finetune import finetune_block

    model = make_tiny_model("llama", num_hidden_layers=1)
    layout = get_layout(model)
    inps, kws = capture_block_inputs(model, layout.blocks, _ids(8, 16), "cpu", "cpu")
    block = layout.blocks[0]
    target = run_block(block, inps, kws[0], "cpu")
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    st = finetune_block(block, inps, target, kws[0], FinetuneConfig(epochs=6, lr=1e-3, val_fraction=0.25),
                        "cpu", seed=0, progress=False)
    assert st.loss_after < 0.8 * st.loss_before
    out = run_block(block, inps[-2:], kws[0], "cpu")
    got = sum(float((o - t).pow(2).mean() / t.pow(2).mean()) for o, t in zip(out, target[-2:])) / 2
    assert got == pytest.approx(st.loss_after, rel=1e-4)  # the kept state is the best one


def test_recipe_precedence_and_bad_config(tmp_path):
    from aqlmkit.app.recipes import build_recipe, load_config_file

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"scheme": "1x16g8", "calibration": {"nsamples": 7, "seqlen": 99},
                                "finetune": {"epochs": 5}, "pv": None}))
    r = build_recipe("quick", load_config_file(str(path)), {"calibration": {"seqlen": 64}})
    assert (r.calibration.nsamples, r.calibration.seqlen, r.finetune.epochs, r.layer.max_epochs) == (7, 64, 5, 4)
    assert r.scheme.name == "1x16g8" and r.pv is None and r.global_ft is not None
    std = build_recipe("standard")
    assert std.calibration.nsamples * std.calibration.seqlen >= 1_000_000 and std.pv is not None
    for bad, match in (({"calibration": {"nsample": 7}}, "nsample"), ({"calibration": {"nsamples": "7"}}, "nsamples must be int"),
                       ({"layer": {"beam_size": 0}}, "beam_size"), ({"global": {"lr": -1.0}}, "GlobalFinetuneConfig.lr"),
                       ({"pv": {"v": {"max_change": 0.0}}}, "max_change"), ({"global": None, "pv": {}}, "needs the global"),
                       ({"layer": []}, "must be a JSON object")):
        path.write_text(json.dumps(bad))
        with pytest.raises(AqlmkitError, match=match):
            build_recipe("quick", load_config_file(str(path)), {})
    for text, match in (('{"calib": {}}', "unknown section"), ("[1, 2]", "JSON object"), ("{", "not valid JSON")):
        path.write_text(text)
        with pytest.raises(AqlmkitError, match=match):
            load_config_file(str(path))
    with pytest.raises(AqlmkitError, match="unknown recipe"):
        build_recipe("fastest")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantize_on_cuda_matches_cpu_quality(make_tiny_model, tmp_path):
    ids = _ids(4, 16)
    results = {}
    for device in ("cpu", "cuda"):
        model = make_tiny_model("mixtral", num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2)
        fp = copy.deepcopy(model)
        calib, layer, ft = fast_configs(nsamples=4, seqlen=16, device=device)
        calib.offload_activations = device == "cuda"
        quantize_model(model, None, "2x4g8", calib, layer, ft, tmp_path / device, calibration_data=ids,
                       progress=False)
        assert next(model.parameters()).device.type == device
        with torch.no_grad():
            results[device] = _rel(model.cpu()(ids).logits, fp(ids).logits)
    assert results["cuda"] < 2 * results["cpu"] + 1e-3


def test_rtn_and_gptq_baselines_through_the_harness(make_tiny_model):
    from aqlmkit.app.baselines import baseline_bits, gptq_model, rtn_model

    model = make_tiny_model("llama")
    ev = _ids(4, 32, seed=1)
    with torch.no_grad():
        ref = model(ev).logits
        err = {}
        for bits in (2, 4):
            for name, fn in (("rtn", lambda m: rtn_model(m, bits, 32)),
                             ("gptq", lambda m: gptq_model(m, _ids(8, 32), bits, 32))):
                err[name, bits] = _rel(fn(copy.deepcopy(model))(ev).logits, ref)
    assert err["gptq", 2] < err["rtn", 2] and err["gptq", 4] < err["rtn", 4]
    assert err["rtn", 4] < err["rtn", 2] and 0 < err["gptq", 4]
    assert baseline_bits(2, 128) == 2.25


def test_quantize_cli_reports_every_stage_in_and_out_of_domain(tiny_llama_dir, tmp_path, capsys):
    """The whole job through the CLI with evaluation on: one row per stage, both perplexities."""
    from aqlmkit.cli import main

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: plain words about lists, loops and numbers {i * 7}."
                                for i in range(200)))
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"global": {"nsamples": 4, "val_samples": 1, "seqlen": 32, "batch_size": 2,
                                          "eval_every": 1, "steps": 2},
                               "pv": {"steps": 2, "v": {"code_lr": 0.2, "max_change": 0.05}},
                               "eval": {"seqlen": 64}}))
    base = ["quantize", "-m", str(tiny_llama_dir), "--scheme", "1x4g8", "--nsamples", "2", "--seqlen", "32",
            "--epochs", "1", "--steps-per-epoch", "1", "--init-iters", "1", "--finetune-epochs", "0",
            "--dataset", str(text), "--eval-dataset", str(text), "--eval-tokens", "256", "--config", str(cfg)]
    assert main([*base, "--ood-dataset", "nope", "-o", str(tmp_path / "bad")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "q"
    assert main([*base, "--ood-dataset", str(text), "-o", str(out), "--work-dir", str(tmp_path / "wd")]) == 0
    rows = json.loads((out / "quantize_results.json").read_text())["rows"]
    assert [r.get("stage") for r in rows] == [None, "calibration", "global FT", "PV"]
    assert all(r["ppl"] > 1 and r["ood_ppl"] > 1 for r in rows)
    printed = capsys.readouterr().out
    assert "OOD PPL" in printed and "PV" in printed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_finetune_of_a_16bit_block_trains_in_fp32_and_keeps_dtypes(make_tiny_model, dtype):
    """Adam on 16-bit parameters turns NaN (fp16: the squared gradients flush to zero, 0/0) or
    stalls (bf16: lr-sized steps round away); the block must train anyway and come back 16-bit."""
    from aqlmkit.config import FinetuneConfig
    from aqlmkit.models import get_layout
    from aqlmkit.pipeline.activations import capture_block_inputs, run_block
    from aqlmkit.pipeline.block_finetune import finetune_block

    model = make_tiny_model("llama", num_hidden_layers=1).to(dtype)
    layout = get_layout(model)
    inps, kws = capture_block_inputs(model, layout.blocks, _ids(8, 16), "cpu", "cpu")
    block = layout.blocks[0]
    target = run_block(block, inps, kws[0], "cpu")
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(dtype) * 0.02)
    dtypes = {n: t.dtype for n, t in list(block.named_parameters()) + list(block.named_buffers())}
    st = finetune_block(block, inps, target, kws[0], FinetuneConfig(epochs=6, lr=1e-4, val_fraction=0.25),
                        "cpu", seed=0, progress=False)
    assert math.isfinite(st.loss_after) and st.loss_after < 0.76 * st.loss_before
    assert dtypes == {n: t.dtype for n, t in list(block.named_parameters()) + list(block.named_buffers())}
    assert all(p.grad is None for p in block.parameters())
    out = run_block(block, inps[-2:], kws[0], "cpu")
    got = sum(float((o.float() - t.float()).pow(2).mean() / t.float().pow(2).mean())
              for o, t in zip(out, target[-2:])) / 2
    assert got == pytest.approx(st.loss_after, rel=1e-3)  # reported as stored, in the 16-bit dtype
