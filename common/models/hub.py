"""Is the Hugging Face Hub reachable?  Offline, the hub clients retry for 25 to 50 s before they fail; one TCP
connection attempt (2 s at most) answers first, and the lookups then run in the clients' offline mode, which
serves what the local cache holds and fails at once for the rest.

The probe is skipped (the hub counts as reachable) when HF_HUB_OFFLINE is already set (the clients are offline
anyway) or a proxy is configured (a direct connection says nothing then).
"""
from __future__ import annotations

import functools
import os
import socket
import sys
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

__all__ = ["reachable", "offline_unless_reachable"]

TIMEOUT_S = 2.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.cache
def reachable() -> bool:
    """True when a TCP connection to the hub endpoint (HF_ENDPOINT, default huggingface.co:443) opens within
    TIMEOUT_S, or when the probe does not apply (see the module docstring).  Probed once per process."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or \
            any(os.environ.get(v) for v in PROXY_VARIABLES):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=TIMEOUT_S):
            return True
    except OSError:
        return False


@contextmanager
def offline_unless_reachable() -> Iterator[None]:
    """Run the block with huggingface_hub (transformers, timm) and datasets in offline mode when the hub is not
    reachable: cached files are used, anything else fails immediately."""
    if reachable():
        yield
        return
    from huggingface_hub import constants

    switches = [constants] + [m for m in (sys.modules.get("datasets.config"),) if m is not None]
    saved = [m.HF_HUB_OFFLINE for m in switches]
    for m in switches:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(switches, saved):
            m.HF_HUB_OFFLINE = value
