"""`aqlmkit finetune` as a job: load student and teacher, run the global stages, save (rank 0).

Under torchrun every rank loads both models and runs the stages data-parallel
(``pipeline.finetune_global``); rank 0 alone checks the output folder first and writes the result.
"""
from __future__ import annotations

from pathlib import Path

from aqlmkit.app.recipes import Recipe
from aqlmkit.errors import AqlmkitError


def run_finetune_job(model_spec: str, teacher_spec: str, output: str | Path, recipe: Recipe,
                     work_dir: str | Path, fresh: bool = False, dtype: str = "auto", overwrite: bool = False,
                     dist_timeout: float = 1800.0) -> list[dict] | None:
    """Distil ``teacher_spec`` into the AQLM checkpoint ``model_spec``; the stage stats on rank 0."""
    from aqlmkit.app.launch import join

    dist = join(recipe.calibration.device, dist_timeout)
    try:
        return _run(model_spec, teacher_spec, output, recipe, Path(work_dir), fresh, dtype, overwrite, dist)
    finally:
        if dist is not None:
            dist.close()


def _run(model_spec, teacher_spec, output, recipe, work_dir, fresh, dtype, overwrite, dist):
    from aqlmkit.app.job import run_global_stages
    from aqlmkit.formats.aqlm_hf import check_output_dir, save_quantized
    from aqlmkit.formats.loading import load_model
    from aqlmkit.pipeline.finetune_global import check_teacher
    from aqlmkit.pipeline.pv_tuning import quantized_layers

    def checks() -> None:
        check_output_dir(output, overwrite=overwrite, sources=[model_spec, teacher_spec])

    dist.on_main(checks, "checking the output folder") if dist is not None else checks()
    device = str(dist.device) if dist is not None else recipe.calibration.device
    student, tok = load_model(model_spec, device=device, dtype=dtype)
    layers = quantized_layers(student)
    if not layers:
        raise AqlmkitError(f"{model_spec} is not an AQLM checkpoint (no quantized layers): quantize it "
                           "first with `aqlmkit quantize`")
    teacher, _ = load_model(teacher_spec, device=device, dtype=dtype)
    check_teacher(student, teacher)
    stats = run_global_stages(student, teacher, tok, recipe, work_dir, fresh, dist=dist)
    if dist is not None and not dist.is_main:
        return None
    save_quantized(student, tok, output, layers[0].scheme,
                   card={"finetune": ", ".join(f"{s['stage']} {s['steps']} steps" for s in stats)},
                   overwrite=overwrite)
    return stats
