"""Every torchvision classification builder and a list of timm models through init, stats and project.

For each architecture, through the real CLI (in this process) at a small input and 10 classes: ``init``;
``stats --data synthetic`` (few samples); ``project --method pca --keep 1.0`` must reproduce the outputs
(max |difference| / max |output| on a random batch); ``--keep 0.5`` must run, and its MACs ratio is shown.
At keep 1.0 the CLI keeps every layer whole (a full-rank pair never saves MACs), so one more check makes
*every* target a pca pair at its full rank (the library's ``project_model`` without the saving rule) and
compares the outputs: that is the check of the algebra on the architecture.
Each step passes or is refused with the one line rankcut printed; a model over ``--max-params`` is skipped
with that reason. Prints one row per architecture and a summary per family.

    python bench/bench_archs.py                       # torchvision and the timm list
    python bench/bench_archs.py --source torchvision --max-params 100e6
    python bench/bench_archs.py --only torchvision:regnet_x_400mf timm:levit_128s
    python bench/bench_archs.py --rows rows.jsonl     # keep each row as it finishes; a rerun skips those done
    python bench/bench_archs.py --rows rows.jsonl --no-run   # tables from the rows kept so far
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table
from typer.testing import CliRunner

from rankcut.cli import app

TIMM = ("resnet50d", "efficientnet_b0", "convnext_nano", "vit_small_patch16_224", "deit_tiny_patch16_224",
        "mixer_b16_224", "swin_tiny_patch4_window7_224", "mobilenetv3_small_100", "regnety_002", "levit_128s")
EXACT = 1e-3  # max |difference| / max |output| that counts as reproducing the outputs at keep 1.0


@dataclass
class Row:
    """What happened to one architecture: each step's outcome ("ok", a figure, or the refusal line)."""

    arch: str
    shape: tuple[int, ...]
    kwargs: dict
    params: int | None = None
    steps: dict[str, str] = field(default_factory=dict)
    exact_error: float | None = None
    pairs_error: float | None = None
    macs_ratio: float | None = None
    seconds: float = 0.0

    @property
    def family(self) -> str:
        prefix, _, name = self.arch.partition(":")
        words = re.match(r"([a-z]+?)(v\d+)?(?:\d|_|$)", name)
        head = "wide_resnet" if name.startswith("wide_resnet") else words.group(1) + (words.group(2) or "")
        return f"{prefix}:{head}"

    def passed(self, step: str) -> bool:
        return self.steps.get(step) == "ok"


def settings(arch: str) -> tuple[dict, tuple[int, int, int]]:
    """Builder keyword arguments and input shape that keep an architecture small where its builder allows."""
    prefix, _, name = arch.partition(":")
    kwargs: dict = {"num_classes": 10}
    if prefix == "torchvision":
        if name.startswith("vit_"):
            size = 4 * int(name.rsplit("_", 1)[1])  # 4 x 4 patches
            return {**kwargs, "image_size": size}, (3, size, size)
        if name == "maxvit_t":
            return kwargs, (3, 224, 224)  # its windows need 224 (7 x 2^5)
        if name == "inception_v3":
            return kwargs, (3, 96, 96)  # at least 75 pixels
        return kwargs, (3, 64, 64)
    if name.startswith(("vit_", "deit_", "mixer_", "test_vit")):
        return {**kwargs, "img_size": 64}, (3, 64, 64)
    if name.startswith(("swin_", "levit_")):
        return kwargs, (3, 224, 224)  # window and attention-bias sizes are fixed by the name
    return kwargs, (3, 64, 64)


def parameter_count(arch: str, kwargs: dict) -> int | None:
    """Parameters without allocating them: torchvision's weight tables, else a meta-device build."""
    prefix, _, name = arch.partition(":")
    if prefix == "torchvision":
        import torchvision.models as tvm

        return tvm.get_model_weights(name).DEFAULT.meta["num_params"]
    from rankcut.model import archs

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in archs.build(arch, kwargs).parameters())
    except Exception:  # the check itself will report why it cannot be built
        return None


def cli(*args) -> tuple[dict | None, str]:
    """``rankcut ARGS --json`` in this process: (result, "ok") or (None, the error line / the traceback's last line)."""
    result = CliRunner().invoke(app, [str(a) for a in args] + ["--json"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return None, f"TRACEBACK {type(result.exception).__name__}: {str(result.exception).splitlines()[0][:200]}"
    if result.exit_code != 0:
        return None, (result.stderr.strip().splitlines() or ["exit %d" % result.exit_code])[-1]
    return json.loads(result.stdout), "ok"


def relative_error(a, b, shape: tuple[int, ...]) -> float:
    """max |b(x) - a(x)| / max |a(x)| for two models on a seeded random batch of 4."""
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return ((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-30)).item()


def full_rank_pairs_error(base: Path, stats: Path, shape: tuple[int, ...]) -> tuple[float | None, str]:
    """Every target of ``stats`` as a pca pair at its full rank: (relative output error, "ok" or why not)."""
    import rankcut
    from rankcut.compress.project import project_model
    from rankcut.errors import RankcutError
    from rankcut.files.statsfile import load_stats
    from rankcut.model.edits import get_module
    from rankcut.model.layers import current_rank

    try:
        model = rankcut.load(base)
        layers = load_stats(stats).layers
        targets = [s.target for s in layers.values()]
        ranks = {t.name: current_rank(get_module(model, t.name)) for t in targets}
        with torch.no_grad():
            project_model(model, targets, layers, "pca", ranks, only_if_saves=False)
        return relative_error(rankcut.load(base), model, shape), "ok"
    except RankcutError as e:
        return None, str(e)
    except Exception as e:  # a bug: shown as such in the table
        return None, f"TRACEBACK {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def check(arch: str, work: Path, samples: int = 16, max_params: float = float("inf"),
          size: int | None = None) -> Row:
    """Run the four checks on one architecture in ``work`` (files are deleted afterwards).

    ``size`` overrides the input's height and width (and ``img_size`` where the builder takes one).
    """
    kwargs, shape = settings(arch)
    if size is not None:
        shape = (shape[0], size, size)
        kwargs = {**kwargs, **({"img_size": size} if "img_size" in kwargs else {}),
                  **({"image_size": size} if "image_size" in kwargs else {})}
    row = Row(arch, shape, kwargs)
    start = time.perf_counter()
    row.params = parameter_count(arch, kwargs)
    if row.params is not None and row.params > max_params:
        row.steps["init"] = f"skipped: {row.params / 1e6:.0f}M parameters, over this run's limit {max_params / 1e6:.0f}M"
        return row
    work.mkdir(parents=True, exist_ok=True)
    base, stats = work / "base.safetensors", work / "base.npz"
    try:
        made, row.steps["init"] = cli("init", "--arch", arch, "--kwargs", json.dumps(kwargs), "--input",
                                      ",".join(map(str, shape)), "-o", base, "--force")
        if made is None:
            return row
        row.params = made["params"]
        _, row.steps["stats"] = cli("stats", base, "--data", f"synthetic:{samples}", "--batch-size", "8", "-o", stats,
                                    "--force")
        if not row.passed("stats"):
            return row
        full, row.steps["keep 1.0"] = cli("project", base, "--stats", stats, "--keep", "1.0", "-o",
                                          work / "full.safetensors", "--force")
        if full is not None:
            import rankcut

            row.exact_error = relative_error(rankcut.load(base), rankcut.load(work / "full.safetensors"), shape)
            if row.exact_error > EXACT:
                row.steps["keep 1.0"] = f"outputs differ: relative error {row.exact_error:.2g}"
        row.pairs_error, row.steps["pairs"] = full_rank_pairs_error(base, stats, shape)
        if row.pairs_error is not None and row.pairs_error > EXACT:
            row.steps["pairs"] = f"outputs differ: relative error {row.pairs_error:.2g}"
        half, row.steps["keep 0.5"] = cli("project", base, "--stats", stats, "--keep", "0.5", "-o",
                                          work / "half.safetensors", "--force")
        if half is not None:
            row.macs_ratio = half["totals"]["macs_ratio"]
        return row
    finally:
        row.seconds = time.perf_counter() - start
        shutil.rmtree(work, ignore_errors=True)


def architectures(source: str) -> list[str]:
    names = []
    if source in ("all", "timm"):
        names += [f"timm:{n}" for n in TIMM]
    if source in ("all", "torchvision"):
        import torchvision.models as tvm

        names += [f"torchvision:{n}" for n in tvm.list_models(module=tvm)]
    return names


def _load_rows(path: Path | None) -> dict[str, Row]:
    if path is None or not path.exists():
        return {}
    rows = [Row(**{**d, "shape": tuple(d["shape"])}) for d in map(json.loads, path.read_text().splitlines()) if d]
    return {r.arch: r for r in rows}


def _cell(row: Row, step: str) -> str:
    outcome = row.steps.get(step)
    if outcome is None:
        return ""
    if outcome == "ok":
        if step == "keep 1.0":
            return f"ok ({row.exact_error:.1e})"
        if step == "pairs":
            return f"ok ({row.pairs_error:.1e})"
        if step == "keep 0.5":
            return f"ok (MACs x{row.macs_ratio:.3f})"
        return "ok"
    return outcome.removeprefix("error: ")


def rows_table(rows: list[Row]) -> Table:
    table = Table("architecture", "input", "params", "init", "stats", "keep 1.0 (max rel. err.)",
                  "full-rank pairs (max rel. err.)", "keep 0.5", "s",
                  title="every architecture: init, stats, exact at keep 1.0, keep 0.5",
                  caption=f"keep 1.0 passes at max |diff| / max |output| <= {EXACT:g}; stats on synthetic data, "
                          "pca; parameters at 10 classes", caption_justify="left")
    for r in rows:
        if r.steps.get("init", "").startswith("not run"):
            continue  # counted in the family table
        table.add_row(r.arch, "x".join(map(str, r.shape)), "" if r.params is None else f"{r.params / 1e6:.1f}M",
                      *(_cell(r, s) for s in ("init", "stats", "keep 1.0", "pairs", "keep 0.5")), f"{r.seconds:.0f}")
    return table


def family_table(rows: list[Row]) -> Table:
    table = Table("family", "models", "init", "stats", "exact at keep 1.0", "full-rank pairs", "keep 0.5",
                  "MACs x at keep 0.5",
                  "skipped (size)", "not run", title="per family: how many models pass each check")
    families: dict[str, list[Row]] = {}
    for r in rows:
        families.setdefault(r.family, []).append(r)
    for family, members in families.items():
        ran = [r for r in members if not r.steps.get("init", "").startswith(("skipped", "not run"))]
        skipped = sum(r.steps.get("init", "").startswith("skipped") for r in members)
        ratios = [r.macs_ratio for r in ran if r.macs_ratio is not None]
        spread = "" if not ratios else (f"{min(ratios):.3f}" if len(ratios) == 1 or min(ratios) == max(ratios)
                                        else f"{min(ratios):.3f}-{max(ratios):.3f}")
        table.add_row(family, str(len(members)), *(f"{sum(r.passed(s) for r in ran)}/{len(ran)}"
                                                   for s in ("init", "stats", "keep 1.0", "pairs", "keep 0.5")),
                      spread, str(skipped), str(len(members) - len(ran) - skipped))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("all", "torchvision", "timm"), default="all")
    parser.add_argument("--only", nargs="*", help="These architectures only (torchvision:NAME, timm:NAME).")
    parser.add_argument("--max-params", type=float, default=100e6, help="Skip larger models (default 100e6).")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=Path, help="JSON-lines file: rows found there are not rerun; new rows are added.")
    parser.add_argument("--no-run", action="store_true", help="Only show the rows in --rows; list the others as not run.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import show

    names = args.only or architectures(args.source)
    done = _load_rows(args.rows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            if name in done:
                rows.append(done[name])
                continue
            if args.no_run:
                kwargs, shape = settings(name)
                rows.append(Row(name, shape, kwargs, steps={"init": "not run yet (see --rows)"}))
                continue
            rows.append(check(name, Path(tmp) / str(i), args.samples, args.max_params))
            r = rows[-1]
            if args.rows:
                with open(args.rows, "a", encoding="utf-8") as f:
                    f.write(json.dumps(asdict(r)) + "\n")
            print(f"{name}: " + "; ".join(f"{k}: {_cell(r, k)}" for k in r.steps) + f" ({r.seconds:.0f} s)",
                  file=sys.stderr, flush=True)
    show(rows_table(rows))
    show(family_table(rows))


if __name__ == "__main__":
    main()
