"""Faults a test plants inside a mirenfs process it starts, kept out of the product.

Python imports this module at start-up in every process whose ``PYTHONPATH``
holds this directory (``support.runners.hold_frozen_in_daemons``); it changes
nothing unless one of the variables below is set.

``MIRENFS_TEST_HOLD_FROZEN_S``: stay that many seconds inside each freeze,
as a daemon that stalls while the filesystem is frozen (the thaw watchdog's
case).

``MIRENFS_TEST_HOLD_BEFORE_REPORT``: a backup, its file in place, waits (at
most a minute) before it says so until the file this names exists: a signal
sent meanwhile comes after the outcome was settled.
"""

from __future__ import annotations

import os
import time

HOLD_FROZEN = os.environ.get("MIRENFS_TEST_HOLD_FROZEN_S")

if HOLD_FROZEN:
    from mirenfs.disks import pointintime

    _enter = pointintime._Freeze.__enter__

    def _held_frozen(self: pointintime._Freeze) -> pointintime._Freeze:
        entered = _enter(self)
        time.sleep(float(HOLD_FROZEN))  # the stall under test: nothing to wait for
        return entered

    pointintime._Freeze.__enter__ = _held_frozen  # type: ignore[method-assign]

HOLD_BEFORE_REPORT = os.environ.get("MIRENFS_TEST_HOLD_BEFORE_REPORT")

if HOLD_BEFORE_REPORT:
    from mirenfs.cli import snapshot_cmds

    _report = snapshot_cmds._report_backup

    def _held_report(*args: object) -> None:
        deadline = time.monotonic() + 60
        while not os.path.exists(HOLD_BEFORE_REPORT) and time.monotonic() < deadline:
            time.sleep(0.01)  # a hook in another process: the test creates the file to go on
        _report(*args)  # type: ignore[arg-type]

    snapshot_cmds._report_backup = _held_report
