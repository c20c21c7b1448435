"""The one table of dtype names aqlmkit accepts (CLI flags, config files, checkpoints' config.json)."""
from __future__ import annotations

import torch

from aqlmkit.errors import AqlmkitError

FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                        "bfloat16": torch.bfloat16}
ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                           "float": "float32"}
NAMES = tuple(FLOAT_DTYPES)  # argparse choices


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """"float16", "bf16", "torch.float32", a torch.dtype -> the torch float dtype; else one clear error."""
    if isinstance(name, torch.dtype):
        if name not in FLOAT_DTYPES.values():
            raise AqlmkitError(f"unsupported dtype {name}; use float32, float16 or bfloat16")
        return name
    key = str(name).replace("torch.", "").strip().lower()
    key = ALIASES.get(key, key)
    if key not in FLOAT_DTYPES:
        raise AqlmkitError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return FLOAT_DTYPES[key]


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto``/None is float32 on CPU (fp16 matmuls are slow there) and float16 on CUDA."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return parse_dtype(dtype)
