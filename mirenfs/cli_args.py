"""Argument helpers shared by the command modules (cli, cli_store, cli_mount, cli_ops)."""

from __future__ import annotations

import argparse

from mirenfs.errors import MirenfsError
from mirenfs.produce import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, Settings


def add_compression_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL, help=argparse.SUPPRESS)


def parse_size(text: str) -> int:
    """Sizes as operators write them: 4096, 512M, 10G, 1T (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in units:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = int(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4096, 512M or 10G") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        return Settings(chunk_size=args.chunk_size, level=args.level)
    except ValueError as exc:
        raise MirenfsError(str(exc)) from None
