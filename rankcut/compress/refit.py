"""Closed-form refit of a compressed model against the model it was compressed from (its teacher), no labels.

Each compressed layer is refitted, in the order the network computes them, so that its output on the
*compressed* model's own input matches the *teacher's* output at the same place on the teacher's own input
(asymmetric reconstruction: errors of the layers before it are corrected, not compounded). With ``x~`` the
layer's input patch with a 1 appended (its bias) and ``y`` the teacher's output, one pass over the data
gathers ``A = E[x~ x~']`` ((P x P), P = inputs per output + 1), ``B = E[y x~']`` and ``c = E[|y|^2]`` (each
batch's products in float32 under the default ridge, summed in float64; the solves in float64); the layer's
affine map ``M`` then minimises the ridge objective

    f(M) = c - 2 tr(M B') + tr(M (A + delta D) M'),   delta = damping x mean eigenvalue of A's weight block

(D: identity on the weights, zero on the bias), exactly ``E|y - M x~|^2 + delta |weights|^2``:

- a whole layer (a channel-pruned consumer, or any layer with ``every``): ``M = B A'^-1``;
- a pair ``M = U W~ + b2 e'``: ``down`` given ``up`` is ``W~ = U^+ (B A'^-1 - b2 e')``, ``up`` given
  ``down`` is ``[U b2] = B G' (G A' G')^+`` with ``G = [W~; e']``. Both steps minimise ``f`` exactly over their
  half, so ``f`` never increases; they alternate for ``rounds`` rounds. When the teacher's map has rank <= k
  on the data, one round reaches it.

A layer keeps its old weights when the refit would not lower its (unregularised) error on the refit data.
When the refit data give a layer no more rows (samples x output positions) than it has inputs, ``A`` is
kept as its n rows instead (the dual form: n x P, not P x P), and the same maps come from n x n solves:
``B A'^-1 = Y' (X X' + delta I)^-1 X`` on centred rows (the bias is not damped), ``G A' G'`` from ``X G'``
(a linear layer reading 9,216 features refitted on 256 samples: a 256^2 solve instead of a 9,217^2 one).
The memory is that of one layer's ``A`` or rows at a time (P^2 float64: 170 MB for a 3x3 conv reading 512
channels); the time is one forward pass of the compressed model per refitted layer, stopped at that layer,
and one of the teacher for all layers (its outputs kept while they fit in ``CACHE_BYTES``, else one per layer;
with ``positions``, a conv output is kept only at the positions the sums will draw).
BatchNorm layers left unfolded downstream of the first change get their running statistics re-estimated
(exact population mean and variance of their inputs over the data) before and after the refits.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rankcut.compress.replay import Replay
from rankcut.dist import Context, all_gather_rows, all_reduce_sum_
from rankcut.errors import RankcutError
from rankcut.model.contract import InputContract
from rankcut.model.forward import probe
from rankcut.model.layers import LowRank, input_side, out_width, plain_batchnorm
from rankcut.model.targets import trace
from rankcut.stats.collect import sample_generator

# ---------------------------------------------------------------------------------------------- what to refit


@dataclass(frozen=True)
class RefitTarget:
    """A layer of the compressed model to refit (``kind`` pair or layer) and the teacher module it must match."""

    name: str
    kind: str
    capture: str


def same_module(a: nn.Module, b: nn.Module) -> bool:
    """Same type and the same tensors (names, shapes and values)."""
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device))
                                          for k in sa)


def call_order(model: nn.Module, contract: InputContract) -> list[str]:
    """Names of the modules (not the root) in the order of their first call in one forward pass."""
    order: list[str] = []
    handles = []

    def on(name):
        def hook(*_):
            if name not in seen:
                seen.add(name)
                order.append(name)
        return hook

    seen: set[str] = set()
    try:
        handles = [m.register_forward_pre_hook(on(n)) for n, m in model.named_modules() if n]
        probe(model, contract.shape)
    finally:
        for h in handles:
            h.remove()
    return order


def _teacher_module(teacher: nn.Module, name: str) -> nn.Module | None:
    try:
        return teacher.get_submodule(name)
    except AttributeError:
        return None


def changed_modules(model: nn.Module, teacher: nn.Module, contract: InputContract) -> list[str]:
    """Modules of ``model`` (in call order, pairs as one) that differ from the teacher's module of that name."""
    pairs = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, LowRank))
    changed = []
    for name in call_order(model, contract):
        if name.startswith(pairs):
            continue
        module = model.get_submodule(name)
        if len(list(module.children())) and not isinstance(module, LowRank):
            continue  # containers: their leaves say what changed
        other = _teacher_module(teacher, name)
        if other is None or not same_module(module, other):
            changed.append(name)
    return changed


def refit_targets(model: nn.Module, teacher: nn.Module, contract: InputContract,
                  every: bool = False) -> tuple[list[RefitTarget], dict[str, str]]:
    """The layers to refit, in call order, and the changed layers left alone with the reason.

    Refitted: pairs that differ from the teacher's layer, and whole layers whose weights differ but whose
    output width is the teacher's (a channel-pruned consumer); with ``every`` also unchanged layers after
    the first change. The teacher's output is taken after its BatchNorm when the compressed model folded it.
    """
    found, _ = trace(model, contract, fake=False)  # real data follows: one real sample costs nothing more
    teacher_targets = {t.name: t for t in trace(teacher, contract, fake=False)[0]}
    changed = set(changed_modules(model, teacher, contract))
    targets, skipped, seen_change = [], {}, False
    for t in found:
        module = model.get_submodule(t.name)
        other = _teacher_module(teacher, t.name)
        if other is None:
            raise RankcutError(f"the teacher has no layer {t.name}: it is not the model this one was compressed from")
        is_changed = t.name in changed
        if not (is_changed or (every and seen_change)):
            continue
        seen_change = seen_change or is_changed
        if not hasattr(other, "weight") and not isinstance(other, LowRank) or out_width(other) != out_width(module):
            skipped[t.name] = "left alone: its outputs are not the teacher's (a pruned producer)"
            continue
        if not _patchable(input_side(module)):
            skipped[t.name] = "left alone: string padding or a non-zero padding mode"
            continue
        tt = teacher_targets.get(t.name)
        folded = tt is not None and tt.bn is not None and not plain_batchnorm(model.get_submodule(tt.bn))
        targets.append(RefitTarget(t.name, "pair" if isinstance(module, LowRank) else "layer",
                                   tt.bn if folded else t.name))
    return targets, skipped


def batchnorms_after_change(model: nn.Module, teacher: nn.Module | None, contract: InputContract) -> list[str]:
    """Unfolded BatchNorm layers tracking running statistics, called at or after the first change (all of
    them without a teacher)."""
    order = call_order(model, contract)
    if teacher is not None:
        changed = changed_modules(model, teacher, contract)
        order = order[order.index(changed[0]):] if changed else []
    return [n for n in order if isinstance(model.get_submodule(n), nn.modules.batchnorm._BatchNorm)
            and model.get_submodule(n).track_running_stats]


def _patchable(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer.padding, tuple) and layer.padding_mode == "zeros"


# ---------------------------------------------------------------------------------------------- one pass


class _Stop(Exception):
    """Raised by a hook once the layer it watches has run: the rest of the forward pass is not needed."""


def _run_until(run, *args) -> None:
    try:
        run(*args)
    except _Stop:
        return
    raise RankcutError("the refitted layer never ran on the data")


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A (zero-padded) conv's input patches as a strided view (N, H', W', C, kh, kw): its weight's order."""
    (kh, kw), (dh, dw), (sh, sw), (ph, pw) = conv.kernel_size, conv.dilation, conv.stride, conv.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    return windows.permute(0, 2, 3, 1, 4, 5)


def _pixel_rows(y: torch.Tensor, chosen: torch.Tensor | None = None) -> torch.Tensor:
    """A conv output (N x C x H x W) as rows of C, sample i's position p at row i * H W + p; only the rows
    ``chosen`` (gathered, nothing else copied) when given."""
    flat = y.flatten(2)
    if chosen is None:
        return flat.transpose(1, 2).reshape(-1, y.shape[1])
    per = flat.shape[2]
    return flat[chosen // per, :, chosen % per]


@dataclass(frozen=True)
class SampledRows:
    """A conv output kept only at the rows ``sampled_rows`` draws (``per``: its positions per sample)."""

    rows: torch.Tensor
    per: int


def _rows(layer: nn.Module, x: torch.Tensor, y: torch.Tensor | SampledRows,
          keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs with a 1 appended, outputs) as rows in the input's precision: a conv's input patches and its output
    pixels.

    ``keep(per)``, given the rows per sample, returns the indices of the rows to build (None: all); only
    those are copied, so a sample of positions costs what it keeps. ``y`` may be the teacher's output already
    cut to those rows (``SampledRows``)."""
    if isinstance(layer, nn.Linear) and not isinstance(y, SampledRows):
        inputs, out = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        chosen = None if keep is None else keep(len(out) // len(x))
        if chosen is not None:
            inputs, out = inputs[chosen], out[chosen]
    else:
        inputs = _patches(layer, x)
        per, width = inputs.shape[1] * inputs.shape[2], inputs.shape[2]
        teacher_per = y.per if isinstance(y, SampledRows) else y[0, 0].numel()
        if teacher_per != per:
            raise RankcutError(f"the teacher's output has {teacher_per} positions where this layer computes {per}: "
                               f"the teacher takes other input")
        chosen = None if keep is None else keep(per)
        out = y.rows if isinstance(y, SampledRows) else _pixel_rows(y, chosen)
        if chosen is not None:  # sample i's position p is row i * per + p, at (h, w) = divmod(p, W')
            inputs = inputs[chosen // per, (chosen % per) // width, chosen % width]
    rows = torch.empty(len(out), layer.weight[0].numel() + 1, dtype=x.dtype, device=x.device)
    rows[:, :-1].view(inputs.shape).copy_(inputs)  # one strided copy, no patch matrix in between
    rows[:, -1] = 1
    return rows, out


def gram(x: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """``x' x``, with each off-diagonal block computed once and mirrored: for a wide ``x`` about two thirds of
    the products of ``x.T @ x`` (torch has no symmetric rank-k product), the same sums of the same terms."""
    p = x.shape[1]
    if p <= leaf:
        return x.T @ x
    h = p // 2
    left, right = x[:, :h], x[:, h:]
    out = torch.empty(p, p, dtype=x.dtype, device=x.device)
    out[:h, :h], out[h:, h:], out[:h, h:] = gram(left, leaf), gram(right, leaf), left.T @ right
    out[h:, :h] = out[:h, h:].T
    return out


@dataclass
class Sums:
    """float64 sums over every output position: y x~', |y|^2, y and the count, with either x~ x~' (``xx``, the
    primal form) or, while there are no more rows than inputs, the rows themselves (``rows_x``, ``rows_y``: the
    dual form, n x P and n x C instead of P x P). Both are exact to merge across processes."""

    yx: torch.Tensor
    yy: torch.Tensor
    y: torch.Tensor
    count: torch.Tensor
    xx: torch.Tensor | None = None
    rows_x: torch.Tensor | None = None
    rows_y: torch.Tensor | None = None

    @property
    def dual(self) -> bool:
        return self.rows_x is not None

    def to_primal(self) -> Sums:
        """Replace the rows by their Gram matrix x~ x~' (for when there are more rows than inputs)."""
        if self.dual:
            self.xx = gram(self.rows_x)
            self.rows_x = self.rows_y = None
        return self

    def add(self, xs: torch.Tensor, ys: torch.Tensor, max_rows: int) -> None:
        """Add rows (inputs with the 1 appended, outputs): kept, in float64, while at most ``max_rows``.

        One batch's products ``x~'x~`` and ``y x~'`` are taken in the rows' own precision (float32 for a float32
        model: half the time of float64) and summed across batches in float64; the rows kept for the dual form
        and the solves stay float64 (float32 values are exact in float64)."""
        if self.dual and len(self.rows_x) + len(xs) > max_rows:
            self.to_primal()
        if self.dual:
            self.rows_x = torch.cat([self.rows_x, xs.double()])
            self.rows_y = torch.cat([self.rows_y, ys.double()])
        else:
            self.xx += gram(xs)
        self.yx += ys.T @ xs
        ys = ys.double()
        self.yy += (ys * ys).sum()
        self.y += ys.sum(0)
        self.count += len(xs)

    def all_reduce(self, ctx: Context, max_rows: int) -> Sums:
        """Combine the processes' sums: the rows of all (in rank order) if together at most ``max_rows``, else
        the sum of their Gram matrices. Every process has at most the total, so all agree on the form."""
        all_reduce_sum_([self.yx, self.yy, self.y, self.count], ctx)
        if ctx.distributed and self.dual and self.count.item() <= max_rows:
            self.rows_x, self.rows_y = all_gather_rows(self.rows_x, ctx), all_gather_rows(self.rows_y, ctx)
        elif ctx.distributed:
            self.to_primal()
            all_reduce_sum_([self.xx], ctx)
        return self

    def finite(self) -> bool:
        return all(torch.isfinite(t).all() for t in (self.xx, self.rows_x, self.rows_y, self.yx, self.yy)
                   if t is not None)


CACHE_BYTES = 512 * 2**20  # the teacher's outputs at every target are kept for all the data up to this size


def _hooked(model: nn.Module, names, make) -> list:
    return [model.get_submodule(n).register_forward_hook(make(n)) for n in names]


def teacher_cache_fits(teacher: nn.Module, targets: list[RefitTarget], contract: InputContract, samples: int,
                       limit: int | None = None, positions: int | None = None) -> bool:
    """Whether the teacher's outputs at every target's capture, for ``samples`` samples, fit in ``limit`` bytes
    (default ``CACHE_BYTES``); with ``positions``, a conv output is kept at that many positions per sample."""
    limit = CACHE_BYTES if limit is None else limit
    sizes: dict[str, int] = {}

    def measure(name):
        def hook(_, __, y):
            kept = y[0].numel() if positions is None or y.dim() != 4 else y.shape[1] * min(positions, y[0, 0].numel())
            sizes[name] = kept * y.element_size()
        return hook

    handles = _hooked(teacher, {t.capture for t in targets}, measure)
    try:
        probe(teacher, contract.shape)
    finally:
        for h in handles:
            h.remove()
    return sum(sizes.values()) * samples <= limit


def teacher_outputs(teacher: nn.Module, targets: list[RefitTarget], batches, ctx: Context,
                    advance=lambda: None, positions: int | None = None, seed: int = 0,
                    indices=None) -> list[dict[str, torch.Tensor | SampledRows]]:
    """The teacher's outputs at every target's capture, batch by batch, from one pass over the data: the
    teacher does not change, so one pass serves every layer (each stopped after the last capture).

    With ``positions`` (and ``seed``, ``indices`` as ``layer_sums`` gets them), a conv output with more
    positions per sample is kept only at the rows ``layer_sums`` will draw (``SampledRows``): 16 of 784
    positions in a resnet18's layer1 at 112x112, so the outputs fit in memory at any input size."""
    captures = {t.capture for t in targets}
    out: dict[str, torch.Tensor | SampledRows] = {}
    order = iter(indices if indices is not None else itertools.count())
    batch_indices: list[int] = []

    def keep(name):
        def hook(_, __, y):
            per = y[0, 0].numel() if y.dim() == 4 else 0
            chosen = None if positions is None or not per else sampled_rows(per, positions, seed, batch_indices)
            if chosen is None:
                out[name] = y.detach().clone()  # what follows may work in place
            else:
                out[name] = SampledRows(_pixel_rows(y.detach(), chosen), per)  # a gather: a copy of its own
            if len(out) == len(captures):
                raise _Stop
        return hook

    kept = []
    handles = _hooked(teacher, captures, keep)
    try:
        with torch.inference_mode():
            for x, _ in batches:
                out.clear()
                batch_indices[:] = [next(order) for _ in range(len(x))]
                _run_until(teacher, x.to(ctx.device, non_blocking=True))
                kept.append(dict(out))
                advance()
    finally:
        for h in handles:
            h.remove()
    return kept


def sampled_rows(per: int, positions: int, seed: int, indices: list[int]) -> torch.Tensor | None:
    """The rows of ``positions`` output positions per sample (``per`` rows each), drawn without replacement
    from each sample's own generator (seeded by ``seed`` and its index in the whole data), so the rows kept do
    not depend on the batch size or the process count. None (every row) where a sample has no more."""
    if per <= positions:
        return None
    return torch.cat([i * per + torch.randperm(per, generator=sample_generator(seed, index))[:positions]
                      for i, index in enumerate(indices)])


# A ridge of at least this (relative to A's mean eigenvalue) hides the rounding of a batch's products in float32
# (relative 6e-8 per term, about sqrt(rows) summed in a batch); below it, and for plain least squares, where a
# singular A's rounding would be fitted as if it were data, the products are taken in float64.
FLOAT32_MIN_DAMPING = 1e-4


def products_dtype(damping: float) -> torch.dtype | None:
    """The precision of one batch's products for a refit with ``damping`` (None: the model's own)."""
    return None if damping >= FLOAT32_MIN_DAMPING else torch.float64


def layer_sums(model: nn.Module, teacher: nn.Module, target: RefitTarget, batches, ctx: Context,
               advance=lambda: None, max_rows: int | None = None,
               taught: list[dict[str, torch.Tensor]] | None = None, positions: int | None = None, seed: int = 0,
               indices=None, replay: Replay | None = None, dtype: torch.dtype | None = None) -> Sums:
    """One pass: the compressed model's input to ``target`` against the teacher's output at its capture.

    ``positions``: keep only that many output positions (rows) per sample (``sampled_rows``; each
    sample's index in the whole data from ``indices``, default 0, 1, 2, ...), which divides the cost of a
    conv layer's sums by its positions / ``positions``. ``taught``: the teacher's outputs per batch
    (``teacher_outputs``), else the teacher runs here. The rows
    are kept (dual form) while there are at most ``max_rows`` of them (default: P, the inputs per output + 1),
    since then they take less memory and time than the P x P Gram matrix (a linear layer reading 9,216
    features on 1,024 samples: 75 MB of rows against 680 MB). ``replay``: the compressed model's pass starts
    from the kept input of the deepest block holding the layer (``Replay``), and keeps the inputs of the
    blocks it enters for the next layers; with ``taught`` as well, the data are not read at all. ``dtype``:
    the precision of each batch's products (``products_dtype``; None: the model's, float32 in practice).
    """
    layer = model.get_submodule(target.name)
    first = input_side(layer)
    seen: dict[str, torch.Tensor] = {}

    def take_input(_, inputs):
        seen["x"] = inputs[0]
        raise _Stop

    def take_output(_, __, out):
        seen["y"] = out
        raise _Stop

    p = first.weight[0].numel() + 1
    max_rows = p if max_rows is None else max_rows
    c = out_width(layer)
    dev = ctx.device

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float64, device=dev)

    sums = Sums(zeros(c, p), zeros(()), zeros(c), zeros(()), rows_x=zeros(0, p), rows_y=zeros(0, c))
    order = iter(indices if indices is not None else itertools.count())
    start = replay.start(target.name) if replay is not None else None
    handles = [layer.register_forward_pre_hook(take_input)]
    if replay is not None:
        handles += replay.keeping(replay.to_keep(target.name, start))
    if taught is None:
        handles.append(teacher.get_submodule(target.capture).register_forward_hook(take_output))
    data = batches if start is None or taught is None else itertools.repeat((None, None), len(replay.kept[start]))
    try:
        with torch.inference_mode():
            for i, (x, _) in enumerate(data):
                x = None if x is None else x.to(dev, non_blocking=True)
                if taught is None:
                    _run_until(teacher, x)
                else:
                    seen["y"] = taught[i][target.capture]
                if start is None:
                    _run_until(model, x)
                else:
                    _run_until(replay.run, start, i)
                keep = None if positions is None else functools.partial(
                    sampled_rows, positions=positions, seed=seed,
                    indices=[next(order) for _ in range(len(seen["x"]))])
                xs, ys = _rows(first, seen["x"], seen["y"], keep)
                if dtype is not None:
                    xs, ys = xs.to(dtype), ys.to(dtype)
                if ys.shape[1] != c:
                    raise RankcutError(f"the teacher's {target.capture} has {ys.shape[1]} outputs, {target.name} {c}")
                sums.add(xs, ys, max_rows)
                advance()
            # Inside inference mode: a Gram matrix made from the rows in it is an inference tensor.
            sums = sums.all_reduce(ctx, max_rows)
    finally:
        for h in handles:
            h.remove()
    if not sums.finite():
        raise RankcutError(f"{target.name} or the teacher produced NaN or Inf on the data; nothing written")
    return sums


# ---------------------------------------------------------------------------------------------- the algebra


def _pinv_psd(m: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a symmetric positive semi-definite matrix (eigenvalues below 1e-12 x the largest: 0)."""
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    keep = values > values.max().clamp_min(0) * 1e-12
    inv = torch.where(keep, 1 / torch.where(keep, values, torch.ones_like(values)), torch.zeros_like(values))
    return (vectors * inv) @ vectors.T


def _right_solver(a: torch.Tensor):
    """``b -> b a^-1`` for symmetric positive (semi-)definite ``a``, factorised once: Cholesky, or the
    pseudo-inverse if singular."""
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item() == 0:
        return lambda b: torch.cholesky_solve(b.T, chol).T
    inverse = _pinv_psd(a)
    return lambda b: b @ inverse


def _right_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b a^-1`` for symmetric positive (semi-)definite ``a``."""
    return _right_solver(a)(b)


@dataclass
class Problem:
    """The normalised moments of one layer: ``B``, ``c``, the damping ``delta`` and the output variance, with
    ``A`` either as a matrix (``a``, primal) or as its rows ``x`` (``A = x'x``, dual; ``y``: the outputs' rows,
    ``B = y'x``), both scaled by 1/sqrt(n). The two forms give the same maps (to rounding)."""

    b: torch.Tensor
    c: float
    variance: float
    bias: bool
    delta: float
    a: torch.Tensor | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    _last: tuple = field(default=(None, None), repr=False)  # (G, G A G') of the last gram: the objective's reuse
    _solver: object = field(default=None, repr=False)  # left -> left B A'^-1, factorised on first use

    @classmethod
    def of(cls, sums: Sums, damping: float, bias: bool) -> Problem:
        n = sums.count.item()
        if n == 0:
            raise RankcutError("no samples reached the layer")
        cut = slice(None) if bias else slice(None, -1)  # a layer without a bias keeps none: no bias column
        b = (sums.yx / n)[:, cut]
        if sums.dual:
            scale = n ** -0.5
            x, y, a = sums.rows_x[:, cut] * scale, sums.rows_y * scale, None
            diagonal = (x * x).sum(0)
        else:
            x, y, a = None, None, (sums.xx / n)[cut, cut]
            diagonal = a.diagonal()
        weights = b.shape[1] - (1 if bias else 0)
        delta = damping * max(diagonal[:weights].mean().item(), 1e-300)
        mean = sums.y / n
        c = (sums.yy / n).item()
        return cls(b, c, max(c - (mean @ mean).item(), 1e-300), bias, delta, a, x, y)

    def _weights(self, g: torch.Tensor) -> torch.Tensor:
        return g[:, :-1] if self.bias else g

    def gram(self, g: torch.Tensor, damped: bool = True) -> torch.Tensor:
        """``G A' G'`` (``damped``: ``A' = A + delta D``, D the identity on the weights) or ``G A G'``.

        ``G A G'`` of the last ``g`` is kept: the objective is asked for the same factor again, damped and not
        (with the rows of a wide layer, each product reads them all; comparing ``g`` reads only ``g``).
        """
        last = self._last[0]
        if last is not None and last.shape == g.shape and torch.equal(last, g):
            h = self._last[1]
        elif self.a is not None:
            h = g @ self.a @ g.T
        else:
            z = (g @ self.x.T).T  # the wide rows on the right: read once, faster than x @ g'
            h = z.T @ z
        self._last = (g, h)
        if damped and self.delta:
            w = self._weights(g)
            h = h + self.delta * (w @ w.T)
        return h

    def solve(self, left: torch.Tensor | None = None) -> torch.Tensor:
        """``left B A'^-1`` (default: ``B A'^-1``, the whole layer's map, C x P; bias last when it has one).

        The factorisation is kept: a pair's down steps ask for ``up^+ B A'^-1`` each round, k right-hand
        sides instead of C, and reuse it."""
        if self._solver is None:
            self._solver = self._factorise()
        return self._solver(left)

    def _factorise(self):
        """``left -> left B A'^-1``, with ``A'`` (or, in the dual form, the rows' n x n matrix) factorised."""
        if self.a is not None:
            mask = torch.ones(self.a.shape[0], dtype=self.a.dtype, device=self.a.device)
            if self.bias:
                mask[-1] = 0
            solver = _right_solver(self.a + torch.diag(mask * self.delta))
            return lambda left: solver(self.b if left is None else left @ self.b)
        x, y = self.x, self.y
        eye = torch.eye(len(x), dtype=x.dtype, device=x.device)
        if self.bias and self.delta:
            # The bias is not damped: centre (x and y around their means), solve for the weights, then the bias.
            scale = x[:, -1:]  # 1/sqrt(n) on every row
            x_mean, y_mean = (x[:, :-1] * scale).sum(0), (y * scale).sum(0)
            x, y = x[:, :-1] - scale * x_mean, y - scale * y_mean
            solver = _right_solver(gram(x.T) + self.delta * eye)

            def centred(left):
                yl, ml = (y, y_mean) if left is None else (y @ left.T, left @ y_mean)
                w = solver(yl.T) @ x
                return torch.cat([w, (ml - w @ x_mean)[:, None]], 1)
            return centred
        # B (A + delta I)^-1 = y' (x x' + delta I)^-1 x; with delta = 0 the pseudo-inverse, which (as the
        # nonzero eigenvalues of x x' are those of A) is the primal's minimum-norm solution.
        solver = _right_solver(gram(x.T) + self.delta * eye)
        return lambda left: solver((y if left is None else y @ left.T).T) @ x

    def objective(self, v: torch.Tensor, g: torch.Tensor, damped: bool = True) -> float:
        """``f(V G)`` (``damped``) or the plain mean squared error, with the map factored as ``V G``."""
        h = self.gram(g, damped)
        return self.c - 2 * (v * (self.b @ g.T)).sum().item() + (v * (v @ h)).sum().item()


def _unit(p: int, like: torch.Tensor) -> torch.Tensor:
    e = torch.zeros(1, p, dtype=like.dtype, device=like.device)
    e[0, -1] = 1
    return e


def refit_pair(problem: Problem, down: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor,
               rounds: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Alternate ``down`` (k x P, bias last) given ``up`` and ``up``, ``up_bias`` given ``down``, ``rounds`` times.

    Returns the new ``down``, ``up``, ``up_bias`` and the objective before and after every half step.
    """
    e = _unit(problem.b.shape[1], down)

    history = [problem.objective(torch.cat([up, up_bias[:, None]], 1), torch.cat([down, e], 0))]
    for _ in range(rounds):
        left = torch.linalg.pinv(up)  # k x C: the down step needs only these k combinations of B A'^-1
        down = problem.solve(left) - (left @ up_bias)[:, None] @ e
        g = torch.cat([down, e], 0)
        history.append(problem.objective(torch.cat([up, up_bias[:, None]], 1), g))
        vg = _right_solve(problem.gram(g), problem.b @ g.T)
        up, up_bias = vg[:, :-1], vg[:, -1]
        history.append(problem.objective(vg, g))
    return down, up, up_bias, history


def refit_layer(problem: Problem) -> torch.Tensor:
    """The whole layer's map ``B A'^-1`` (C x P; bias last when it has one)."""
    return problem.solve()


# ---------------------------------------------------------------------------------------------- the use case


@dataclass
class LayerRefit:
    """What happened to one layer: relative errors (of the teacher's output variance) before and after."""

    layer: str
    kind: str
    capture: str
    error_before: float | None = None
    error_after: float | None = None
    objective: list[float] = field(default_factory=list)
    status: str = "refit"

    def to_dict(self) -> dict:
        return asdict(self)


def _flat(layer: nn.Module) -> tuple[torch.Tensor, bool]:
    """A conv or linear as its (C x P) map, bias last when it has one."""
    w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    if layer.bias is None:
        return w, False
    return torch.cat([w, layer.bias.detach().double()[:, None]], 1), True


def _write(layer: nn.Module, m: torch.Tensor, bias: bool) -> None:
    with torch.no_grad():
        if bias:
            layer.weight.copy_(m[:, :-1].reshape(layer.weight.shape))
            layer.bias.copy_(m[:, -1])
        else:
            layer.weight.copy_(m.reshape(layer.weight.shape))


def refit_one(model: nn.Module, target: RefitTarget, sums: Sums, damping: float, rounds: int) -> LayerRefit:
    """Refit one layer in place from its sums; keep the old weights unless the error goes down."""
    layer = model.get_submodule(target.name)
    report = LayerRefit(target.name, target.kind, target.capture)
    if isinstance(layer, LowRank):
        down, bias = _flat(layer.down)
        up, _ = _flat(layer.up)
        if not bias:
            raise RankcutError(f"{target.name}.down has no bias: not a pair rankcut made")
        problem = Problem.of(sums, damping, True)
        e = _unit(problem.b.shape[1], down)
        g0, v0 = torch.cat([down, e], 0), up
        new_down, new_up, new_bias, report.objective = refit_pair(problem, down, up[:, :-1], up[:, -1], rounds)
        g1, v1 = torch.cat([new_down, e], 0), torch.cat([new_up, new_bias[:, None]], 1)
        news = [new_down, new_up, new_bias]
    else:
        m0, bias = _flat(layer)
        problem = Problem.of(sums, damping, bias)
        eye = torch.eye(m0.shape[0], dtype=m0.dtype, device=m0.device)
        g0, v0 = m0, eye
        m1 = refit_layer(problem)
        g1, v1 = m1, eye
        report.objective = [problem.objective(v0, g0), problem.objective(v1, g1)]
        news = [m1]
    if not all(torch.isfinite(t).all() for t in news):
        raise RankcutError(f"the refit of {target.name} is not finite (try a larger --damping); nothing written")
    report.error_before = problem.objective(v0, g0, damped=False) / problem.variance
    after = problem.objective(v1, g1, damped=False) / problem.variance
    if not after < report.error_before:
        report.error_after = report.error_before
        report.status = "kept: the refit would not lower its error"
        return report
    report.error_after = after
    if isinstance(layer, LowRank):
        _write(layer.down, new_down, True)
        _write(layer.up, torch.cat([new_up, new_bias[:, None]], 1), True)
    else:
        _write(layer, m1, bias)
    return report


def reestimate_batchnorm(model: nn.Module, names: list[str], batches, ctx: Context, advance=lambda: None) -> None:
    """Set each named BatchNorm's running mean and variance to the exact ones of its inputs over ``batches``.

    The model runs with these BatchNorms normalising by batch statistics (as in training), so each one sees
    inputs normalised like those it will see; the sums are float64 around the first batch's mean and are
    combined across processes exactly.
    """
    if not names:
        return
    modules = {n: model.get_submodule(n) for n in names}
    acc: dict[str, list] = {}

    def observe(name):
        def hook(_, inputs):
            x = inputs[0].detach().transpose(0, 1).reshape(inputs[0].shape[1], -1)
            if name not in acc:
                acc[name] = [x.mean(1, keepdim=True), torch.zeros((), dtype=torch.float64, device=x.device),
                             torch.zeros(len(x), dtype=torch.float64, device=x.device),
                             torch.zeros(len(x), dtype=torch.float64, device=x.device)]
            shift, count, first, second = acc[name]
            d = (x - shift).double()
            acc[name][1] = count + d.shape[1]
            first += d.sum(1)
            second += (d * d).sum(1)
        return hook

    saved = {n: (m.training, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for n, m in modules.items()}
    handles = [m.register_forward_pre_hook(observe(n)) for n, m in modules.items()]
    try:
        model.eval()
        for m in modules.values():
            m.train()
        with torch.no_grad():
            for x, _ in batches:
                model(x.to(ctx.device, non_blocking=True))
                advance()
    finally:
        for h in handles:
            h.remove()
        for n, m in modules.items():
            m.train(saved[n][0])
    for name, m in modules.items():
        if name not in acc and not ctx.distributed:
            raise RankcutError(f"{name} never ran on the data")
        width = m.num_features
        shift, count, first, second = acc.get(name) or [torch.zeros(width, 1, device=ctx.device)] + [
            torch.zeros((), dtype=torch.float64, device=ctx.device)] + [
            torch.zeros(width, dtype=torch.float64, device=ctx.device) for _ in range(2)]
        # Each process's mean and centred sum of squares, combined exactly by the parallel-axis formula.
        local_n = count.clone()
        local_mean = shift.reshape(-1).double() + first / max(count.item(), 1.0)
        local_m2 = second - first * first / max(count.item(), 1.0)
        total, weighted = local_n.clone(), local_mean * local_n
        all_reduce_sum_([total, weighted], ctx)
        n = total.item()
        if n < 2:
            raise RankcutError(f"{name} saw fewer than 2 values per channel; use more --samples")
        mean = weighted / n
        m2 = local_m2 + local_n * (local_mean - mean) ** 2
        all_reduce_sum_([m2], ctx)
        if not (torch.isfinite(mean).all() and torch.isfinite(m2).all()):
            raise RankcutError(f"{name} received NaN or Inf on the data; nothing written")
        var = (m2 / (n - 1)).clamp_min(0)
        if saved[name][1] is not None:
            m.num_batches_tracked.copy_(saved[name][1])
        with torch.no_grad():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
