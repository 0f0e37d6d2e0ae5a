"""The passes over data that fill the accumulators of ``stats.moments``: hooks on every target at once.

One forward pass per batch gathers every target's output moments; with gradient statistics, one forward
and ``probes`` backward passes per batch more. Memory does not grow with the data.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from rankcut.dist import Context
from rankcut.errors import RankcutError
from rankcut.model.layers import channels_last
from rankcut.model.targets import Target
from rankcut.stats.moments import GradientSums, Moments, ShiftedSums


@contextmanager
def hooks(model: nn.Module, names: dict[str, str], fn) -> Iterator[None]:
    """Call ``fn(layer_name, output)`` whenever the module ``names[layer_name]`` produces an output.

    ``fn`` may return a replacement output (as a forward hook may). Hooks are always removed.
    """
    handles = []
    try:
        for layer, capture in names.items():
            module = model.get_submodule(capture)
            handles.append(module.register_forward_hook(lambda _, __, out, layer=layer: fn(layer, out)))
        yield
    finally:
        for h in handles:
            h.remove()


def collect_moments(model: nn.Module, targets: list[Target], batches, ctx: Context,
                    advance=lambda: None) -> dict[str, Moments]:
    """Output moments of every target over all ``batches``, in one forward pass per batch."""
    acc = {t.name: ShiftedSums(channels_last(model.get_submodule(t.name))) for t in targets}

    def observe(layer, out):
        acc[layer].add(out.detach())
        if not acc[layer].finite():
            if torch.isfinite(out).all():
                raise RankcutError(f"layer {layer} has outputs too large for float32 statistics (up to "
                                   f"{out.detach().abs().max().item():.3g}); statistics would be meaningless")
            raise RankcutError(f"layer {layer} produced NaN or Inf on the data; statistics would be meaningless")

    model.eval()
    with hooks(model, {t.name: t.capture for t in targets}, observe), torch.inference_mode():
        for x, _ in batches:
            model(x.to(ctx.device, non_blocking=True))
            advance()
    missing = [name for name, a in acc.items() if a.shift is None]
    if missing and not ctx.distributed:
        raise RankcutError(f"layers never ran on the data: {', '.join(missing)}")
    return {t.name: (_empty_like(model, t) if t.name in missing else acc[t.name].moments()).all_reduce(ctx)
            for t in targets}


def _empty_like(model: nn.Module, target: Target) -> Moments:
    from rankcut.model.layers import out_width

    return Moments.empty(out_width(model.get_submodule(target.name)))


LOSSES = ("kl", "mse")


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of sample ``index``'s random draws (its probes here, its sampled positions in refit): the
    same wherever the sample lands (process, batch).

    A CPU generator uses only the low 32 bits of its seed, so ``(seed, index)`` is hashed into them
    rather than packed side by side.
    """
    state = np.random.SeedSequence([seed % 2 ** 64, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def draw_probes(logits: torch.Tensor, loss: str, generators: list[torch.Generator]) -> torch.Tensor:
    """One random vector per sample in output space, row i drawn from ``generators[i]``.

    E[r r^T] is half the output-space Hessian of the loss, so ``d' E[r r^T] d`` is the loss's second-order
    change for an output change d. ``mse``: Gaussian over the square root of the outputs per sample (the loss
    is the mean squared error per output). ``kl``: ``(onehot(y) - softmax) / sqrt(2)`` with y drawn from the
    model's own softmax (no labels needed; the loss is the KL divergence from the original outputs). Drawn on
    the CPU, so the probes do not depend on the device either.
    """
    rows = logits.detach().float().cpu()
    if loss == "mse":
        r = torch.stack([torch.randn(row.shape, generator=g) for row, g in zip(rows, generators)])
        r = r / rows[0].numel() ** 0.5
    else:
        p = torch.softmax(rows, dim=-1)
        y = torch.stack([torch.multinomial(row, 1, generator=g) for row, g in zip(p, generators)])
        r = (torch.zeros_like(p).scatter_(1, y, 1.0) - p) / 2 ** 0.5
    return r.to(logits.device, logits.dtype)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients, so backward passes compute activation gradients only."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def collect_gradients(model: nn.Module, targets: list[Target], batches, moments: dict[str, Moments], loss: str,
                      probes: int, seed: int, ctx: Context, advance=lambda: None,
                      indices: Sequence[int] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Second-order probe statistics of every target, one forward and ``probes`` backward passes per batch.

    ``moments`` (from a forward-only pass first) give the means used for centring. ``indices``: the index
    in the whole data of each sample ``batches`` yields, in order (default 0, 1, 2, ...); each sample's
    probes are drawn from ``sample_generator(seed, index)``, so the statistics are the same whatever the
    batch size and however many processes share the data.
    """
    if loss not in LOSSES:
        raise RankcutError(f"--grad must be one of {', '.join(LOSSES)}, got {loss!r}")
    if probes < 1:
        raise RankcutError("--probes must be at least 1")
    acc = {t.name: GradientSums(moments[t.name].mean.to(ctx.device), channels_last(model.get_submodule(t.name)))
           for t in targets}
    captured: dict[str, torch.Tensor] = {}

    def capture(layer, out):
        if not out.requires_grad:
            out.requires_grad_(True)  # the first captured layers: start the graph here
        captured[layer] = out
        return out.clone()  # what follows may work in place (ReLU(inplace=True)); keep ``out`` as it was

    positions = iter(indices if indices is not None else itertools.count())
    model.eval()
    with hooks(model, {t.name: t.capture for t in targets}, capture), frozen(model), torch.enable_grad():
        for x, _ in batches:
            generators = [sample_generator(seed, next(positions)) for _ in range(len(x))]
            captured.clear()
            logits = model(x.to(ctx.device, non_blocking=True))
            layers = list(captured)
            for probe in range(probes):
                r = draw_probes(logits, loss, generators)
                grads = torch.autograd.grad(logits, [captured[n] for n in layers], grad_outputs=r,
                                            retain_graph=probe < probes - 1, allow_unused=True)
                for name, g in zip(layers, grads):
                    z = captured[name].detach()
                    acc[name].add(z, torch.zeros_like(z) if g is None else g)
            advance()
    return {name: a.arrays(ctx) for name, a in acc.items()}
