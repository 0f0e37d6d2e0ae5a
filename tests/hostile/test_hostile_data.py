"""Data that is empty, damaged, too large when decoded, of the wrong layout or labels: one line from every
command that reads data; edge cases that must work (less than a batch, other image sizes) do.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

CPU = ["--device", "cpu"]


def _folder(root: Path, files: dict[str, bytes | None]) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(buf, format="PNG")
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue() if content is None else content)
    return root


def test_data_smaller_than_a_batch_works(run_cli, small_files, tmp_path):
    data = small_files["data"]  # 6 samples, batch 64
    assert run_cli(["stats", small_files["ckpt"], "--data", data, *CPU, "-o", tmp_path / "s.npz", "--json"]).data["samples"] == 6
    assert run_cli(["eval", small_files["ckpt"], "--data", data, *CPU, "--json"]).data["samples"] == 6
    run_cli(["finetune", small_files["ckpt"], "--data", data, *CPU, "-o", tmp_path / "t.safetensors"])
    one = tmp_path / "one.npz"
    np.savez(one, x=np.zeros((1, 28, 28), np.uint8), y=np.zeros(1, np.int64))
    assert run_cli(["eval", small_files["ckpt"], "--data", one, *CPU, "--json"]).data["samples"] == 1
    run_cli(["stats", small_files["ckpt"], "--data", one, *CPU, "-o", tmp_path / "s1.npz"])


def test_bad_data(run_cli, small_files, tmp_path):
    good = _folder(tmp_path / "png", {"a/0.png": None})
    png = (good / "a" / "0.png").read_bytes()
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG", optimize=True)  # 400 Mpixel declared, ~50 KB
    folders = {
        "empty folder": (tmp_path / "nothing", "not an ImageFolder tree"),
        "class folders without images": (_folder(tmp_path / "noimg", {"a/readme.txt": b"hi"}), "not an ImageFolder tree"),
        "unreadable image later on": (_folder(tmp_path / "later", {"a/0.png": None, "a/1.png": b"not an image", "b/2.png": None}),
                                      "cannot read image " + str(tmp_path / "later" / "a" / "1.png")),
        "truncated image": (_folder(tmp_path / "trunc", {"a/0.png": None, "b/1.png": png[: len(png) // 2]}),
                            "cannot read image " + str(tmp_path / "trunc" / "b" / "1.png")),
        "unreadable first image": (_folder(tmp_path / "first", {"a/0.png": b"junk", "b/1.png": None}),
                                   "cannot read the first image of the data"),
        "decompression bomb": (_folder(tmp_path / "bomb", {"a/0.png": None, "b/1.png": bomb.getvalue()}),
                               "could be decompression bomb"),
    }
    (tmp_path / "nothing").mkdir()
    arrays = {
        "no samples": ({"x": np.zeros((0, 28, 28), np.uint8), "y": np.zeros(0, np.int64)}, "holds no samples"),
        "0-d x": ({"x": np.array(3.0)}, "x must be N,C,H,W or N,H,W"),
        "empty images": ({"x": np.zeros((4, 1, 0, 0), np.uint8)}, "x holds empty images"),
        "NaN pixels": ({"x": np.full((4, 1, 28, 28), np.nan, np.float32), "y": np.zeros(4, np.int64)}, "NaN or Inf"),
        "floats 0..255": ({"x": np.full((4, 1, 28, 28), 200.0, np.float32), "y": np.zeros(4, np.int64)}, "must be in 0..1"),
        "normalised floats": ({"x": np.linspace(-2, 2.5, 4 * 784, dtype=np.float32).reshape(4, 1, 28, 28)}, "must be in 0..1"),
        "wrong channel count": ({"x": np.zeros((4, 4, 28, 28), np.uint8), "y": np.zeros(4, np.int64)},
                                "4-channel images but the model takes 1"),  # 3 (RGB) is fitted: issue 18
        "N,H,W,C layout": ({"x": np.zeros((4, 28, 28, 3), np.uint8)}, "store it as N,C,H,W"),
        "labels and images differ in count": ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.zeros(3, np.int64)},
                                              "x has 4 samples but y has 3 labels"),
        "float labels": ({"x": np.zeros((4, 28, 28), np.uint8), "y": np.zeros(4, np.float32)}, "integer"),
        "no x": ({"images": np.zeros((4, 28, 28), np.uint8)}, "no tensor named x"),
    }
    cases = dict(folders)
    for name, (content, message) in arrays.items():
        path = tmp_path / f"{name.replace(' ', '_').replace(',', '')}.npz"
        np.savez(path, **content)
        cases[name] = (path, message)
    for name, (data, message) in cases.items():
        for args in (["stats", small_files["ckpt"], "--data", data, "-b", "2", *CPU, "-o", tmp_path / "s.npz"],
                     ["eval", small_files["ckpt"], "--data", data, "-b", "2", *CPU],
                     ["finetune", small_files["ckpt"], "--data", data, "-b", "2", *CPU, "-o", tmp_path / "t.safetensors"]):
            line = run_cli(args, fails=True).message
            assert message in line, f"{name} / {args[0]}: {line}"
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "t.safetensors").exists()
    # The file is named also when a DataLoader worker process hits it.
    line = run_cli(["eval", small_files["ckpt"], "--data", tmp_path / "later", "-b", "1", "--workers", "1", *CPU], fails=True).message
    assert "cannot read image " + str(tmp_path / "later" / "a" / "1.png") in line


def test_labels_outside_the_model(run_cli, small_files, tmp_path):
    many = _folder(tmp_path / "many", {f"c{i:02d}/0.png": None for i in range(12)})  # 12 classes, model has 10
    outside = tmp_path / "outside.npz"
    np.savez(outside, x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, 1, 2, -7]))
    for data, label in ((many, "label 10"), (outside, "label -7")):
        for args in (["eval", small_files["ckpt"], "--data", data, *CPU],
                     ["finetune", small_files["ckpt"], "--data", data, *CPU, "-o", tmp_path / "t.safetensors"]):
            assert f"{label}, outside the model's 10 classes" in run_cli(args, fails=True).message
    # stats needs no labels: the same data is fine there
    run_cli(["stats", small_files["ckpt"], "--data", many, *CPU, "-o", tmp_path / "s.npz"])


def test_images_of_another_size_are_resized(run_cli, small_files, tmp_path):
    from PIL import Image

    folder = tmp_path / "sizes"
    for rel, image in {"a/wide.png": Image.new("L", (300, 5)), "b/rgba.png": Image.new("RGBA", (64, 64))}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / rel)
    assert run_cli(["eval", small_files["ckpt"], "--data", folder, *CPU, "--json"]).data["samples"] == 2
