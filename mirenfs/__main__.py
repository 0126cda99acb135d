"""``python -m mirenfs``: the ``mirenfs`` command."""

import sys

from mirenfs.cli import main

sys.exit(main())
