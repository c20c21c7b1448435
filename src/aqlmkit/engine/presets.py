"""Named LayerQuantConfig presets for the engine.

``fast_cpu`` fits the SmolLM2-135M job (210 linears, 2x8g8) into ~5 min of engine time on 2
shared CPU cores: measured ~9.6 s per block (7 linears) under load, mean relative error ~0.009
vs ~0.016 for GPTQ-2bit g128. Code-search sweeps buy the most error per second, so the preset
keeps 2 sweeps and few Adam steps at a larger lr. ``paper`` is the AQLM paper's setting (GPU).
"""
from __future__ import annotations

from aqlmkit.config import LayerQuantConfig

ENGINE_PRESETS: dict[str, dict] = {
    "fast_cpu": dict(beam_size=1, max_epochs=2, steps_per_epoch=10, lr=1e-3, init_max_iter=10,
                     init_max_points=2 ** 14, relative_mse_tolerance=0.01),
    "balanced_cpu": dict(beam_size=1, max_epochs=3, steps_per_epoch=5, lr=1e-3, init_max_iter=10,
                         init_max_points=2 ** 14, relative_mse_tolerance=0.01),
    "gpu": dict(beam_size=1, max_epochs=8, steps_per_epoch=100, lr=1e-4, init_max_iter=50,
                relative_mse_tolerance=0.01),
    "paper": dict(beam_size=8, max_epochs=100, steps_per_epoch=100, lr=1e-4, init_max_iter=100,
                  relative_mse_tolerance=0.01),
}


def engine_preset(name: str, **overrides) -> LayerQuantConfig:
    """LayerQuantConfig for a named preset (see ENGINE_PRESETS), with field overrides."""
    from aqlmkit.errors import AqlmkitError

    if name not in ENGINE_PRESETS:
        raise AqlmkitError(f"unknown engine preset {name!r}; choose one of {sorted(ENGINE_PRESETS)}")
    return LayerQuantConfig(**{**ENGINE_PRESETS[name], **overrides})
