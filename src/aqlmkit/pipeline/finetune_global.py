"""End-to-end distillation of a quantized student from its fp teacher, with optional PV-tuning.

P-step: Adam on every continuous parameter of the decoder (codebooks, scales, norms, biases),
minimizing KL(teacher || student) on next-token distributions; embeddings and lm_head stay
frozen (they are not quantized, and are most of a small model's parameters). V-step (optional,
``pv_tuning.VStepConfig``): every ``every`` P-steps, update codes by the linearized search.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from aqlmkit.config import FinetuneConfig
from aqlmkit.errors import AqlmkitError
from aqlmkit.nn import QuantizedLinear
from aqlmkit.pipeline.pv_tuning import VStepConfig, dense_weights, v_step_layer


@dataclass
class GlobalStats:
    kl_before: float
    kl_after: float
    steps: int
    codes_changed: int = 0
    history: list[float] = field(default_factory=list)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), in fp32."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def p_step_params(model: nn.Module) -> list[nn.Parameter]:
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise AqlmkitError("the student has no QuantizedLinear layers: give an AQLM checkpoint "
                           "(aqlmkit quantize) as --model")
    frozen = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
              for p in m.parameters()}
    return [p for p in model.parameters() if p.is_floating_point() and id(p) not in frozen]


@torch.no_grad()
def evaluate_kl(student, teacher, ids: torch.Tensor, device, batch_size: int = 1) -> float:
    total = 0.0
    for s in range(0, ids.shape[0], batch_size):
        b = ids[s:s + batch_size].to(device)
        total += kl_loss(student(input_ids=b).logits, teacher(input_ids=b).logits).item() * b.shape[0]
    return total / ids.shape[0]


def _v_step(student, teacher, batch, cfg: VStepConfig) -> int:
    with dense_weights(student) as layers:
        with torch.enable_grad():
            kl_loss(student(input_ids=batch).logits, teacher(input_ids=batch).logits).backward()
        grads = [(m, m._dense.grad) for m in layers]
    return sum(v_step_layer(m, g, cfg) for m, g in grads if g is not None)


def finetune_global(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, cfg: FinetuneConfig,
                    device="cpu", v_step: VStepConfig | None = None, eval_ids: torch.Tensor | None = None,
                    progress: bool = True) -> GlobalStats:
    """Distil ``teacher`` into ``student`` in place (P-steps, plus V-steps when ``v_step``)."""
    eval_ids = ids if eval_ids is None else eval_ids
    student.to(device), teacher.to(device)
    teacher.eval()
    student.eval()  # no dropout: the objective is deterministic given the data
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = p_step_params(student)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    before = evaluate_kl(student, teacher, eval_ids, device, cfg.batch_size)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    bs, step, changed, hist = max(1, cfg.batch_size), 0, 0, []
    total = cfg.epochs * ((ids.shape[0] + bs - 1) // bs)
    bar = tqdm(total=total, desc="global finetune", disable=not progress)
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(ids.shape[0], generator=gen)
            for s in range(0, len(order), bs):
                batch = ids[order[s:s + bs]].to(device)
                with torch.enable_grad():
                    with torch.no_grad():
                        t_logits = teacher(input_ids=batch).logits
                    loss = kl_loss(student(input_ids=batch).logits, t_logits)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                step += 1
                hist.append(loss.item())
                if v_step is not None and step % max(1, v_step.every) == 0:
                    changed += _v_step(student, teacher, batch, v_step)
                bar.update(1)
                bar.set_postfix(kl=f"{hist[-1]:.4f}", codes_changed=changed)
    finally:
        bar.close()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    after = evaluate_kl(student, teacher, eval_ids, device, cfg.batch_size)
    return GlobalStats(before, after, step, changed, hist)
