"""Argparse value types of the front ends and a parser whose errors are one line (exit status 2)."""
from __future__ import annotations

import argparse
import json
import math
from typing import Callable

__all__ = ["OneLineParser", "bits", "groupsize", "ratio", "int_at_least", "positive", "nonneg_int", "nonneg_float",
           "json_dict"]


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line (no usage dump) on stderr, exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def bits(value: str) -> int:
    """2..8, or 16 for 'not quantized'."""
    try:
        b = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 2..8 or 16, got {value!r}") from None
    if not (2 <= b <= 8 or b == 16):
        raise argparse.ArgumentTypeError(f"expected an integer in 2..8 or 16 (16 = not quantized), got {b}")
    return b


def groupsize(value: str) -> int:
    """-1 (no groups) or a positive integer."""
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 (no groups) or a positive integer, got {value!r}") from None
    if size != -1 and size <= 0:
        raise argparse.ArgumentTypeError(f"expected -1 (no groups) or a positive integer, got {size}")
    return size


def ratio(value: str) -> float:
    """A number in (0, 1]."""
    try:
        r = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}") from None
    if not 0.0 < r <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {r}")
    return r


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= low, else an error saying `expected <what>`."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n
    return parse


positive = int_at_least(1, "a positive integer")
nonneg_int = int_at_least(0, "an integer >= 0")


def nonneg_float(value: str) -> float:
    """A finite number >= 0."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}") from None
    if not (0.0 <= x < math.inf):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value}")
    return x


def json_dict(text: str) -> dict:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"img_size\": 32}}', got {text!r}")
    return value
