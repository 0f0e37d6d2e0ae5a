"""Bases for rank reduction: statistics -> ordered directions plus the predicted loss at every rank.

Every method returns a ``Basis``: ``up`` (C x C) and ``down`` (C x C) whose first k columns/rows give
the method's rank-k pair ``z' = up_k down_k (z - mu) + mu``, and ``loss[k]``, the predicted loss of
keeping k directions (``loss[C] == 0``), in the units its registry entry (``METHODS``) declares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rankcut.errors import RankcutError, one_line
from rankcut.model.edits import get_module
from rankcut.model.layers import affine_parts, fold_batchnorm
from rankcut.model.targets import Target
from rankcut.stats.moments import LayerStats


DEFAULT_DAMPING = 1e-3  # fisher: damping of G, relative to its mean eigenvalue


@dataclass(frozen=True)
class Basis:
    """Directions ordered by importance, with the predicted loss of truncating after each."""

    up: torch.Tensor
    down: torch.Tensor
    mu: torch.Tensor
    loss: torch.Tensor | None

    def pair(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(up_k, down_k, mu)`` for rank ``k``."""
        return self.up[:, :k], self.down[:k], self.mu


def _canonical(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm columns of ``up`` with their largest entry positive (same product ``up @ down``).

    Makes bases comparable across methods (e.g. fisher with G = I gives exactly pca's pair).
    """
    norms = up.norm(dim=0).clamp_min(1e-300)
    idx = up.abs().argmax(0)
    signs = torch.sign(up[idx, torch.arange(up.shape[1])])
    signs[signs == 0] = 1
    scale = signs / norms
    return up * scale, down / scale[:, None]


def _tail_sums(values: torch.Tensor) -> torch.Tensor:
    """``out[k] = sum(values[k:])`` for k = 0..len, clipped at zero (rounding makes tiny negatives)."""
    tail = torch.flip(torch.cumsum(torch.flip(values, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0)


def _eig_desc(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of a symmetric matrix, in float64."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T).double() / 2)
    return values.flip(0), vectors.flip(1)


def _effective(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's effective weight (C x fan-in) and bias (C), pairs multiplied out."""
    w1, b1, u, b2 = affine_parts(layer)
    w = w1.detach().double().reshape(w1.shape[0], -1)
    if u is None:
        return w, b1.detach().double()
    u = u.detach().double()
    return u @ w, u @ b1.detach().double() + b2.detach().double()


def pca(layer: nn.Module, stats: LayerStats) -> Basis:
    """Top eigenvectors of the output covariance; loss = discarded variance per position."""
    s = stats
    values, vectors = _eig_desc(s.moments.covariance)
    up, down = _canonical(vectors, vectors.T)
    return Basis(up, down, s.moments.mean, _tail_sums(values.clamp_min(0)))


def hessian(layer: nn.Module, stats: LayerStats) -> Basis:
    """Top eigenvectors of H = E[sym(S)^2]: the directions whose removal changes the outputs most."""
    s = stats
    values, vectors = _eig_desc(s.grad["hessian"] / s.grad["grad_count"].clamp_min(1))
    up, down = _canonical(vectors, vectors.T)
    return Basis(up, down, s.moments.mean, _tail_sums(values.clamp_min(0)))


def _sym_power(matrix: torch.Tensor, power: float, floor: float = 0.0) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T).double() / 2)
    return (vectors * values.clamp_min(floor).pow(power)) @ vectors.T


def fisher(layer: nn.Module, stats: LayerStats, damping: float = DEFAULT_DAMPING) -> Basis:
    """Minimiser of the Kronecker-factored output change tr(G (I-M) Sigma (I-M)^T) over rank-k M.

    With X = G^(1/2) Sigma^(1/2) and U its left singular vectors: up = G^(-1/2) U, down = U^T G^(1/2),
    and the predicted loss at rank k is the sum of the discarded squared singular values. G is damped
    by ``damping`` times its mean eigenvalue so it can be inverted.
    """
    s = stats
    g = s.grad["grad_m2"] / s.grad["grad_count"].clamp_min(1)
    return fisher_from(g, s.moments.covariance, s.moments.mean, damping)


def fisher_from(g: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor, damping: float) -> Basis:
    """The fisher basis for an output-gradient covariance ``g`` and activation covariance ``sigma``."""
    g = g.double()
    g = g + torch.eye(len(g), dtype=g.dtype) * damping * max(g.trace().item() / len(g), 1e-300)
    root, inv_root = _sym_power(g, 0.5), _sym_power(g, -0.5)
    u, svals, _ = torch.linalg.svd(root @ _sym_power(sigma, 0.5))
    up, down = _canonical(inv_root @ u, u.T @ root)
    return Basis(up, down, mu.double(), _tail_sums(svals.pow(2)))


def svd(layer: nn.Module, stats: LayerStats | None) -> Basis:
    """Data-free: left singular vectors of the weight; the bias passes through untouched."""
    w, b = _effective(layer)
    u, svals, _ = torch.linalg.svd(w, full_matrices=len(w) > w.shape[1])  # U must be square: C x C
    values = torch.zeros(len(w), dtype=torch.float64)
    values[: len(svals)] = svals.pow(2)
    up, down = _canonical(u, u.T)
    return Basis(up, down, b, _tail_sums(values))


def l1(layer: nn.Module, stats: LayerStats) -> Basis:
    """Keep the filters with the largest L1 norm; dropped channels output their data mean."""
    s = stats
    w, _ = _effective(layer)
    norms = w.abs().sum(1)
    order = torch.argsort(norms, descending=True)
    select = torch.eye(len(w), dtype=torch.float64)[:, order]
    return Basis(select, select.T, s.moments.mean, _tail_sums(norms[order]))


def random(layer: nn.Module, stats: LayerStats | None, seed: int = 0) -> Basis:
    """A seeded random orthonormal basis (the floor every other method should beat)."""
    w, b = _effective(layer)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(w), len(w), generator=g, dtype=torch.float64))
    mu = stats.moments.mean if stats is not None else b
    return Basis(q, q.T, mu, None)


@dataclass(frozen=True)
class Method:
    """A registry entry: the basis function and every fact the CLI, budgets and errors need about it.

    ``needs``: what statistics the method reads ("none", "moments" or "grad"). ``budget``: how a global
    budget compares its losses across layers: "raw" (already in output-loss units), "fraction" (the loss
    divided by its value at rank 0), or None (it predicts no loss, so it cannot share a budget).
    ``options``: keyword arguments of ``basis`` beyond the layer and its statistics.
    """

    name: str
    basis: Callable[..., Basis]
    needs: str
    loss_units: str
    budget: str | None
    options: tuple[str, ...] = ()
    summary: str = ""

    @property
    def budget_units(self) -> str:
        """The units of the loss a budget compares (``budget.comparable_loss``)."""
        return self.loss_units if self.budget == "raw" else f"{self.loss_units} fraction"

    def check_stats(self, stats: LayerStats | None) -> None:
        """Refuse, in one line, statistics that lack what this method reads."""
        if self.needs != "none" and stats is None:
            raise RankcutError(f"--method {self.name} needs statistics: run rankcut stats first and pass --stats")
        if self.needs == "grad" and not stats.grad:
            raise RankcutError(f"--method {self.name} needs gradient statistics: rerun rankcut stats with "
                               "--grad kl (or --grad mse)")


METHODS = {m.name: m for m in (
    Method("pca", pca, "moments", "variance", "fraction",
           summary="top eigenvectors of the output covariance (the research note's method)"),
    Method("hessian", hessian, "grad", "output change", "raw",
           summary="top eigenvectors of H, the predicted output change of removing a direction"),
    Method("fisher", fisher, "grad", "output change", "raw", options=("damping",),
           summary="closed-form minimiser of the Kronecker-factored output change"),
    Method("svd", svd, "none", "weight energy", "fraction", summary="data-free SVD of the weight"),
    Method("l1", l1, "moments", "filter L1 mass", "fraction", summary="keep the filters with the largest L1 norm"),
    Method("random", random, "none", "none", None, options=("seed",), summary="a seeded random orthonormal basis"),
)}


def get_method(method: Method | str) -> Method:
    """The registry entry called ``method`` (an entry passes through), or a one-line error listing the known ones."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise RankcutError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method]


def layer_basis(layer: nn.Module, name: str, stats: LayerStats | None, method: Method | str,
                options: dict | None = None) -> Basis:
    """``method``'s basis for one layer; ``options`` may hold the method's options (others are not its own).

    A linear-algebra failure (e.g. non-finite weights) is one line, never a traceback.
    """
    method, options = get_method(method), options or {}
    method.check_stats(stats)
    try:
        with torch.no_grad():
            basis = method.basis(layer, stats, **{k: options[k] for k in method.options if k in options})
    except torch.linalg.LinAlgError as e:
        raise RankcutError(f"--method {method.name} failed on layer {name}: {one_line(str(e))[:160]}") from None
    if not all(torch.isfinite(t).all() for t in (basis.up, basis.down, basis.mu)):
        if "damping" in method.options and options.get("damping") == 0:
            why = ("its output-gradient covariance G is singular and --damping 0 cannot invert it; "
                   f"use --damping > 0 (default {DEFAULT_DAMPING:g})")
        else:
            why = "its weights or statistics are too extreme"
        raise RankcutError(f"--method {method.name} gave a non-finite basis for layer {name}: {why}; nothing written")
    return basis


def foldable_bn(model: nn.Module, target: Target) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm projection folds into ``target`` first: the recorded one, while it is still a BatchNorm.

    The one decision both planning (a budget's bases) and projecting use, so they never see different layers.
    """
    if not target.bn:
        return None
    bn = get_module(model, target.bn)
    return bn if isinstance(bn, nn.modules.batchnorm._BatchNorm) else None


def target_basis(model: nn.Module, target: Target, stats: LayerStats | None, method: Method | str,
                 options: dict | None = None) -> Basis:
    """The basis projection uses for ``target``: of the layer with its BatchNorm folded in (on a copy)."""
    layer = get_module(model, target.name)
    bn = foldable_bn(model, target)
    if bn is not None:
        layer = fold_batchnorm(layer, bn)
    return layer_basis(layer, target.name, stats, method, options)


def kept_variance(basis_up: torch.Tensor, basis_down: torch.Tensor, stats: LayerStats) -> float:
    """Fraction of the layer's output variance the pair keeps: 1 - tr(E Sigma E^T) / tr(Sigma), E = I - up down."""
    sigma = stats.moments.covariance
    total = sigma.trace().item()
    if total <= 0:
        return 1.0
    e = torch.eye(len(sigma), dtype=torch.float64) - basis_up.double() @ basis_down.double()
    return 1.0 - (e @ sigma @ e.T).trace().item() / total
