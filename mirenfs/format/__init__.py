"""The ``.mirn`` bytes, pure: the header (``header``) and the zstd frames and seek table (``frames``).

Nothing here runs trio or opens a path.
"""
