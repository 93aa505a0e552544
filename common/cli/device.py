"""The `--device` flag of every front end: a torch device that exists on this machine (default cuda if any, else cpu)."""
from __future__ import annotations

import argparse

import torch

__all__ = ["resolve_device", "device_flag"]


def resolve_device(value: str | None, flag: str = "--device") -> torch.device:
    """torch.device(value), or cuda / cpu when value is None; a ValueError naming the flag when it cannot be used."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise ValueError(f"{flag}: unknown device {value!r} (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {value}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {value}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def device_flag(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Resolve `args.device` in place (to its string form) and return it; an unusable device is a parser error."""
    try:
        dev = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    args.device = str(dev)
    return dev
