"""``python -m analysis PATH [--out DIR] [--metric M] [--stage S] [--max-drop X]``: the same as ``sweep analyze``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
