"""Subprocess body of the distributed calibration tests: quantize a tiny llama, save it to OUT.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node N _dist_worker.py WD OUT``
(world N over gloo) or plainly (``python _dist_worker.py WD OUT``: the single-process path).
Env: NSAMPLES (default 8); HANG_RANK=r makes rank r sleep after block HANG_BLOCK (a hung rank); DIST_TIMEOUT seconds.
"""
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from _pipeline_helpers import fast_configs  # noqa: E402
from conftest import tiny_model  # noqa: E402

from aqlmkit.errors import AqlmkitError  # noqa: E402
from aqlmkit.pipeline import block as block_mod  # noqa: E402
from aqlmkit.pipeline.distributed import Dist, launched  # noqa: E402
from aqlmkit.pipeline.quantize import quantize_model  # noqa: E402


def _hang_after(block_idx: int) -> None:
    original = block_mod.quantize_block

    def hanging(block, idx, *a, **k):
        out = original(block, idx, *a, **k)
        if idx == block_idx:
            time.sleep(600)
        return out
    sys.modules["aqlmkit.pipeline.quantize"].quantize_block = hanging


def main(work_dir: str, out: str) -> int:
    torch.set_num_threads(1)
    dist = Dist.from_env("cpu", float(os.environ.get("DIST_TIMEOUT", "60"))) if launched() else None
    if dist is not None and os.environ.get("HANG_RANK") == str(dist.rank):
        _hang_after(int(os.environ.get("HANG_BLOCK", "0")))
    model = tiny_model("llama", num_hidden_layers=3)
    n = int(os.environ.get("NSAMPLES", "8"))
    ids = torch.randint(0, 512, (n, 16), generator=torch.Generator().manual_seed(0))
    calib, layer, ft = fast_configs(nsamples=n, seqlen=16, epochs=2)
    ft.batch_size = 3  # batches straddle the ranks' shards
    try:
        quantize_model(model, None, "2x4g8", calib, layer, ft, work_dir, calibration_data=ids,
                       progress=False, micro_batch=2, dist=dist)
    except AqlmkitError as e:
        print(f"ERROR {e}", file=sys.stderr, flush=True)
        return 2
    if dist is None or dist.is_main:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
        stats = json.loads((__import__("pathlib").Path(work_dir) / "manifest.json").read_text())["stats"]
        with open(out + ".json", "w") as f:
            json.dump(stats, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
