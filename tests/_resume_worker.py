"""Subprocess body of the resume test: quantize a tiny llama into WORK_DIR, save the result to OUT.

With SLOW=1 it pauses after each checkpoint so the parent can SIGKILL it mid-run.
"""
import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from _pipeline_helpers import fast_configs  # noqa: E402
from conftest import tiny_model  # noqa: E402

from aqlmkit.pipeline import checkpoint  # noqa: E402
from aqlmkit.pipeline.quantize import quantize_model  # noqa: E402


def main(work_dir: str, out: str, slow: bool) -> None:
    torch.set_num_threads(1)
    if slow:
        original = checkpoint.Checkpoint.save_block

        def save_then_wait(self, *a, **k):
            original(self, *a, **k)
            print("SAVED", a[0], flush=True)
            time.sleep(3)
        checkpoint.Checkpoint.save_block = save_then_wait
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    calib, layer, ft = fast_configs(nsamples=4, seqlen=16, epochs=2)
    quantize_model(model, None, "2x4g8", calib, layer, ft, work_dir, calibration_data=ids, progress=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], os.environ.get("SLOW") == "1")
