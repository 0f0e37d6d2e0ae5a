"""rankcut: compress trained CNNs by rank-reducing their convolutional and linear layers.

Python API for your own code::

    import rankcut
    model = rankcut.load("small.safetensors")          # nn.Module in eval mode
    meta = rankcut.read_meta("small.safetensors")      # architecture, input contract, edits, history
    rankcut.save(model, meta.with_history("my-step"), "out.safetensors")
"""

__version__ = "0.1.0"
__all__ = ["load", "load_with_meta", "read_meta", "save", "CheckpointMeta", "RankcutError"]


def __getattr__(name):
    # Lazy, so ``import rankcut`` stays cheap (no torch/torchvision import until something is used).
    if name == "RankcutError":
        from rankcut.errors import RankcutError

        return RankcutError
    if name in __all__:
        from rankcut.files import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'rankcut' has no attribute {name!r}")
