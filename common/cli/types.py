"""Argparse value types of the front ends and a parser whose errors are one line (exit status 2)."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable

__all__ = ["OneLineParser", "checked", "bits", "groupsize", "ratio", "int_at_least", "positive", "nonneg_int", "nonneg_float",
           "json_dict"]


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line (no usage dump) on stderr, exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: cast(value) when it parses and ok() accepts it, else an error saying `expected <expected>`."""
    def parse(value: str) -> Any:
        try:
            x = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {x}")
        return x
    return parse


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= low, else an error saying `expected <what>`."""
    return checked(int, lambda n: n >= low, what)


bits = checked(int, lambda b: 2 <= b <= 8 or b == 16, "an integer in 2..8 or 16 (16 = not quantized)")
groupsize = checked(int, lambda s: s == -1 or s > 0, "-1 (no groups) or a positive integer")
ratio = checked(float, lambda r: 0.0 < r <= 1.0, "a number in (0, 1]")
positive = int_at_least(1, "a positive integer")
nonneg_int = int_at_least(0, "an integer >= 0")
nonneg_float = checked(float, lambda x: 0.0 <= x < math.inf, "a finite number >= 0")


def json_dict(text: str) -> dict:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"img_size\": 32}}', got {text!r}")
    return value
