"""Tables more than one command prints."""

from __future__ import annotations

import torch
from rich.table import Table

from rankcut.files.statsfile import StatsFile
from rankcut.stats.moments import rank_for

SPARK = "▁▂▃▄▅▆▇█"
LEVELS = (0.90, 0.95, 0.99)


def spectrum(values: torch.Tensor, width: int = 16) -> str:
    """A small picture of the eigenvalue spectrum: log scale, ``width`` characters."""
    chunks = torch.tensor_split(values.clamp_min(0), min(width, len(values)))
    logs = torch.stack([torch.log10(c.mean() + 1e-12) for c in chunks])
    low, high = logs.min(), logs.max()
    levels = ((logs - low) / (high - low).clamp_min(1e-12) * (len(SPARK) - 1)).round().long()
    return "".join(SPARK[i] for i in levels)


def stats_summary(stats: StatsFile, title: str) -> tuple[dict, Table]:
    """The per-layer table shown by ``stats`` and ``info S.npz``, and the same as a dict."""
    grad = f"{stats.loss}, {stats.info.get('probes', 1)} probe(s) per batch" if stats.loss else "none (no --grad)"
    made = (f"checkpoint sha256 {stats.checkpoint[:16]}; data {stats.info.get('data', 'not recorded')}, "
            f"{stats.samples:,} samples; gradient statistics: {grad}")
    table = Table("layer", "capture", "channels", "positions", *(f"rank@{int(f * 100)}%" for f in LEVELS),
                  "spectrum (log)", title=title, title_justify="left", caption=made, caption_justify="left")
    rows = []
    for name, s in stats.layers.items():
        values = torch.linalg.eigvalsh(s.moments.covariance).flip(0).clamp_min(0)
        row = {"layer": name, "capture": s.target.capture, "channels": s.channels, "positions": int(s.moments.count),
               **{f"rank_{int(f * 100)}": rank_for(values, f) for f in LEVELS}}
        rows.append(row)
        table.add_row(name, s.target.capture, str(s.channels), f"{row['positions']:,}",
                      *(str(row[f"rank_{int(f * 100)}"]) for f in LEVELS), spectrum(values))
    data = {**stats.info, "checkpoint": stats.checkpoint, "samples": stats.samples, "loss": stats.loss, "layers": rows,
            "chains": [c.chain.to_dict() for c in stats.chains.values()]}
    return data, table


def channel_table(data: dict) -> Table:
    """``project --structure channels``: a row per chain, then the layers left whole and why."""
    totals = data["totals"]
    caption = (f"MACs {totals['macs_before']:,} -> {totals['macs_after']:,} (x{totals['macs_ratio']:.3f}), params "
               f"{totals['params_before']:,} -> {totals['params_after']:,} (x{totals['params_ratio']:.3f}); "
               f"predicted loss in {data['loss_units']}")
    if "latency_ratio" in totals:
        caption += (f"\nlatency in the profile's cost model {totals['latency_before_ns'] / 1e6:.3f} -> "
                    f"{totals['latency_after_ns'] / 1e6:.3f} ms (x{totals['latency_ratio']:.3f})")
    table = Table("producer", "consumer", "channels", "predicted loss", "of consumer variance", "status",
                  title="channel pruning", title_justify="left", caption=caption, caption_justify="left")
    for r in data["chains"]:
        table.add_row(r["producer"], r["consumer"], f"{r['channels']} -> {r['kept']}", f"{r['predicted_loss']:.4g}",
                      f"{100 * r['loss_fraction']:.2f}%", r["status"])
    table.add_section()
    for name, why in data["refused"].items():
        table.add_row(name, "", "", "", "", f"whole: {why}")
    return table


def auto_table(data: dict) -> Table:
    """``project --structure auto``: every target's chosen structure and size, then the chains not offered and why."""
    totals = data["totals"]
    caption = (f"MACs {totals['macs_before']:,} -> {totals['macs_after']:,} (x{totals['macs_ratio']:.3f}), params "
               f"{totals['params_before']:,} -> {totals['params_after']:,} (x{totals['params_ratio']:.3f}); "
               f"summed predicted loss {data['loss']:.4g} {data['loss_units']}")
    table = Table("layer", "structure", "size", "predicted loss", title="auto: whole, pair or channels per layer",
                  title_justify="left", caption=caption, caption_justify="left")
    for r in data["layers"]:
        size = str(r["width"]) if r["structure"] == "whole" else f"{r['width']} -> {r['size']}"
        table.add_row(r["layer"], r["structure"], size, f"{r['predicted_loss']:.4g}")
    table.add_section()
    for name, why in data["refused"].items():
        table.add_row(name, "", "", f"no channels: {why}")
    return table
