"""``python -m rankcut.cli``: the same CLI, for launchers such as ``torchrun -m`` that need a module."""

from rankcut.cli import main

main()
