"""What ``import rankcut`` costs and offers: no heavy imports, no CUDA, the checkpoint API at the top level."""

from __future__ import annotations

import subprocess
import sys

from builders import assert_same_state

import rankcut


def test_import_rankcut_is_light():
    code = ("import rankcut, sys\n"
            "heavy = {'torch', 'torchvision', 'numpy', 'safetensors', 'typer'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_does_not_initialise_cuda(mnist_ckpt):
    code = ("import sys, torch\n"
            "from typer.testing import CliRunner\n"
            "from rankcut.cli import app\n"
            f"result = CliRunner().invoke(app, ['info', {str(mnist_ckpt)!r}, '--json'])\n"
            "assert result.exit_code == 0, result.output\n"
            "assert not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_top_level_api_is_the_checkpoint_api(mnist_ckpt, tmp_path):
    model, meta = rankcut.load_with_meta(mnist_ckpt)
    assert meta.arch == "rankcut:mnist-cnn" and meta.input.shape == (1, 28, 28)
    out = tmp_path / "api.safetensors"
    rankcut.save(model, meta.with_history("my-step", note="hi"), out)
    assert rankcut.read_meta(out).history[-1]["note"] == "hi"
    assert_same_state(rankcut.load(out), model)
    assert issubclass(rankcut.RankcutError, Exception)
