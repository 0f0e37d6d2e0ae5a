"""One fitting rule for every data source, announced once per source (issue 18, item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankcut.model.archs import MNIST
from rankcut.run.data import open_data

CPU = ["--device", "cpu"]


def _warnings(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    assert all(line.startswith("warning: ") for line in lines), lines
    return [line[len("warning: "):] for line in lines]


def _folder(root, mode: str, size: tuple[int, int]):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / "0.png")
    return root


@pytest.mark.parametrize("shape, said", [
    ((6, 3, 16, 16), "3x16x16 images are fitted to the model's 1x28x28 input: converted to grayscale, resized to 28x28"),
    ((6, 64, 64), "1x64x64 images are fitted to the model's 1x28x28 input: resized to 28x28"),
    ((6, 28, 28), None),
])
def test_tensor_files_are_fitted_with_one_warning(run_cli, mnist_ckpt, tmp_path, shape, said):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), y=np.zeros(6, dtype=np.int64))
    warned = _warnings(run_cli(["eval", mnist_ckpt, "--data", path, *CPU]).stderr)
    assert warned == ([f"{path}: {said}"] if said else []), warned


def test_an_rgb_folder_into_a_grayscale_model_says_so(run_cli, mnist_ckpt, tmp_path):
    folder = _folder(tmp_path / "rgb", "RGB", (40, 30))
    warned = _warnings(run_cli(["eval", mnist_ckpt, "--data", folder, *CPU]).stderr)
    assert warned[-1] == (f"{folder}: RGB 40x30 (the first image) images are fitted to the model's 1x28x28 input: "
                          "converted from RGB to L, resized (32 on the short side) and centre-cropped to 28x28"), warned


def test_builtin_digits_into_an_rgb_model_say_so(run_cli, tmp_path):
    rgb = tmp_path / "rgb.safetensors"
    run_cli(["init", "--arch", "rankcut:small-resnet", "--input", "3,32,32", "-o", rgb])
    warned = _warnings(run_cli(["eval", rgb, "--data", "mnist5k:test", "-n", "8", *CPU]).stderr)
    assert warned == ["mnist5k:test: 1x28x28 images are fitted to the model's 3x32x32 input: "
                      "grayscale repeated to 3 channels, resized to 32x32"], warned


def test_rgb_to_grayscale_is_the_luma_pil_uses(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez(path, x=rgb.transpose(2, 0, 1)[None])
    with pytest.warns(UserWarning, match="converted to grayscale"):
        image = open_data(str(path), MNIST)[0][0]
    gray = image * MNIST.std[0] + MNIST.mean[0]
    pil = torch.from_numpy(np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.float32)) / 255
    torch.testing.assert_close(gray[0], pil, atol=1 / 255, rtol=0)  # PIL rounds to whole grey levels


def test_a_folder_image_of_the_right_size_is_not_cropped(tmp_path):
    from PIL import Image

    folder = _folder(tmp_path / "gray", "L", (28, 28))
    image = open_data(str(folder), MNIST)[0][0]
    raw = torch.from_numpy(np.asarray(Image.open(folder / "a" / "0.png"), dtype=np.float32)) / 255
    torch.testing.assert_close(image[0] * MNIST.std[0] + MNIST.mean[0], raw)
