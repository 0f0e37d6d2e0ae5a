"""The statistics file: merge and round trip in float64, and the warnings about rank-deficient statistics."""

from __future__ import annotations

import numpy as np
import torch
from builders import CPU, batches

from rankcut.files.statsfile import LayerStats, StatsFile, load_stats, numerical_rank, rank_warning, save_stats
from rankcut.model import archs
from rankcut.model.targets import Target, select
from rankcut.stats.collect import collect_moments


def test_stats_file_merge_and_round_trip(tmp_path):
    model = archs.build("rankcut:mnist-cnn", {}).eval()
    targets = select(model, archs.MNIST)
    data = batches(archs.MNIST, 20, 10)

    def stats_of(part):
        m = collect_moments(model, targets, part, CPU)
        return StatsFile("digest", sum(len(b[0]) for b in part), {t.name: LayerStats(t, m[t.name]) for t in targets})

    whole, merged = stats_of(data), stats_of(data[:1]).merge(stats_of(data[1:]))
    save_stats(merged, tmp_path / "s.npz")
    loaded = load_stats(tmp_path / "s.npz")
    assert loaded.samples == 20 and list(loaded.layers) == [t.name for t in targets]
    for name in whole.layers:
        a, b = loaded.layers[name].moments.m2, whole.layers[name].moments.m2
        assert (a - b).norm() / b.norm() < 1e-6
        assert torch.equal(loaded.layers[name].moments.m2, merged.layers[name].moments.m2)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as npz:
        assert npz["conv2/m2"].dtype == np.float64


def test_rank_warning_library():
    from rankcut.stats.collect import Moments
    from rankcut.files.statsfile import LayerStats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 8, generator=g, dtype=torch.float64)
    rank3 = LayerStats(Target("fc"), Moments.of(x.float()))
    assert numerical_rank(rank3) == 3
    assert rank_warning("fc", rank3, 200, limit=3) is None  # the layer's structure allows no more
    assert "rank 3 < 8 over 200 positions" in rank_warning("fc", rank3, 200)
    few = LayerStats(Target("fc"), Moments.of(torch.randn(5, 8, generator=g)))
    assert "saw only 5 positions (5 samples x 1); its covariance has rank 4 < 8: use at least 9 samples" in \
        rank_warning("fc", few, 5)
    full = LayerStats(Target("fc"), Moments.of(torch.randn(100, 8, generator=g)))
    assert rank_warning("fc", full, 100) is None
