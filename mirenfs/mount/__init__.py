"""The FUSE adapter. Only this package imports pyfuse3, and only in the modules that serve.

``config`` and ``status`` import no pyfuse3, so the CLI can use them
without loading FUSE.
"""
