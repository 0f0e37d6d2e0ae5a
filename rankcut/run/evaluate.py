"""Accuracy, top-k, cross-entropy, and agreement/KL against a reference, as sums that merge exactly.

Every figure is a float64 sum over samples (see ``SUMS``), so shards evaluated by different processes
add up to the single-process result; ``summarize`` turns the sums into means. Samples labelled
``UNLABELED`` count towards agreement and KL but not towards accuracy or cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from rankcut import dist
from rankcut.model.contract import InputContract
from rankcut.run.data import UNLABELED, loader, shard
from rankcut.errors import RankcutError, one_line
from rankcut.model.forward import eval_mode, probe

SUMS = ("samples", "labeled", "top1", "topk", "ce", "ref_top1", "ref_topk", "ref_ce", "agree", "kl", "nonfinite")
TOP_K = 5


def output_classes(model: nn.Module, contract: InputContract) -> int:
    """How many classes the model scores: the width of its output for one zero image."""
    try:
        out = probe(model, contract.shape)
    except RuntimeError as e:
        raise RankcutError(f"the model cannot run on input {contract.shape}: {one_line(str(e))[:160]}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise RankcutError("the model must return a batch of logits (N x classes)")
    return out.shape[1]


def check_peer(peer: nn.Module, peer_contract: InputContract, peer_name: str, contract: InputContract,
               classes: int, name: str) -> None:
    """Refuse a model compared or distilled with another (``name``) that takes other input or scores other classes."""
    if peer_contract != contract:
        raise RankcutError(f"{peer_name} expects input {peer_contract.to_dict()}, {name} {contract.to_dict()}")
    peer_classes = output_classes(peer, contract)
    if peer_classes != classes:
        raise RankcutError(f"{peer_name} scores {peer_classes} classes, {name} {classes}: they score different "
                           "numbers of classes")


def known_labels(dataset: Dataset) -> torch.Tensor | None:
    """All labels of a dataset when they are held in memory (tensor files, ImageFolder, torchvision sets)."""
    if isinstance(dataset, Subset):
        base = known_labels(dataset.dataset)
        return None if base is None else base[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for holder in (dataset, getattr(dataset, "base", None)):
        for attr in ("y", "targets"):
            labels = getattr(holder, attr, None)
            if labels is not None:
                return torch.as_tensor(labels, dtype=torch.long)
    return None


def check_labels(labels: torch.Tensor, classes: int, need_labels: bool, what: str) -> None:
    """Refuse labels the model cannot predict, and unlabelled samples where labels are needed."""
    if labels.numel() == 0:
        return
    bad = labels[(labels >= classes) | (labels < UNLABELED)]
    if bad.numel():
        raise RankcutError(f"{what} has label {int(bad[0])}, outside the model's {classes} classes (0..{classes - 1})")
    if need_labels and bool((labels == UNLABELED).any()):
        raise RankcutError(f"{what} has unlabelled samples; train on them only by pure distillation "
                           "(--teacher T.safetensors --kd-alpha 1)")


def check_dataset_labels(dataset: Dataset, classes: int, need_labels: bool, what: str) -> None:
    """Check every label before any work starts, where the labels are known without loading images."""
    labels = known_labels(dataset)
    if labels is not None:
        check_labels(labels, classes, need_labels, what)


def batch_sums(logits: torch.Tensor, labels: torch.Tensor, k: int,
               ref_logits: torch.Tensor | None = None) -> torch.Tensor:
    """The ``SUMS`` of one batch as a float64 vector on the logits' device (no host synchronisation)."""
    labels = labels.to(logits.device)
    labeled = labels != UNLABELED
    safe = labels.clamp(min=0)  # unlabelled rows are masked out below; any valid index keeps gather happy

    def scores(z: torch.Tensor) -> list[torch.Tensor]:
        z = z.double()
        top = z.topk(k, dim=1).indices
        finite = torch.isfinite(z).all(dim=1)  # NaN logits name no class: count them as wrong, not as class 0
        hit1 = (top[:, 0] == labels) & labeled & finite
        hitk = (top == labels[:, None]).any(dim=1) & labeled & finite
        ce = nn.functional.cross_entropy(z, safe, reduction="none")
        return [hit1.sum().double(), hitk.sum().double(), torch.where(labeled, ce, 0.0).sum()]

    zero = logits.new_zeros((), dtype=torch.float64)
    parts = [zero + len(labels), labeled.sum().double(), *scores(logits)]
    nonfinite = ~torch.isfinite(logits).all(dim=1)
    if ref_logits is None:
        parts += [zero] * 5
    else:
        log_p, log_q = ref_logits.double().log_softmax(1), logits.double().log_softmax(1)
        agree = ((logits.argmax(1) == ref_logits.argmax(1)) & ~nonfinite).sum().double()
        parts += [*scores(ref_logits), agree, (log_p.exp() * (log_p - log_q)).sum()]
        nonfinite |= ~torch.isfinite(ref_logits).all(dim=1)
    return torch.stack(parts + [nonfinite.sum().double()])


def summarize(sums: torch.Tensor, k: int, with_reference: bool) -> dict:
    """Means from ``SUMS``: top-1, top-k, cross-entropy (None without labels), and the reference figures."""
    s = dict(zip(SUMS, sums.tolist()))
    n, m = int(s["samples"]), int(s["labeled"])

    def mean(key: str, over: int) -> float | None:
        return s[key] / over if over else None

    out = {"samples": n, "labeled": m, "k": k, "top1": mean("top1", m), "topk": mean("topk", m),
           "loss": mean("ce", m), "nonfinite": int(s["nonfinite"])}
    if with_reference:
        out["reference"] = {"top1": mean("ref_top1", m), "topk": mean("ref_topk", m), "loss": mean("ref_ce", m)}
        out["agreement"], out["kl"] = mean("agree", n), mean("kl", n)
    return out


def evaluate(model: nn.Module, dataset: Dataset, classes: int, *, device: torch.device, batch_size: int,
             workers: int = 0, reference: nn.Module | None = None, ctx: dist.Context | None = None,
             progress=None) -> dict:
    """Evaluate ``model`` (and ``reference``) on ``dataset``; under torchrun each process takes a shard."""
    return evaluate_many([model], dataset, classes, device=device, batch_size=batch_size, workers=workers,
                         reference=reference, ctx=ctx, progress=progress)[0]


def evaluate_many(models: list[nn.Module], dataset: Dataset, classes: int, *, device: torch.device,
                  batch_size: int, workers: int = 0, reference: nn.Module | None = None,
                  ctx: dist.Context | None = None, progress=None) -> list[dict]:
    """Evaluate several models (each against ``reference``) in one pass over ``dataset``.

    One pass, so each batch is loaded and the reference run once however many models are compared.
    """
    ctx = ctx or dist.Context(0, 1, device)
    part = shard(dataset, ctx.rank, ctx.world)
    k = min(TOP_K, classes)
    sums = torch.zeros(len(models), len(SUMS), dtype=torch.float64, device=device)
    everything = list(models) + ([reference] if reference is not None else [])
    if len(part):
        batches = loader(part, batch_size, workers)
        task = progress.add_task("evaluating", total=len(batches), info="") if progress else None
        with eval_mode(*everything), torch.inference_mode():
            for x, y in batches:
                check_labels(y, classes, False, "the evaluation data")
                x = x.to(device)
                ref = reference(x).float() if reference is not None else None
                for i, model in enumerate(models):
                    sums[i] += batch_sums(model(x).float(), y, k, ref)
                if task is not None:
                    progress.update(task, advance=1)
        if task is not None:
            progress.remove_task(task)
    dist.all_reduce_sum_([sums], ctx)
    return [summarize(row, k, reference is not None) for row in sums]
