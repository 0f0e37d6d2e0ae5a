"""Atomic writes: ordinary permissions, stale temporaries of dead processes, and outputs that are also inputs."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from builders import digest
from cli_helpers import invoke

from rankcut.files.checkpoint import load_with_meta
from rankcut.files.fileio import atomic_write, remove_stale_temporaries


def test_output_equal_to_an_input_is_refused_without_force(small_files, tmp_path):
    ckpt, stats, data = small_files["ckpt"], small_files["stats"], small_files["data"]
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(ckpt.read_bytes())
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    model, _ = load_with_meta(ckpt)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    link = tmp_path / "link.safetensors"
    link.symlink_to(ckpt)
    hard = tmp_path / "hard.safetensors"
    os.link(ckpt, hard)
    cases = {
        "init -o WEIGHTS": (["init", "-a", "rankcut:small-resnet", "--kwargs", '{"width": 4}', "-w", weights], weights),
        "stats -o CKPT": (["stats", ckpt, "--data", data, "--device", "cpu"], ckpt),
        "stats -o DATA": (["stats", ckpt, "--data", data, "--device", "cpu"], data),
        "stats -o symlink to CKPT": (["stats", link, "--data", data, "--device", "cpu"], ckpt),
        "project -o CKPT": (["project", ckpt, "--stats", stats, "--keep", "0.5"], ckpt),
        "project -o STATS": (["project", ckpt, "--stats", stats, "--keep", "0.5"], stats),
        "project -o hard link to CKPT": (["project", hard, "--method", "svd", "--keep", "0.5"], ckpt),
        "finetune -o CKPT": (["finetune", ckpt, "--data", data, "--device", "cpu"], ckpt),
        "finetune -o TEACHER": (["finetune", ckpt, "--teacher", teacher, "--data", data, "--device", "cpu"], teacher),
        "finetune -o DATA": (["finetune", ckpt, "--data", data, "--device", "cpu"], data),
        "finetune -o EVAL-DATA": (["finetune", ckpt, "--data", "synthetic:8", "--eval-data", data, "--device", "cpu"], data),
    }
    files = [ckpt, stats, data, teacher, weights]
    digests = {p: digest(p) for p in files}
    for name, (args, out) in cases.items():
        result = invoke(*args, "-o", out)
        lines = result.stderr.splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (name, result.stderr)
        assert "is also an input; pass --force to overwrite it" in lines[0], (name, lines[0])
    assert {p: digest(p) for p in files} == digests
    # With --force the command may replace its own input (atomically: it read it completely first).
    assert invoke("project", teacher, "--method", "svd", "--keep", "0.5", "-o", teacher, "--force").exit_code == 0
    assert len(load_with_meta(teacher)[1].edits) > 0
    assert invoke("init", "-a", "rankcut:small-resnet", "--kwargs", '{"width": 4}', "-w", weights, "-o", weights,
                "--force").exit_code == 0
    load_with_meta(weights)


def test_outputs_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "new.bin"
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"x"))
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    out.chmod(0o640)
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"y"))
    assert out.stat().st_mode & 0o777 == 0o640 and out.read_bytes() == b"y"


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    out = tmp_path / "out.safetensors"
    stale = tmp_path / f".out.safetensors.{host}-{dead.pid}.abc123.part"
    live = tmp_path / f".out.safetensors.{host}-{os.getppid()}.def456.part"  # a process that is running
    remote = tmp_path / f".out.safetensors.otherhost-{dead.pid}.ghi789.part"  # another machine's: not ours to judge
    unrelated = tmp_path / f".other.safetensors.{host}-{dead.pid}.jkl012.part"
    for p in (stale, live, remote, unrelated):
        p.write_bytes(b"half")
    assert remove_stale_temporaries(out) == [stale]
    stale.write_bytes(b"half")
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, remote.name, unrelated.name])
