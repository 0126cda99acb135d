"""Shared helpers for the mirenfs test suite.

One home for everything tests share, grouped by job: Go test vectors,
image/data helpers, command runners, mounts, loop devices, systemd
sandboxing and store fixtures.  Test modules import from here; they never
import conftest or one another.
"""
