"""The accuracy/cost frontier of a sweep (``api.sweep``): point keys, Pareto marks and the recommendation.

A point is a dict with its key (``structure``, ``method`` (None for channels), ``kind``, ``fraction``, and
``layer`` for a per-layer point), its ``top1`` and its ``ratios`` to the original (``macs``, ``params``, and
``latency`` where it was measured), as
``api.sweep`` makes them. A per-layer sweep is not a frontier: its points are ordered by sensitivity.
"""

from __future__ import annotations

KINDS = ("keep", "macs", "params", "latency")  # latency: a budget in a profile's measured nanoseconds


def point_key(point: dict) -> tuple:
    return point["structure"], point["method"], point["kind"], float(point["fraction"]), point.get("layer")


def label(point: dict) -> str:
    """``pair/pca`` or ``channels``: one line of the plot, one group of the table."""
    return point["structure"] if point["method"] is None else f"{point['structure']}/{point['method']}"


def pareto(costs: list[float], accuracies: list[float]) -> list[bool]:
    """Which points no other point beats: none is as cheap and as accurate, and strictly better in one."""
    out = []
    for c, a in zip(costs, accuracies):
        out.append(not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in zip(costs, accuracies)))
    return out


def recommend(points: list[dict], original_top1: float, within: float, cost: str = "macs") -> int | None:
    """The index of the cheapest point (``cost``'s ratio, then top-1) within ``within`` top-1 points of the
    original."""
    floor = original_top1 - within / 100 - 1e-12
    fits = [i for i, p in enumerate(points) if p["top1"] >= floor]
    return min(fits, key=lambda i: (points[i]["ratios"][cost], -points[i]["top1"]), default=None)


def summarize(original: dict, points: list[dict], within: float, per_layer: bool = False, cost: str = "macs") -> dict:
    """The points with their Pareto marks (top-1 against ``cost``'s ratio to the original: ``macs``, or the
    measured ``latency``) and the recommendation; for a per-layer sweep, ``sensitivity``'s order instead (no
    marks, no recommendation)."""
    if per_layer:
        return sensitivity(original, points)
    marks = pareto([p["ratios"][cost] for p in points], [p["top1"] for p in points])
    points = [{**p, "pareto": m} for p, m in zip(points, marks)]
    best = recommend(points, original["top1"], within, cost) if points else None
    return {"original": original, "within": within, "cost": cost, "points": points,
            "recommendation": None if best is None else points[best]}


def sensitivity(original: dict, points: list[dict]) -> dict:
    """Per-layer points ordered by sensitivity: each (structure/method, layer) by its largest top-1 drop, largest
    first (ties in sweep order), its points by fraction, largest first. Each point gets its ``change`` of top-1
    (a fraction, negative for a drop); ``layers`` lists each (structure/method, layer) with its largest drop."""
    points = [{**p, "change": p["top1"] - original["top1"]} for p in points]
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((label(p), p["layer"]), []).append(p)
    order = sorted(groups, key=lambda g: min(p["change"] for p in groups[g]))  # stable: ties keep sweep order
    ordered = [p for g in order for p in sorted(groups[g], key=lambda p: -p["fraction"])]
    layers = [{"label": g[0], "layer": g[1], "drop": -min(p["change"] for p in groups[g])} for g in order]
    return {"original": original, "per_layer": True, "points": ordered, "layers": layers}
