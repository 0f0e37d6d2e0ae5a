"""``rankcut eval`` and ``rankcut.evaluate``/``rankcut.latency``: every figure against a hand computation."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from cli_helpers import rankcut
from rankcut.files.checkpoint import load_with_meta, save
from rankcut.run.data import open_data
from rankcut.model.edits import LowRankPair, get_module, set_module
from rankcut.run.evaluate import SUMS, batch_sums, summarize
from rankcut.run.latency import measure_latency
from rankcut.model.layers import project_layer
from rankcut.model.cost import count_macs, count_params


def logits_of(path, data: str) -> np.ndarray:
    model, meta = load_with_meta(path)
    x = torch.stack([item[0] for item in open_data(data, meta.input)])
    with torch.no_grad():
        return model(x).double().numpy()


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


@pytest.fixture
def digits(mnist_ckpt, tmp_path):
    """40 real digits labelled so that sample i's label is the model's (i mod 10)-th ranked class."""
    x = open_data("mnist5k:test", load_with_meta(mnist_ckpt)[1].input).x[:40].numpy()
    np.savez(tmp_path / "digits.npz", x=x)
    order = np.argsort(-logits_of(mnist_ckpt, str(tmp_path / "digits.npz")), axis=1)
    np.savez(tmp_path / "digits.npz", x=x, y=order[np.arange(40), np.arange(40) % 10])
    return tmp_path / "digits.npz"


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


def test_latency_is_reported_for_both_models(mnist_ckpt, digits):
    result = rankcut("eval", mnist_ckpt, "--data", digits, "--reference", mnist_ckpt, "--latency", "-b", "4",
                     "--device", "cpu", "--json")["results"][0]
    for figures in (result["latency"], result["reference"]["latency"]):
        assert figures["batch_size"] == 4 and figures["repeats"] >= 5
        assert figures["image_ms"] == pytest.approx(figures["batch_ms"] / 4) and figures["batch_ms"] > 0
    assert result["ratios"]["latency"] > 0 and result["agreement"] == 1.0 and abs(result["kl"]) < 1e-9


def test_top5_means_top_k_with_fewer_than_five_classes(tmp_path):
    ckpt = tmp_path / "three.safetensors"
    rankcut("init", "--arch", "rankcut:mnist-cnn", "--num-classes", "3", "-o", ckpt)
    result = rankcut("eval", ckpt, "--data", "synthetic:20", "--device", "cpu", "--json")["results"][0]
    assert result["k"] == 3 and result["topk"] == 1.0 and result["samples"] == 20


def test_table_output_for_people(mnist_ckpt, digits):
    out = rankcut("eval", mnist_ckpt, "--data", digits, "--reference", mnist_ckpt, "--device", "cpu").stdout
    assert "top-1" in out and "top-5" in out and "KL(reference || model)" in out and "10.00%" in out


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


def test_measure_latency_takes_the_median_of_enough_runs():
    from rankcut.model.archs import MNIST

    figures = measure_latency(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), MNIST, 3,
                              torch.device("cpu"), min_seconds=0.01)
    assert 5 <= figures["repeats"] <= 200 and figures["image_ms"] == pytest.approx(figures["batch_ms"] / 3)


def test_bad_inputs_give_one_line(mnist_ckpt, tmp_path):
    outside = tmp_path / "outside.npz"
    np.savez(outside, x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, 1, 2, 12]))
    three = tmp_path / "three.safetensors"
    rankcut("init", "--arch", "rankcut:mnist-cnn", "--num-classes", "3", "-o", three)
    assert "not found" in rankcut("eval", tmp_path / "none.safetensors", "--data", "synthetic:4", fails=True)
    assert "label 12" in rankcut("eval", mnist_ckpt, "--data", outside, fails=True)
    assert "different numbers of classes" in rankcut("eval", mnist_ckpt, "--data", "synthetic:4",
                                                     "--reference", three, fails=True)
