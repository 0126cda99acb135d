"""``python -m bench``: run the benchmark (see the package docstring)."""

import sys

from bench.cli import main

try:
    sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C: the mounts and scratch files were let go on the way out
    print("bench: interrupted; no figures", file=sys.stderr)
    sys.exit(130)
