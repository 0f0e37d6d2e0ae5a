"""rankcut: compress trained CNNs by rank-reducing their convolutional and linear layers.

The Python API is the CLI's core, one call per use case (see ``rankcut.api`` and the README)::

    import rankcut
    model, meta = rankcut.load_with_meta("base.safetensors")
    data = rankcut.open_data("mnist5k:train", meta.input)
    stats = rankcut.collect_stats(model, meta.input, data, rankcut.StatsConfig())
    result = rankcut.project(model, meta.input, stats, rankcut.ProjectConfig(method="pca", keep=0.5))
    rankcut.save(model, meta.with_edits(*result.edits).with_history("my-step"), "small.safetensors")
"""

__version__ = "0.1.0"

# name -> module that defines it; resolved lazily so ``import rankcut`` stays cheap (no torch until used)
_EXPORTS = {
    "load": "rankcut.files.checkpoint", "load_with_meta": "rankcut.files.checkpoint",
    "read_meta": "rankcut.files.checkpoint", "save": "rankcut.files.checkpoint",
    "CheckpointMeta": "rankcut.files.checkpoint", "load_stats": "rankcut.files.statsfile",
    "save_stats": "rankcut.files.statsfile", "InputContract": "rankcut.model.contract",
    "open_data": "rankcut.run.data", "RankcutError": "rankcut.errors",
    "collect_stats": "rankcut.api", "project": "rankcut.api", "evaluate": "rankcut.api",
    "StatsConfig": "rankcut.api", "ProjectConfig": "rankcut.api", "Budget": "rankcut.api",
    "EvalConfig": "rankcut.api", "ProjectResult": "rankcut.api", "refit": "rankcut.api",
    "RefitConfig": "rankcut.api", "RefitResult": "rankcut.api", "sweep": "rankcut.api", "SweepConfig": "rankcut.api",
    "SweepCache": "rankcut.run.sweepcache", "file_inputs": "rankcut.run.sweepcache",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rankcut' has no attribute {name!r}")
