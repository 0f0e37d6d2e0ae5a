"""Evaluation sums and their summary: every figure against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import log_softmax, logits_of
from cli_helpers import rankcut

from rankcut.files.checkpoint import load_with_meta, save
from rankcut.model.cost import count_macs, count_params
from rankcut.model.edits import LowRankPair, get_module, set_module
from rankcut.model.layers import project_layer
from rankcut.run.evaluate import SUMS, batch_sums, summarize


def test_accuracy_top5_and_cross_entropy_match_a_hand_computation(mnist_ckpt, digits):
    result = rankcut("eval", mnist_ckpt, "--data", digits, "--device", "cpu", "-b", "7", "--json")["results"][0]
    y = np.load(digits)["y"]
    ce = -log_softmax(logits_of(mnist_ckpt, str(digits)))[np.arange(40), y].mean()
    assert (result["samples"], result["labeled"], result["k"], result["classes"]) == (40, 40, 5, 10)
    assert result["top1"] == pytest.approx(0.1) and result["topk"] == pytest.approx(0.5)
    assert result["loss"] == pytest.approx(ce, rel=1e-5)
    assert result["params"] == 1_199_882 and result["macs"] == 11_992_448
    assert "reference" not in result and "latency" not in result


def test_reference_agreement_kl_and_ratios_match_a_hand_computation(mnist_ckpt, digits, tmp_path):
    model, meta = load_with_meta(mnist_ckpt)
    basis = torch.linalg.qr(torch.randn(128, 6, generator=torch.Generator().manual_seed(0)).double()).Q
    set_module(model, "fc1", project_layer(get_module(model, "fc1"), basis, basis.T, torch.zeros(128)))
    small = tmp_path / "small.safetensors"
    save(model, meta.with_edits(LowRankPair("fc1", 6)), small)
    result = rankcut("eval", small, "--data", digits, "--reference", mnist_ckpt, "--device", "cpu", "--json")["results"][0]
    p, q = log_softmax(logits_of(mnist_ckpt, str(digits))), log_softmax(logits_of(small, str(digits)))
    assert result["agreement"] == pytest.approx((p.argmax(1) == q.argmax(1)).mean())
    assert result["kl"] == pytest.approx((np.exp(p) * (p - q)).sum(1).mean(), rel=1e-5)
    assert result["reference"]["top1"] == pytest.approx(0.1)
    assert result["ratios"]["macs"] == pytest.approx(count_macs(model, meta.input)[0] / 11_992_448)
    assert result["ratios"]["params"] == pytest.approx(count_params(model) / 1_199_882)
    assert result["ratios"]["macs"] < 0.95 and result["kl"] > 0


def test_top5_means_top_k_with_fewer_than_five_classes(tmp_path):
    ckpt = tmp_path / "three.safetensors"
    rankcut("init", "--arch", "rankcut:mnist-cnn", "--num-classes", "3", "-o", ckpt)
    result = rankcut("eval", ckpt, "--data", "synthetic:20", "--device", "cpu", "--json")["results"][0]
    assert result["k"] == 3 and result["topk"] == 1.0 and result["samples"] == 20


def test_sums_of_two_halves_equal_the_whole_and_unlabelled_samples_count_only_for_agreement():
    g = torch.Generator().manual_seed(0)
    z, ref = torch.randn(10, 7, generator=g), torch.randn(10, 7, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1, -1, 2])
    whole = batch_sums(z, y, 5, ref)
    torch.testing.assert_close(batch_sums(z[:4], y[:4], 5, ref[:4]) + batch_sums(z[4:], y[4:], 5, ref[4:]), whole)
    s = summarize(whole, 5, True)
    labeled = y >= 0
    assert (s["samples"], s["labeled"]) == (10, 8)
    assert s["top1"] == pytest.approx((z.argmax(1) == y)[labeled].float().mean().item())
    assert s["loss"] == pytest.approx(torch.nn.functional.cross_entropy(z[labeled], y[labeled]).item())
    assert s["agreement"] == pytest.approx((z.argmax(1) == ref.argmax(1)).float().mean().item())
    assert len(whole) == len(SUMS)
    assert summarize(batch_sums(z, torch.full((10,), -1), 5), 5, False)["top1"] is None
