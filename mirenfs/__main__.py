"""``python -m mirenfs``: the ``mirenfs`` command."""

import sys

from mirenfs.launch import mirenfs

sys.exit(mirenfs())
