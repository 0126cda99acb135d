"""``python -m bench``: run the benchmark (see the package docstring)."""

import sys

from bench.cli import main

sys.exit(main())
