"""Helpers shared by the pipeline tests: configs small enough for tiny models on 2 cores."""
from __future__ import annotations

from aqlmkit.config import CalibrationConfig, FinetuneConfig, LayerQuantConfig


def fast_configs(nsamples=6, seqlen=32, epochs=2, device="cpu"):
    calib = CalibrationConfig(nsamples=nsamples, seqlen=seqlen, device=device)
    layer = LayerQuantConfig(max_epochs=2, steps_per_epoch=5, init_max_iter=5, beam_size=1)
    ft = FinetuneConfig(epochs=epochs, lr=1e-3, val_fraction=0.2)
    return calib, layer, ft
