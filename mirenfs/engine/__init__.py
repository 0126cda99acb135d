"""Image <-> snapshot on trio and worker threads: knows no disks and no FUSE.

``image`` (extents, chunk sources, sparse writer, staging image), ``produce``
(settings, index, producer, sequential reader), ``consume`` (restore
stream, staged restore), ``files`` (whole jobs on paths and pipes).
"""
