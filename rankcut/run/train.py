"""The fine-tuning loop: SGD/AdamW, cosine schedule with warm-up, distillation, DDP, bf16 autocast.

Under torchrun the student is wrapped in DistributedDataParallel (the teacher never is), each process
reads its part of the data through a DistributedSampler, and every step all-reduces a few figures
(loss, accuracy, label and finiteness flags) so that all processes stop together, with one error,
before a bad step is taken. Only the primary process writes the checkpoint, after checking that the
replicas' parameters are bit-identical and finite.
"""

from __future__ import annotations

import hashlib
import math
import traceback
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as td
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from rankcut import dist
from rankcut.files.checkpoint import CheckpointMeta, save
from rankcut.run.data import UNLABELED, loader
from rankcut.errors import RankcutError
from rankcut.run.evaluate import evaluate

OPTIMIZERS = ("sgd", "adamw")
# AdamW's first steps move every weight by about the learning rate, whatever its gradient (m / sqrt(v) is
# about +-1 while v has seen few batches): 5% of a 62-step epoch (3 steps) took a refitted resnet18 from 91.7%
# to 26% top-1 in 4 steps, and the epoch ended below where it started; a fifth of the steps keeps them small.
DEFAULT_WARMUP = 0.2


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters; validated on construction, recorded in the checkpoint's history."""

    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    label_smoothing: float = 0.0
    warmup: float = DEFAULT_WARMUP
    kd_alpha: float = 0.0
    kd_temperature: float = 2.0
    amp: bool = False
    save_every: int = 0
    seed: int = 0
    workers: int = 0

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (0 <= self.warmup < 1, "--warmup is a fraction of all steps, in [0, 1)"),
            (0 <= self.kd_alpha <= 1, "--kd-alpha must be in [0, 1]"),
            (self.kd_temperature > 0, "--kd-temperature must be positive"),
            (self.save_every >= 0, "--save-every must not be negative"),
            (self.workers >= 0, "--workers must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise RankcutError(message)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EpochSummary:
    """What one epoch did, over all processes; ``acc`` is None without labels, ``agree`` without a teacher."""

    epoch: int
    lr: float
    loss: float
    acc: float | None
    agree: float | None
    images: int
    images_per_s: float
    eval: dict | None = None


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Learning rate at ``step`` (0-based) of ``total``: linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * progress))


def schedule(cfg: TrainConfig) -> str:
    """The learning-rate schedule ``lr_at`` follows, in words, with its peak (what --lr sets)."""
    warmup = f"linear warm-up over the first {100 * cfg.warmup:g}% of steps, then " if cfg.warmup else ""
    return f"{cfg.optimizer}, lr peak {cfg.lr:g}: {warmup}cosine decay to 0 at the last step"


class DistillationLoss:
    """``(1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T)``, with each part in the result."""

    def __init__(self, alpha: float = 0.0, temperature: float = 1.0, label_smoothing: float = 0.0):
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        parts = {}
        if self.alpha < 1:
            parts["ce"] = nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing,
                                                      ignore_index=UNLABELED)
        if self.alpha > 0:
            if teacher_logits is None:
                raise ValueError("distillation with kd_alpha > 0 needs teacher logits")
            t = self.temperature
            parts["kd"] = nn.functional.kl_div((logits / t).log_softmax(1), (teacher_logits / t).log_softmax(1),
                                               reduction="batchmean", log_target=True) * t * t
        parts["loss"] = (1 - self.alpha) * parts.get("ce", 0.0) + self.alpha * parts.get("kd", 0.0)
        return parts


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW (``momentum`` is its beta1); biases and norm parameters get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def autocast_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast when asked for and the device supports it (every CPU; CUDA GPUs from Ampere on)."""
    if not cfg.amp:
        return False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RankcutError("--amp needs bf16 support, which this GPU lacks; run without --amp")
    return True


def parameter_digest(model: nn.Module) -> bytes:
    """SHA-256 over every parameter's bytes, in name order: equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def check_replicas_agree(model: nn.Module, ctx: dist.Context) -> None:
    """Raise on every process if any DDP replica's parameters differ from the primary's."""
    if not ctx.distributed:
        return
    mine = torch.tensor(list(parameter_digest(model)[:8]), dtype=torch.int64, device=ctx.device)
    primary = mine.clone()
    td.broadcast(primary, src=0)
    differs = torch.tensor([int(not torch.equal(mine, primary))], dtype=torch.int64, device=ctx.device)
    dist.all_reduce_sum_([differs], ctx)
    if differs.item():
        raise RankcutError(f"the {ctx.world} DDP replicas ended with different parameters; not writing the result")


def require_finite(model: nn.Module) -> None:
    """Refuse to write a model with NaN or infinite parameters or buffers."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RankcutError(f"{name} holds NaN or infinite values; not writing the checkpoint")


def fit(model: nn.Module, train_set: Dataset, cfg: TrainConfig, ctx: dist.Context, *, classes: int,
        teacher: nn.Module | None = None, eval_set: Dataset | None = None,
        save: Callable[[nn.Module, list[EpochSummary]], None] | None = None,
        progress=None, log: Callable[[str], None] = lambda _: None) -> list[EpochSummary]:
    """Train ``model`` in place; call ``save`` (primary only) every ``save_every`` epochs and at the end."""
    if cfg.kd_alpha > 0 and teacher is None:
        raise RankcutError("--kd-alpha needs a --teacher")
    try:
        return _fit(model, train_set, cfg, ctx, classes, teacher, eval_set, save, progress, log)
    except BaseException as e:
        # The traceback keeps the failed frames, and with them DDP, alive past the process group's
        # teardown; the process would then abort at exit instead of ending with one error line.
        traceback.clear_frames(e.__traceback__)
        raise


def _fit(model, train_set, cfg, ctx, classes, teacher, eval_set, save, progress, log) -> list[EpochSummary]:
    torch.manual_seed(cfg.seed + ctx.rank)
    model.to(ctx.device).train()
    if teacher is not None:
        teacher.to(ctx.device).eval().requires_grad_(False)
    net = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None) \
        if ctx.distributed else model
    sampler = DistributedSampler(train_set, ctx.world, ctx.rank, shuffle=True, seed=cfg.seed) \
        if ctx.distributed else None
    per_process = len(sampler) if sampler is not None else len(train_set)
    batches = loader(train_set, cfg.batch_size, cfg.workers, shuffle=True, seed=cfg.seed, sampler=sampler,
                     drop_last=per_process >= cfg.batch_size)
    step = _Step(net, teacher, make_optimizer(model, cfg), DistillationLoss(cfg.kd_alpha, cfg.kd_temperature,
                 cfg.label_smoothing), classes, autocast_enabled(cfg, ctx.device), ctx)
    total = cfg.epochs * len(batches)
    warmup = round(cfg.warmup * total)
    summaries: list[EpochSummary] = []
    for epoch in range(cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(batches), info="") if progress else None
        totals = torch.zeros(len(_FIGURES), dtype=torch.float64)
        start = time.perf_counter()
        for i, (x, y) in enumerate(batches):
            lr = lr_at(epoch * len(batches) + i, total, cfg.lr, warmup)
            totals += step(x, y, lr, epoch, i)
            if task is not None:
                progress.update(task, advance=1, info=_info(totals, time.perf_counter() - start))
        if task is not None:
            progress.remove_task(task)
        summary = _summary(epoch, lr, totals, time.perf_counter() - start, teacher is not None)
        if eval_set is not None:
            summary = replace(summary, eval=evaluate(model, eval_set, classes, device=ctx.device,
                                                     batch_size=cfg.batch_size, workers=cfg.workers, ctx=ctx,
                                                     progress=progress))
        summaries.append(summary)
        log(describe(summary, cfg.epochs))
        last = epoch + 1 == cfg.epochs
        if last:
            check_replicas_agree(model, ctx)
        if save is not None and ctx.primary and (last or (cfg.save_every and (epoch + 1) % cfg.save_every == 0)):
            require_finite(model)
            save(model, summaries)
    dist.barrier(ctx)
    return summaries


# The figures every process all-reduces after each step, so that all of them decide alike.
_FIGURES = ("loss", "seen", "correct", "labeled", "agree", "nonfinite", "unlabeled", "outside")


@dataclass
class _Step:
    """One optimisation step; the step is skipped, on every process, if any process saw a bad batch."""

    net: nn.Module
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    criterion: DistillationLoss
    classes: int
    amp: bool
    ctx: dist.Context

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, epoch: int, index: int) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Bad labels are flagged, and masked so the forward pass cannot crash (on CUDA: a device assert).
        outside = (y >= self.classes) | (y < UNLABELED)
        missing = self.criterion.alpha < 1 and bool((y == UNLABELED).any())
        y = y.masked_fill(outside, UNLABELED).to(self.ctx.device)
        x = x.to(self.ctx.device)
        with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.net(x)
            with torch.no_grad():
                t_logits = self.teacher(x).float() if self.teacher is not None else None
        losses = self.criterion(logits.float(), y, t_logits)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        loss = losses["loss"].detach().double()
        pred, labeled = logits.detach().argmax(1), y != UNLABELED
        figures = torch.stack([
            torch.where(torch.isfinite(loss), loss, 0.0) * len(y),
            loss.new_tensor(len(y)),
            ((pred == y) & labeled).sum().double(),
            labeled.sum().double(),
            (pred == t_logits.argmax(1)).sum().double() if t_logits is not None else loss.new_tensor(0.0),
            (~torch.isfinite(loss)).double(),
            loss.new_tensor(float(missing)),
            loss.new_tensor(float(outside.any())),
        ])
        dist.all_reduce_sum_([figures], self.ctx)
        figures = figures.cpu()
        self._check(dict(zip(_FIGURES, figures.tolist())), lr, epoch, index)
        self.optimizer.step()
        return figures

    def _check(self, f: dict, lr: float, epoch: int, index: int) -> None:
        if f["outside"]:
            raise RankcutError(f"the training data has labels outside the model's {self.classes} classes "
                               f"(0..{self.classes - 1})")
        if f["unlabeled"]:
            raise RankcutError("the training data has unlabelled samples; train on them only by pure distillation "
                               "(--teacher T.safetensors --kd-alpha 1)")
        if f["nonfinite"]:
            raise RankcutError(f"the loss became NaN or infinite in epoch {epoch + 1}, step {index + 1} "
                               f"(lr {lr:.3g}); stopped without writing weights (try a lower --lr)")


def saver(meta: CheckpointMeta, output: str, details: dict) -> Callable[[nn.Module, list[EpochSummary]], None]:
    """The ``save`` callback for ``fit``: write ``output`` atomically, keeping ``meta`` plus a finetune entry."""

    def write(model: nn.Module, summaries: list[EpochSummary]) -> None:
        last = summaries[-1]
        result = {"epochs_done": last.epoch, "loss": last.loss, "acc": last.acc, "teacher_agreement": last.agree}
        if last.eval is not None:
            result |= {"eval_top1": last.eval["top1"], "eval_loss": last.eval["loss"]}
        save(model, meta.with_history("finetune", **details, **result), output)

    return write


def _info(totals: torch.Tensor, seconds: float) -> str:
    t = dict(zip(_FIGURES, totals.tolist()))
    text = f"loss {t['loss'] / t['seen']:.4f}"
    if t["labeled"]:
        text += f"  acc {100 * t['correct'] / t['labeled']:.1f}%"
    return text + f"  {t['seen'] / max(seconds, 1e-9):,.0f} img/s"


def _summary(epoch: int, lr: float, totals: torch.Tensor, seconds: float, with_teacher: bool) -> EpochSummary:
    t = dict(zip(_FIGURES, totals.tolist()))
    return EpochSummary(epoch=epoch + 1, lr=lr, loss=t["loss"] / t["seen"],
                        acc=t["correct"] / t["labeled"] if t["labeled"] else None,
                        agree=t["agree"] / t["seen"] if with_teacher else None,
                        images=int(t["seen"]), images_per_s=t["seen"] / max(seconds, 1e-9))


def describe(s: EpochSummary, epochs: int) -> str:
    """One log line for an epoch."""
    text = f"epoch {s.epoch}/{epochs}: loss {s.loss:.4f}"
    if s.acc is not None:
        text += f", train acc {100 * s.acc:.2f}%"
    if s.agree is not None:
        text += f", teacher agreement {100 * s.agree:.2f}%"
    if s.eval is not None and s.eval["top1"] is not None:
        text += f", eval top-1 {100 * s.eval['top1']:.2f}%"
    return text + f", {s.images_per_s:,.0f} img/s"
