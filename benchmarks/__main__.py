"""``python -m benchmarks`` (from the repository root): the command line of :func:`benchmarks.cli.main`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
