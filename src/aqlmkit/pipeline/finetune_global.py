"""End-to-end distillation of a quantized student from its fp teacher, with optional PV-tuning.

P-step: Adam on every continuous parameter of the decoder (codebooks, scales, norms, biases),
minimizing KL(teacher || student) on next-token distributions; embeddings and lm_head stay
frozen (they are not quantized, and are most of a small model's parameters). V-step (``pv``):
straight-through copies of the weights collect the gradient every step, and every
``eval_every`` steps a V-step re-encodes the few code groups that moved most
(``pipeline.pv_tuning``).

Nothing here may make the model worse on held-out data than what it was given: every
``eval_every`` steps the held-out KL is measured; a round of P-steps that raised it beyond
``tolerance`` is rolled back to the best state (and the learning rates halve), a V-step that did
not lower it is undone, and the best state seen is what the run leaves in ``student``.
The state is checkpointed atomically every ``checkpoint_every`` steps (``work_dir``).

Data-parallel (``dist`` with world > 1, one process per device under torchrun): every rank holds
the whole model and takes a contiguous share of each step's batch rows; its loss is its rows'
token-sum KL over the batch's token count, so losses and gradients summed over ranks (in rank
order, one flat buffer per step) are the single-process ones up to summation order. Held-out
rows are sharded the same way. Every rank then applies the same Adam step, straight-through
update and V-step to the same bits, so the ranks never drift apart and every keep / rollback /
undo decision is taken identically everywhere. Rank 0 alone writes the checkpoint; on resume it
validates and loads it and broadcasts the state, which does not depend on the world size.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from aqlmkit.config import GlobalFinetuneConfig, PVConfig
from aqlmkit.errors import AqlmkitError
from aqlmkit.nn import QuantizedLinear
from aqlmkit.kernels import reference
from aqlmkit.pipeline.distributed import Dist
from aqlmkit.pipeline.global_state import GlobalCheckpoint
from aqlmkit.pipeline.precision import float32_training
from aqlmkit.pipeline.pv_tuning import StraightThrough, quantized_layers, straight_through_forward
from aqlmkit.utils import fault_point


@dataclass
class GlobalStats:
    kl_before: float               # held-out KL of the student as given
    kl_after: float                # held-out KL of the state returned (the best one seen)
    steps: int
    codes_changed: int = 0         # code groups changed by kept V-steps (keep-best may return an earlier state)
    v_kept: int = 0
    v_undone: int = 0
    rollbacks: int = 0
    history: list[dict] = field(default_factory=list)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), in fp32."""
    t = F.log_softmax(teacher_logits.float(), -1)
    return _kl_from_logprobs(student_logits, t)


def _kl_from_logprobs(student_logits: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    return _token_kl(student_logits, t_logp).mean()


def _token_kl(student_logits: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) of every token position, in fp32."""
    s = F.log_softmax(student_logits.float(), -1)
    return (t_logp.exp() * (t_logp - s)).sum(-1)


def _sharded(dist: Dist | None) -> bool:
    """True when work is split over several ranks; a world of one runs the single-process code."""
    return dist is not None and dist.world > 1


def p_step_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters of the P-step by name: every float parameter but embeddings/lm_head."""
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise AqlmkitError("the student has no QuantizedLinear layers: give an AQLM checkpoint "
                           "(aqlmkit quantize) as --model")
    frozen = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
              for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if p.is_floating_point() and id(p) not in frozen}


@torch.no_grad()
def evaluate_kl(student, teacher, ids: torch.Tensor, device, batch_size: int = 1) -> float:
    total = 0.0
    for s in range(0, ids.shape[0], batch_size):
        b = ids[s:s + batch_size].to(device)
        total += kl_loss(student(input_ids=b).logits, teacher(input_ids=b).logits).item() * b.shape[0]
    return total / ids.shape[0]


class _HeldOut:
    """Held-out KL with the teacher's log-probs computed once (cached while they fit in 2 GiB).

    Data-parallel, each rank keeps only its shard of the rows, cut at batch boundaries so that
    every batch's KL is computed on the same rows as in a single process; the per-rank totals
    are summed (fp64, in rank order), so every rank gets the same mean and takes the same
    keep / rollback decisions.
    """

    def __init__(self, teacher, ids: torch.Tensor, device, batch_size: int, dist: Dist | None = None) -> None:
        self.bs, self.n, self.dist = max(1, batch_size), ids.shape[0], dist
        lo, hi = dist.bounds(self.n, self.bs) if _sharded(dist) else (0, self.n)
        self.teacher, self.ids, self.device = teacher, ids[lo:hi], device
        vocab = teacher.get_output_embeddings().out_features
        self.cache: list[torch.Tensor] | None = None
        if ids.numel() * vocab * 4 <= 2 ** 31:
            self.cache = [self._teacher(b) for b in self._batches()]

    def _batches(self):
        return [self.ids[s:s + self.bs].to(self.device) for s in range(0, self.ids.shape[0], self.bs)]

    @torch.no_grad()
    def _teacher(self, b: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.teacher(input_ids=b).logits.float(), -1)

    @torch.no_grad()
    def __call__(self, student) -> float:
        total = 0.0
        for i, b in enumerate(self._batches()):
            t = self.cache[i] if self.cache is not None else self._teacher(b)
            total += _kl_from_logprobs(student(input_ids=b).logits, t).item() * b.shape[0]
        if _sharded(self.dist):
            total = float(self.dist.sum_(torch.tensor([total], dtype=torch.float64)).item())
        return total / self.n


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of every step's batch [steps, bs]: one fresh permutation per epoch, so a resumed
    run sees exactly the batches an uninterrupted one would."""
    need = steps * batch_size
    perms, epoch = [], 0
    while sum(p.numel() for p in perms) < need:
        perms.append(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)))
        epoch += 1
    return torch.cat(perms)[:need].view(steps, batch_size)


def _snapshot(params: dict[str, nn.Parameter], layers: list[QuantizedLinear]) -> dict[str, torch.Tensor]:
    snap = {f"p.{n}": p.detach().clone() for n, p in params.items()}
    snap.update({f"codes.{i}": m.codes.detach().clone() for i, m in enumerate(layers)})
    return snap


@torch.no_grad()
def _restore(snap: dict[str, torch.Tensor], params: dict[str, nn.Parameter],
             layers: list[QuantizedLinear]) -> None:
    for n, p in params.items():
        p.copy_(snap[f"p.{n}"])
    for i, m in enumerate(layers):
        m.codes.copy_(snap[f"codes.{i}"])
        m.invalidate_kernel_cache()


def _check_inputs(ids: torch.Tensor, val_ids: torch.Tensor, cfg: GlobalFinetuneConfig) -> None:
    if ids.dim() != 2 or ids.shape[0] < 1:
        raise AqlmkitError("the fine-tuning set is empty: give at least one training window "
                           "(--nsamples >= 1 and a corpus with enough text)")
    if val_ids.dim() != 2 or val_ids.shape[0] < 1:
        raise AqlmkitError("the held-out set is empty: give at least one validation window (--val-samples >= 1)")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.eval_every < 1:
        raise AqlmkitError(f"global fine-tuning needs steps, batch_size and eval_every >= 1 "
                           f"(got {cfg.steps}, {cfg.batch_size}, {cfg.eval_every})")
    if not cfg.lr > 0:
        raise AqlmkitError(f"global fine-tuning lr={cfg.lr} must be a positive number")


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must be the fp model the student was quantized from (same vocab and shape)."""
    s_cfg, t_cfg = student.config, teacher.config
    if s_cfg.vocab_size != t_cfg.vocab_size:
        raise AqlmkitError(f"teacher vocab {t_cfg.vocab_size} != student vocab {s_cfg.vocab_size}: give the "
                           "fp model the student was quantized from as --teacher")
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        if getattr(s_cfg, key, None) != getattr(t_cfg, key, None):
            raise AqlmkitError(f"teacher {key}={getattr(t_cfg, key, None)!r} differs from the student's "
                               f"{getattr(s_cfg, key, None)!r}: give the fp model the student was quantized "
                               "from as --teacher")


def finetune_global(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, cfg: GlobalFinetuneConfig,
                    device="cpu", pv: PVConfig | None = None, val_ids: torch.Tensor | None = None,
                    work_dir: str | Path | None = None, resume: bool = True,
                    progress: bool = True, dist: Dist | None = None) -> GlobalStats:
    """Distil ``teacher`` into ``student`` in place (P-steps, plus V-steps with ``pv``).

    With ``dist`` every rank calls this with the same model, data and settings (see the module
    docstring); each returns the same stats and leaves the same student. The student trains in
    float32 and keeps its own dtypes afterwards (``pipeline.precision``); the teacher runs as given.
    """
    with float32_training(student) as cast:
        stats = _finetune_global(student, teacher, ids, cfg, device, pv, val_ids, work_dir, resume, progress,
                                 dist)
    if cast:  # the kept state was judged in float32; report it as stored (rounded to its dtype)
        stats.kl_after = evaluate_kl(student, teacher, ids if val_ids is None else val_ids, device,
                                     cfg.batch_size)
    return stats


def _finetune_global(student, teacher, ids, cfg, device, pv, val_ids, work_dir, resume, progress,
                     dist) -> GlobalStats:
    val_ids = ids if val_ids is None else val_ids
    _check_inputs(ids, val_ids, cfg)
    check_teacher(student, teacher)
    student.to(device), teacher.to(device)
    teacher.eval()
    student.eval()  # no dropout: the objective is deterministic given the data
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = p_step_params(student)
    layers = quantized_layers(student)
    flags = {n: p.requires_grad for n, p in params.items()}
    held_out = _HeldOut(teacher, val_ids, device, cfg.batch_size, dist)
    order = batch_order(ids.shape[0], cfg.steps, cfg.batch_size, cfg.seed)
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr, betas=(0.9, 0.95))
    st = StraightThrough(layers, pv) if pv is not None else None
    ckpt = GlobalCheckpoint(work_dir, cfg, pv, ids, val_ids) if work_dir is not None else None
    run = _Run(student, params, layers, opt, st, held_out, cfg, dist)
    if not (ckpt is not None and resume and _resume(run, ckpt, dist)):
        run.start()
    main = dist is None or dist.is_main
    bar = tqdm(total=cfg.steps, initial=run.step, desc="global finetune" + (" (PV)" if st else ""),
               disable=not (progress and main))
    saved_at = run.step
    try:
        for p in params.values():
            p.requires_grad_(True)
        while run.step < cfg.steps:
            run.train_step(ids[order[run.step]].to(device), teacher)
            bar.update(1)
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                run.evaluate()  # checkpoints fall on eval points, at least checkpoint_every apart
                if ckpt is not None and (run.step - saved_at >= cfg.checkpoint_every or run.step == cfg.steps):
                    _on_main(dist, lambda: ckpt.save(run), "saving the global fine-tuning state")
                    fault_point("global:saved")
                    saved_at = run.step
            bar.set_postfix(kl=f"{run.last_loss:.4f}", val=f"{run.best_kl:.4f}",
                            codes=run.stats.codes_changed)
    finally:
        bar.close()
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
    run.finish()
    return run.stats


def _on_main(dist: Dist | None, fn, what: str):
    """``fn()`` here without ranks, else on rank 0 with its result (or user error) on every rank."""
    return fn() if dist is None else dist.on_main(fn, what)


def _resume(run: "_Run", ckpt: GlobalCheckpoint, dist: Dist | None) -> bool:
    """Load a saved state on rank 0 and hand it to every rank; False when there is none."""
    def load() -> bool:
        if not ckpt.exists():
            return False
        ckpt.load(run)
        return True

    loaded = _on_main(dist, load, "loading the global fine-tuning state")
    if loaded and _sharded(dist):
        _broadcast_run(run, dist)
    return loaded


@torch.no_grad()
def _broadcast_run(run: "_Run", dist: Dist) -> None:
    """Every rank takes rank 0's run state: tensors by broadcast, the small rest as one object."""
    if not dist.is_main:
        run.best = _snapshot(run.params, run.layers)  # the structure the broadcast fills
    for p in run.params.values():
        dist.broadcast_(p.data)
    for m in run.layers:
        dist.broadcast_(m.codes.data)
        m.invalidate_kernel_cache()
    for key in sorted(run.best):
        dist.broadcast_(run.best[key])
    if run.st is not None:
        for key, t in sorted(run.st.state().items()):
            dist.broadcast_(t)
    rest = dist.broadcast_object(run.scalars() | {"opt": run.opt.state_dict()} if dist.is_main else None)
    if not dist.is_main:
        run.opt.load_state_dict(rest.pop("opt"))
        run.load_scalars(rest)


def _sum_grads(slots: list[torch.Tensor], loss: torch.Tensor, dist: Dist) -> float:
    """Sum ``loss`` and the gradients of ``slots`` over ranks through one flat fp32 buffer.

    Layout: [loss, one has-gradient flag per slot, each slot's gradient (zeros where it has
    none)]. A slot gets the summed gradient wherever any rank had one, so every rank ends with
    the set of gradients a single process would have (Adam skips parameters without one), even
    a rank that had no rows. Returns the summed loss.
    """
    n, sizes = len(slots), [t.numel() for t in slots]
    flat = torch.zeros(1 + n + sum(sizes), dtype=torch.float32, device=slots[0].device)
    flat[0] = loss
    off = 1 + n
    for i, (t, k) in enumerate(zip(slots, sizes)):
        if t.grad is not None:
            flat[1 + i] = 1.0
            flat[off:off + k] = t.grad.reshape(-1)
        off += k
    dist.sum_(flat)
    had = flat[1:1 + n].tolist()
    off = 1 + n
    for t, k, h in zip(slots, sizes, had):
        if h > 0:
            g = flat[off:off + k].view(t.shape).to(t.dtype, copy=True)
            if t.grad is None:
                t.grad = g
            else:
                t.grad.copy_(g)
        off += k
    return float(flat[0].item())


class _Run:
    """The mutable state of one global fine-tuning run (what a checkpoint holds)."""

    def __init__(self, student, params, layers, opt, st, held_out, cfg: GlobalFinetuneConfig,
                 dist: Dist | None = None) -> None:
        self.student, self.params, self.layers, self.opt, self.st = student, params, layers, opt, st
        self.held_out, self.cfg, self.dist = held_out, cfg, dist
        self.step, self.lr_scale, self.last_loss = 0, 1.0, float("nan")
        self.best_kl, self.best = float("inf"), {}
        self.stats = GlobalStats(float("nan"), float("nan"), 0)

    def scalars(self) -> dict:
        """Everything but tensors, as plain values (the broadcast of a resumed state)."""
        return {"step": self.step, "lr_scale": self.lr_scale, "best_kl": self.best_kl,
                "last_loss": self.last_loss, "st_steps": self.st.steps if self.st else 0,
                "stats": copy.deepcopy(self.stats)}

    def load_scalars(self, values: dict) -> None:
        self.step, self.lr_scale = values["step"], values["lr_scale"]
        self.best_kl, self.last_loss, self.stats = values["best_kl"], values["last_loss"], values["stats"]
        if self.st is not None:
            self.st.steps = values["st_steps"]
        self._set_lr()

    def start(self) -> None:
        kl = self.held_out(self.student)
        self.stats.kl_before = self.best_kl = kl
        self.best = _snapshot(self.params, self.layers)
        self.stats.history.append({"step": 0, "val_kl": kl})

    def train_step(self, batch: torch.Tensor, teacher) -> None:
        """One P-step (and straight-through step) on ``batch``, this rank's rows of it when sharded."""
        tokens = batch.numel()
        if _sharded(self.dist):
            lo, hi = self.dist.bounds(batch.shape[0])
            batch = batch[lo:hi]
        ctx = straight_through_forward(self.layers) if self.st is not None else contextlib.nullcontext()
        with ctx:
            if _sharded(self.dist):
                loss = self._sharded_backward(batch, teacher, tokens)
            else:
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch).logits
                with torch.enable_grad():
                    loss_t = kl_loss(self.student(input_ids=batch).logits, t_logits)
                    self.opt.zero_grad(set_to_none=True)
                    loss_t.backward()
                loss = loss_t.item()
            if self.st is not None:
                self.st.accumulate()
        self.opt.step()
        for m in self.layers:  # codebooks/scales moved: packed kernel operands are stale
            m.invalidate_kernel_cache()
        self.step += 1
        self.last_loss = loss
        self.stats.steps = self.step
        self.stats.history.append({"step": self.step, "train_kl": self.last_loss})

    def _sharded_backward(self, rows: torch.Tensor, teacher, tokens: int) -> float:
        """Backward of this rank's share of the batch loss, then gradients summed over ranks.

        The local loss is the token-sum KL of ``rows`` over the whole batch's ``tokens``, so
        the sum over ranks is the batch's mean KL; returns that sum.
        """
        self.opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        if rows.shape[0]:
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(input_ids=rows).logits.float(), -1)
            with torch.enable_grad():
                local = _token_kl(self.student(input_ids=rows).logits, t_logp).sum() / tokens
                local.backward()
            loss = local.detach()
        return _sum_grads(self._grad_slots(), loss, self.dist)

    def _grad_slots(self) -> list[torch.Tensor]:
        """The tensors whose gradients the step uses: P-step params, then each layer's Ŵ (PV).

        A rank that ran no rows has no Ŵ yet; it gets a detached one of the same value so the
        summed straight-through gradient has a place to land (``accumulate`` reads both).
        """
        slots = list(self.params.values())
        if self.st is not None:
            for m in self.layers:
                if getattr(m, "_st_weight", None) is None:
                    with torch.no_grad():
                        m._st_weight = reference.dequantize(m.codes, m.codebooks, m.scales).detach()
                slots.append(m._st_weight)
        return slots

    def _set_lr(self) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * self.lr_scale

    def evaluate(self) -> None:
        """P-round check (rollback beyond tolerance, keep-best), then the V-step and its check."""
        kl = self.held_out(self.student)
        rec = {"step": self.step, "val_kl": kl}
        if kl > self.best_kl * (1 + self.cfg.tolerance):
            _restore(self.best, self.params, self.layers)
            self.lr_scale *= 0.5
            self._set_lr()
            if self.st is not None:
                self.st.reset()
            self.stats.rollbacks += 1
            rec["rolled_back"] = True
            kl = self.best_kl
        elif kl < self.best_kl:
            self.best_kl, self.best = kl, _snapshot(self.params, self.layers)
        if self.st is not None:
            changes = self.st.v_step()
            n = sum(int(c.flat_idx.numel()) for c in changes)
            if n:
                kl_v = self.held_out(self.student)
                rec.update(v_groups=n, val_kl_after_v=kl_v)
                if kl_v < kl:
                    self.stats.v_kept += 1
                    self.stats.codes_changed += n
                    if kl_v < self.best_kl:
                        self.best_kl, self.best = kl_v, _snapshot(self.params, self.layers)
                else:
                    self.st.undo(changes)
                    self.stats.v_undone += 1
                    rec["v_undone"] = True
        self.stats.history.append(rec)

    def finish(self) -> None:
        """Keep-best: leave the best held-out state in the student."""
        _restore(self.best, self.params, self.layers)
        self.stats.kl_after = self.best_kl
