"""The `aqlmkit quantize` main job: load -> quantize -> save -> evaluate -> table.

Kept apart from the CLI so the benchmark script and tests drive the very same code.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path


from aqlmkit.config import (CalibrationConfig, FinetuneConfig, LayerQuantConfig, Scheme,
                            dataclass_from_dict)
from aqlmkit.errors import AqlmkitError

# Defaults sized for the embedded 135M model on 2 CPU cores (<= 15 min end to end); the
# dataclass defaults stay the paper's (128 x 4096 tokens) for the Python API.
QUICK_CALIB = dict(nsamples=16, seqlen=512)
QUICK_LAYER = dict(max_epochs=4, steps_per_epoch=20, init_max_iter=10, beam_size=1)
QUICK_FINETUNE = dict(epochs=1, lr=1e-4)


@dataclass
class JobConfig:
    scheme: Scheme
    calib: CalibrationConfig
    layer: LayerQuantConfig
    finetune: FinetuneConfig
    eval_dataset: str = "default"
    eval_tokens: int | None = 16384
    eval_seqlen: int = 2048
    baselines: bool = False
    extra: dict = field(default_factory=dict)


def load_config_file(path: str | None) -> dict:
    """``{"scheme": ..., "calibration": {...}, "layer": {...}, "finetune": {...}}`` (all optional)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AqlmkitError(f"config file {path} not found") from None
    except json.JSONDecodeError as e:
        raise AqlmkitError(f"config file {path} is not valid JSON: {e}") from None
    allowed = {"scheme", "calibration", "layer", "finetune", "eval"}
    if not isinstance(data, dict) or not all(isinstance(data[k], dict) for k in set(data) & (allowed - {"scheme"})):
        raise AqlmkitError(f"config file {path} must be a JSON object of objects, e.g. {{\"layer\": {{...}}}}")
    bad = sorted(set(data) - allowed)
    if bad:
        raise AqlmkitError(f"config file {path}: unknown section(s) {bad}; allowed: {sorted(allowed)}")
    return data


def build_configs(file_cfg: dict, overrides: dict[str, dict]) -> tuple[CalibrationConfig, LayerQuantConfig, FinetuneConfig]:
    """Quick defaults < config file < explicit flags (``overrides`` holds only flags given)."""
    out = []
    for cls, quick, key in ((CalibrationConfig, QUICK_CALIB, "calibration"),
                            (LayerQuantConfig, QUICK_LAYER, "layer"), (FinetuneConfig, QUICK_FINETUNE, "finetune")):
        merged = {**quick, **file_cfg.get(key, {}), **overrides.get(key, {})}
        out.append(dataclass_from_dict(cls, merged))
    return tuple(out)  # type: ignore[return-value]


def _ppl(model, tokenizer, job: JobConfig) -> float:
    from aqlmkit.eval.perplexity import perplexity

    return perplexity(model, tokenizer, job.eval_dataset, seqlen=job.eval_seqlen,
                      limit_tokens=job.eval_tokens).ppl


def default_work_dir(output: str | Path) -> Path:
    """Resume state lives in the cache (it is big), keyed by the output folder."""
    import hashlib

    from aqlmkit.utils import cache_dir

    key = hashlib.sha1(str(Path(output).resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "runs" / f"{Path(output).name}-{key}"


def run_job(model_spec: str, output: str | Path, job: JobConfig, work_dir: str | Path | None,
            fresh: bool = False, dtype: str = "auto", evaluate: bool = True, overwrite: bool = False) -> list[dict]:
    """Quantize ``model_spec`` into ``output`` (AQLM HF format); returns the table rows."""
    from aqlmkit.formats.aqlm_hf import check_output_dir, save_quantized
    from aqlmkit.formats.loading import load_model
    from aqlmkit.pipeline.quantize import quantize_model
    from aqlmkit.pipeline.report import bits_summary

    wd = Path(work_dir) if work_dir else default_work_dir(output)
    check_output_dir(output, overwrite=overwrite, sources=[model_spec, wd])  # before any work
    model, tok = load_model(model_spec, device=job.calib.device, dtype=dtype)
    rows, ppl_fp = [], None
    if evaluate:
        t = time.time()
        ppl_fp = _ppl(model, tok, job)
        rows.append({"method": "fp", "scheme": str(next(model.parameters()).dtype).replace("torch.", ""),
                     "avg_bits": 16.0, "ppl": ppl_fp, "seconds": round(time.time() - t, 1)})
    fp_model = copy.deepcopy(model) if job.baselines else None
    t = time.time()
    model = quantize_model(model, tok, job.scheme, job.calib, job.layer, job.finetune, wd, resume=not fresh)
    seconds = time.time() - t
    bits = bits_summary(model)
    save_quantized(model, tok, output, job.scheme, skip=job.calib.skip,
                   card={"calibration": f"{job.calib.dataset} {job.calib.nsamples}x{job.calib.seqlen}"},
                   overwrite=overwrite)
    report = wd / "quantize_report.json"
    if report.exists():
        from aqlmkit.utils import atomic_copy

        atomic_copy(report, Path(output) / "quantize_report.json")
    row = {"method": "AQLM", "scheme": job.scheme.name, "avg_bits": bits["avg_bits_quantized"],
           "model_bits": bits["avg_bits_model"], "ppl": _ppl(model, tok, job) if evaluate else None,
           "seconds": round(seconds, 1)}
    rows.append(row)
    if fp_model is not None:
        from aqlmkit.app.baselines import baseline_rows

        rows += baseline_rows(fp_model, tok, job, bits_target=bits["avg_bits_quantized"],
                              ppl=lambda m: _ppl(m, tok, job) if evaluate else None)
    from aqlmkit.utils import atomic_save_json

    atomic_save_json(Path(output) / "quantize_results.json", {"rows": rows, "ppl_fp": ppl_fp})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'method':<8} {'scheme':<10} {'avg bits':>9} {'model bits':>10} {'PPL':>10} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") is not None else "-"
        mb = f"{r['model_bits']:.3f}" if r.get("model_bits") is not None else "-"
        lines.append(f"{r['method']:<8} {r['scheme']:<10} {r['avg_bits']:>9.3f} {mb:>10} {ppl:>10} "
                     f"{r['seconds']:>8}")
    return "\n".join(lines)
