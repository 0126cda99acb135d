"""Miren's disk rules and the catalogue of disks: blocking code, no trio, no FUSE.

``model`` (types and names, the resolver/creator/catalogue protocols), ``live``
(is an image in use), ``rules`` (prepare_backup, prepare_restore: the
refusals), ``store`` (the embedded SQLite catalogue), ``etcd`` (a fleet's
catalogue on etcd, and the mount's watched copy of it), ``catalogs`` (which
catalogue: ``--catalog``, ``--node``; ``catalog copy``), ``manage`` (creating
and removing images, sweeping staging files), ``restore`` (one disk restore
fed in order, shared by the CLI and the mount).
"""
