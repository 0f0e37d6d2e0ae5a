"""``python -m rankcut``: the command line."""

from rankcut.cli import main

main()
