"""Every ``--data`` source yields batches of the contract's shape with labels in range, or a one-line error."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rankcut.errors import RankcutError
from rankcut.model import archs
from rankcut.model.contract import InputContract
from rankcut.run.data import UNLABELED, loader, open_data, shard, subset


MNIST = archs.default_input("rankcut:mnist-cnn", {})                           # 1x28x28


RGB32 = InputContract((3, 32, 32), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))


RESNET18 = archs.default_input("torchvision:resnet18", {})                     # 3x224x224, ImageNet stats


SMALL_RESNET_RGB = archs.default_input("rankcut:small-resnet", {"in_channels": 3})  # 3x28x28, MNIST stats


def batches(dataset, batch_size=4):
    return list(loader(dataset, batch_size))


def check_batches(dataset, contract, n, labels):
    """``n`` items in batches of shape (B, *contract.shape), float32, labels drawn from ``labels``."""
    assert len(dataset) == n
    seen = []
    for x, y in batches(dataset):
        assert x.shape[1:] == contract.shape and x.dtype == torch.float32
        assert y.dtype == torch.long and y.shape == (len(x),)
        seen += y.tolist()
    assert len(seen) == n and set(seen) <= set(labels), sorted(set(seen))
    return seen


def unnormalise(x, contract):
    return x * torch.tensor(contract.std).view(-1, 1, 1) + torch.tensor(contract.mean).view(-1, 1, 1)


def test_synthetic():
    data = open_data("synthetic:10", RGB32, num_classes=5, seed=1)
    labels = check_batches(data, RGB32, 10, range(5))
    assert len(open_data("synthetic", MNIST)) == 256
    again = open_data("synthetic:10", RGB32, num_classes=5, seed=1)
    assert torch.equal(again[3][0], data[3][0]) and again[3][1] == labels[3]
    assert not torch.equal(open_data("synthetic:10", RGB32, seed=2)[3][0], data[3][0])


@pytest.mark.parametrize("spec, message", [("synthetic:abc", "sample count"), ("synthetic:0", "at least one")])
def test_synthetic_bad_counts(spec, message):
    with pytest.raises(RankcutError, match=message):
        open_data(spec, MNIST)


def write_tensors(path, x, y=None):
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    if path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    else:
        save_file(arrays, str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("layout", ["uint8 N,H,W", "float N,C,H,W"])
@pytest.mark.parametrize("labelled", [True, False])
def test_tensor_files(tmp_path, suffix, layout, labelled):
    g = torch.Generator().manual_seed(0)
    if layout == "uint8 N,H,W":
        x, contract = torch.randint(0, 256, (10, 28, 28), generator=g, dtype=torch.uint8), MNIST
        first = x[0].float()[None] / 255
    else:
        x, contract = torch.rand(10, 3, 32, 32, generator=g), RGB32
        first = x[0]
    y = torch.arange(10) % 4 if labelled else None
    data = open_data(write_tensors(tmp_path / f"d{suffix}", x, y), contract)
    labels = check_batches(data, contract, 10, range(4) if labelled else [UNLABELED])
    if labelled:
        assert labels == y.tolist()
    torch.testing.assert_close(unnormalise(data[0][0], contract), first)


def test_tensor_file_resized_to_the_contract(tmp_path):
    data = open_data(write_tensors(tmp_path / "d.npz", torch.rand(3, 1, 20, 20)), MNIST)
    assert data[0][0].shape == (1, 28, 28)


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for k, cls in enumerate(["cat", "dog", "emu"]):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            mode = "L" if i else "RGB"   # a mixed folder, as real ones are
            shape = (30 + i, 40) if mode == "L" else (30, 40 + k, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("contract", [RGB32, MNIST], ids=["rgb", "grayscale"])
@pytest.mark.parametrize("train", [False, True])
def test_image_folder(image_folder, contract, train):
    data = open_data(str(image_folder), contract, train=train)
    labels = check_batches(data, contract, 6, range(3))
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_image_folder_with_unreadable_image(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(RankcutError, match="cannot read the first image"):
        open_data(str(tmp_path), RGB32)


def test_empty_folder_is_not_an_image_folder(tmp_path):
    with pytest.raises(RankcutError, match="not an ImageFolder"):
        open_data(str(tmp_path), RGB32)


def test_mnist5k_splits():
    train, test = open_data("mnist5k:train", MNIST), open_data("mnist5k:test", MNIST)
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(train.y).tolist() == [400] * 10
    assert torch.bincount(test.y).tolist() == [100] * 10
    with pytest.raises(RankcutError, match=r"say which mnist5k digits: mnist5k:train \(4,000\) or mnist5k:test"):
        open_data("mnist5k", MNIST)  # issue 18: no silent default split
    x, y = next(iter(loader(test, 64)))
    assert x.shape == (64, 1, 28, 28) and 0 <= y.min() and y.max() <= 9
    # the two splits are disjoint: no test image appears in train
    train_rows = {bytes(img.numpy()) for img in train.x}
    assert not any(bytes(img.numpy()) in train_rows for img in test.x)
    with pytest.raises(RankcutError, match="train or test"):
        open_data("mnist5k:valid", MNIST)


def write_idx(path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian dims, unsigned bytes), uncompressed, as torchvision reads it."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    """A root folder holding MNIST and FashionMNIST raw files (12 train, 5 test images each)."""
    rng = np.random.default_rng(0)
    for name in ("MNIST", "FashionMNIST"):
        raw = tmp_path / name / "raw"
        raw.mkdir(parents=True)
        for split, n in (("train", 12), ("t10k", 5)):
            write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
            write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path


@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist"])
def test_torchvision_mnist_on_disk(fake_mnist, kind):
    check_batches(open_data(f"{kind}:{fake_mnist}", MNIST), MNIST, 12, range(10))
    check_batches(open_data(f"{kind}:{fake_mnist}:train", MNIST), MNIST, 12, range(10))
    labels = check_batches(open_data(f"{kind}:{fake_mnist}:test", RGB32), RGB32, 5, range(10))
    assert labels == [0, 1, 2, 3, 4]


def test_mnist_given_its_own_subfolder(fake_mnist):
    assert len(open_data(f"mnist:{fake_mnist / 'MNIST'}:test", MNIST)) == 5


def test_damaged_mnist_files(fake_mnist):
    (fake_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09")
    with pytest.raises(RankcutError, match="cannot read MNIST"):
        open_data(f"mnist:{fake_mnist}", MNIST)


@pytest.mark.parametrize("kind", ["mnist", "cifar10", "cifar100", "fashion-mnist"])
def test_torchvision_sets_missing(tmp_path, kind):
    with pytest.raises(RankcutError, match="dataset folder not found: /nonexistent"):
        open_data(f"{kind}:/nonexistent", RGB32)
    with pytest.raises(RankcutError, match="never downloads"):
        open_data(f"{kind}:{tmp_path}:test", RGB32)  # the folder is there, the files are not
    assert list(tmp_path.iterdir()) == []  # and nothing was downloaded or created


@pytest.mark.parametrize("contract", [RESNET18, SMALL_RESNET_RGB], ids=["resnet18", "small-resnet-rgb"])
def test_grayscale_is_repeated_for_three_channel_models(tmp_path, contract):
    x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    data = open_data(write_tensors(tmp_path / "gray.npz", x), contract)
    image, label = data[1]
    assert image.shape == contract.shape and label == UNLABELED
    plain = unnormalise(image, contract)
    torch.testing.assert_close(plain[0], plain[1])
    torch.testing.assert_close(plain[0], plain[2])


def test_channels_that_cannot_fit(tmp_path):
    path = write_tensors(tmp_path / "two.safetensors", torch.rand(4, 2, 28, 28))
    with pytest.raises(RankcutError, match="2-channel images but the model takes 3 channels"):
        open_data(path, SMALL_RESNET_RGB)
    path = write_tensors(tmp_path / "rgba.safetensors", torch.rand(4, 4, 28, 28))  # RGB -> gray is fitted now
    with pytest.raises(RankcutError, match="4-channel images but the model takes 1 channels"):
        open_data(path, MNIST)


@pytest.mark.parametrize("spec, message", [
    ("imagenet:/data", "unknown data source"),
    ("no/such/folder", "unknown data source"),
    ("missing.npz", "data file not found"),
    ("missing.safetensors", "data file not found"),
])
def test_unknown_sources(spec, message):
    with pytest.raises(RankcutError, match=message):
        open_data(spec, MNIST)


def test_a_plain_file_is_not_a_source(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hi")
    with pytest.raises(RankcutError, match="expected a folder, .npz or .safetensors"):
        open_data(str(path), MNIST)


def test_subset_shard_loader():
    data = open_data("synthetic:50", MNIST)
    part = subset(data, 20, seed=3)
    assert len(part) == 20 and list(part.indices) == sorted(part.indices)
    assert list(subset(data, 20, seed=3).indices) == list(part.indices)
    assert subset(data, None, 0) is data and subset(data, 500, 0) is data
    shards = [shard(data, r, 3) for r in range(3)]
    covered = sorted(i for s in shards for i in s.indices)
    assert covered == list(range(50))
    assert shard(data, 0, 1) is data
    assert [len(x) for x, _ in loader(data, 16)] == [16, 16, 16, 2]
    assert [len(x) for x, _ in loader(data, 16, drop_last=True)] == [16, 16, 16]
    shuffled = [y.tolist() for _, y in loader(data, 50, shuffle=True, seed=1)]
    assert shuffled == [y.tolist() for _, y in loader(data, 50, shuffle=True, seed=1)]
    with pytest.raises(RankcutError, match="--samples"):
        subset(data, 0, 0)
    with pytest.raises(RankcutError, match="--batch-size"):
        loader(data, 0)
    with pytest.raises(RankcutError, match="empty"):
        loader(torch.utils.data.Subset(data, []), 4)
