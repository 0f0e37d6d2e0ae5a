"""Hook-collected float64 statistics: moments that merge exactly, and gradient statistics against autograd."""

from __future__ import annotations

import pytest
import torch
from builders import CPU, randomize_, small_resnet

from rankcut.model import archs
from rankcut.model.edits import get_module
from rankcut.model.targets import select
from rankcut.stats.collect import collect_gradients, collect_moments, sample_generator
from rankcut.stats.moments import Moments


def test_moments_merge_equals_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=g, dtype=torch.float64) * 3 + 5
    whole = Moments.of(x)
    halves = Moments.of(x[:371]).merge(Moments.of(x[371:]))
    spatial = Moments.of(x.reshape(10, 100, 7).transpose(1, 2))  # (N, C, positions) layout
    assert halves.count == whole.count
    torch.testing.assert_close(halves.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(halves.m2, whole.m2, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(whole.covariance, torch.cov(x.T, correction=0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spatial.m2, whole.m2, rtol=1e-10, atol=1e-9)
    x32 = x.float()
    torch.testing.assert_close(Moments.of(x32).m2, whole.m2, rtol=1e-5, atol=1e-3)


def test_gradient_statistics_survive_inplace_activations():
    """torchvision's ResNet applies ReLU(inplace=True) right after the captured BatchNorm outputs.

    Reference: the gradient at a BatchNorm output equals the gradient of a zero tensor added to it.
    """
    torch.manual_seed(0)
    model = archs.build("torchvision:resnet18", {"num_classes": 10}).eval()
    contract = archs.InputContract((3, 32, 32), archs.IMAGENET_MEAN, archs.IMAGENET_STD)
    batches = [(torch.randn(4, 3, 32, 32), None)]
    targets = [t for t in select(model, contract) if t.name == "layer1.0.conv1"]
    moments = collect_moments(model, targets, batches, CPU)
    got = collect_gradients(model, targets, batches, moments, "mse", 1, 0, CPU)["layer1.0.conv1"]

    captured = {}

    def add_zero(_, __, out):
        captured["z"] = out.detach().clone()
        captured["eps"] = torch.zeros_like(out, requires_grad=True)
        return out + captured["eps"]

    handle = get_module(model, "layer1.0.bn1").register_forward_hook(add_zero)
    logits = model(batches[0][0])
    # the same probe draw as collect_gradients: sample i's from its own generator (seed 0)
    r = torch.stack([torch.randn(logits.shape[1], generator=sample_generator(0, i)) for i in range(len(logits))])
    r = r / logits.shape[1] ** 0.5
    (g,) = torch.autograd.grad(logits, [captured["eps"]], grad_outputs=r)
    handle.remove()
    z = (captured["z"] - moments["layer1.0.conv1"].mean.float().view(1, -1, 1, 1)).flatten(2)
    s = torch.bmm(g.flatten(2), z.transpose(1, 2))
    sym = (s + s.transpose(1, 2)) / 2
    torch.testing.assert_close(got["hessian"], (sym @ sym).sum(0).double(), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got["grad_m2"], torch.bmm(g.flatten(2), g.flatten(2).transpose(1, 2)).sum(0).double(),
                               rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_gradient_statistics_depend_on_neither_the_batch_size_nor_the_shards(loss):
    """Each sample's probes come from its index in the data, so neither how the data is batched nor how it is
    split between processes (interleaved shards, summed as torchrun's all-reduce sums them) changes anything."""
    model = randomize_(small_resnet(4), scale=0.3)
    targets = select(model, archs.MNIST)
    x = torch.rand(13, *archs.MNIST.shape, generator=torch.Generator().manual_seed(0))
    split = lambda part, size: [(part[i:i + size], None) for i in range(0, len(part), size)]
    moments = collect_moments(model, targets, split(x, 13), CPU)

    def gradients(part, size, indices=None):
        return collect_gradients(model, targets, split(part, size), moments, loss, 2, 5, CPU, indices=indices)

    whole, batched = gradients(x, 13), gradients(x, 4)
    shards = [gradients(x[r::2], 3, range(r, 13, 2)) for r in (0, 1)]
    for name, arrays in whole.items():
        for key, want in arrays.items():
            for how, got in (("batches of 4", batched[name][key]),
                             ("two shards", shards[0][name][key] + shards[1][name][key])):
                err = ((got - want).norm() / want.norm()).item()
                assert err < 1e-6, f"{name}/{key} from {how}: relative difference {err:.2e}"
