"""``run.frontier``: the Pareto marks and the recommendation on hand-made cases."""

from __future__ import annotations

from rankcut.run.frontier import pareto, recommend, sensitivity, summarize


def test_pareto_on_a_hand_made_frontier():
    costs = [0.2, 0.3, 0.3, 0.5, 0.6, 0.5, 0.9]
    top1s = [0.70, 0.80, 0.75, 0.90, 0.85, 0.90, 0.95]
    # 0.3/0.75 is beaten by 0.3/0.80; 0.6/0.85 by 0.5/0.90; the two identical 0.5/0.90 points beat neither
    assert pareto(costs, top1s) == [True, True, False, True, False, True, True]
    assert pareto([], []) == []
    assert pareto([0.5], [0.1]) == [True]


def _point(macs: float, top1: float, method: str = "pca") -> dict:
    return {"structure": "pair", "method": method, "kind": "macs", "fraction": macs, "top1": top1,
            "ratios": {"macs": macs, "params": macs}}


def test_the_recommendation_is_the_cheapest_point_within_the_margin():
    points = [_point(0.5, 0.91), _point(0.3, 0.895), _point(0.2, 0.80), _point(0.3, 0.90, "fisher")]
    assert recommend(points, 0.90, 1.0) == 3  # 0.3 MACs twice within a point: the more accurate one
    assert recommend(points, 0.90, 0.0) == 3  # exactly the original's top-1 counts as within 0 points
    assert recommend(points, 0.90, 10.0) == 2
    assert recommend(points, 0.95, 1.0) is None
    result = summarize({"top1": 0.90}, points, 1.0)
    assert [p["pareto"] for p in result["points"]] == [True, False, True, True]
    assert result["recommendation"]["method"] == "fisher"


def test_sensitivity_orders_layers_by_their_largest_drop():
    def point(layer, fraction, top1, method="pca"):
        return {**_point(fraction, top1, method), "kind": "keep", "layer": layer}

    points = [point("a", 0.5, 0.89), point("a", 0.25, 0.80), point("b", 0.5, 0.70), point("b", 0.25, 0.85),
              point("c", 0.25, 0.90), point("c", 0.5, 0.91), point("a", 0.5, 0.90, "fisher")]
    result = sensitivity({"top1": 0.90}, points)
    assert [(e["label"], e["layer"]) for e in result["layers"]] == [
        ("pair/pca", "b"), ("pair/pca", "a"), ("pair/pca", "c"), ("pair/fisher", "a")]  # c and fisher-a tie: sweep order
    assert [round(e["drop"], 6) for e in result["layers"]] == [0.2, 0.1, 0.0, 0.0]
    assert [(p["layer"], p["fraction"]) for p in result["points"]] == [
        ("b", 0.5), ("b", 0.25), ("a", 0.5), ("a", 0.25), ("c", 0.5), ("c", 0.25), ("a", 0.5)]
    assert round(result["points"][0]["change"], 6) == -0.2
    assert summarize({"top1": 0.90}, points, 1.0, per_layer=True) == result


def test_the_cost_can_be_the_measured_latency():
    """Cheap in MACs is not cheap in time: with ``cost="latency"`` the marks and the recommendation follow the
    measured ratios."""
    points = [_point(0.5, 0.90), _point(0.3, 0.90), _point(0.2, 0.85)]
    for p, latency in zip(points, (0.6, 0.9, 0.95)):
        p["ratios"]["latency"] = latency
    by_macs, by_time = summarize({"top1": 0.90}, points, 1.0), summarize({"top1": 0.90}, points, 1.0, cost="latency")
    assert [p["pareto"] for p in by_macs["points"]] == [False, True, True]
    assert [p["pareto"] for p in by_time["points"]] == [True, False, False]
    assert by_macs["recommendation"]["fraction"] == 0.3 and by_time["recommendation"]["fraction"] == 0.5
    assert (by_macs["cost"], by_time["cost"]) == ("macs", "latency")
