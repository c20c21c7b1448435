"""Subprocess body of the data-parallel global fine-tuning tests.

``python [-m torch.distributed.run --nproc_per_node N] _dist_finetune_worker.py OUT WORK_DIR``:
builds a tiny teacher and a cheap AQLM student (deterministic), runs ``finetune_global`` with PV
(over torch.distributed when torchrun launched it), checks after every evaluate() that all ranks
hold the same bits, and rank 0 writes the student to OUT (safetensors) and the stats to OUT.json.
WORK_DIR "-" means no checkpoints.
"""
import copy
import hashlib
import json
import os
import sys
from dataclasses import asdict

import torch
import torch.distributed as tdist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_model  # noqa: E402

from aqlmkit.config import GlobalFinetuneConfig, LayerQuantConfig, PVConfig, Scheme  # noqa: E402
from aqlmkit.engine import quantize_linear  # noqa: E402
from aqlmkit.nn import QuantizedLinear  # noqa: E402
from aqlmkit.pipeline import finetune_global as fg  # noqa: E402
from aqlmkit.pipeline.distributed import Dist, launched  # noqa: E402

CFG = GlobalFinetuneConfig(steps=8, lr=1e-3, batch_size=3, eval_every=2, checkpoint_every=2)
PV = PVConfig(code_lr=0.3, max_change=0.05, trust_ratio=0.05)


def build():
    """(teacher, student, train ids, val ids): identity-Hessian AQ of every decoder linear."""
    teacher = tiny_model("llama", num_hidden_layers=2)
    student = copy.deepcopy(teacher)
    torch.manual_seed(0)
    cfg = LayerQuantConfig(max_epochs=0, steps_per_epoch=0, init_max_iter=2, init_max_points=2 ** 12)
    for name, lin in [(n, m) for n, m in student.named_modules()
                      if type(m) is torch.nn.Linear and ".layers." in f".{n}"]:
        w = lin.weight.detach().float()
        qw = quantize_linear(w, torch.eye(w.shape[1]), Scheme.parse("1x4g8"), cfg, progress=False)
        student.set_submodule(name, QuantizedLinear.from_quantized(qw, dtype=torch.float32))
    ids = torch.randint(0, 512, (12, 24), generator=torch.Generator().manual_seed(0))
    return teacher, student, ids[:8], ids[8:]


def state_hash(run) -> str:
    """sha256 of every trainable param, code and straight-through tensor of the run."""
    h = hashlib.sha256()
    tensors = [p.detach() for p in run.params.values()] + [m.codes.detach() for m in run.layers]
    if run.st is not None:
        tensors += [t for _, t in sorted(run.st.state().items())]
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def check_ranks_agree(checks: list) -> None:
    """After every evaluate(), every rank must hold the same bits (debug check of the tests)."""
    original = fg._Run.evaluate

    def evaluate(self):
        original(self)
        mine = state_hash(self)
        if self.dist is not None and self.dist.world > 1:
            every = [None] * self.dist.world
            tdist.all_gather_object(every, mine)
            if len(set(every)) != 1:
                raise SystemExit(f"ranks disagree after evaluate at step {self.step}: {every}")
        checks.append(mine)
    fg._Run.evaluate = evaluate


def main(out: str, work_dir: str) -> None:
    torch.set_num_threads(1)
    dist = Dist.from_env("cpu", timeout_s=60) if launched() else None
    teacher, student, train, val = build()
    checks: list = []
    check_ranks_agree(checks)
    stats = fg.finetune_global(student, teacher, train, CFG, pv=PV, val_ids=val,
                               work_dir=None if work_dir == "-" else work_dir, progress=False, dist=dist)
    if dist is None or dist.is_main:
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, out)
        with open(out + ".json", "w") as f:
            json.dump({"stats": asdict(stats), "checks": len(checks),
                       "world": dist.world if dist else 0}, f)
    if dist is not None:
        dist.barrier("done")
        dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
