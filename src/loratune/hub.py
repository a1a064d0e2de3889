"""The Hugging Face hub, reached at most once and never waited on.

Models and datasets named by a hub id are looked up in the local cache, and on the hub when it can be
reached. Without a network, huggingface_hub retries every request for about a minute and prints a
page of warnings before the error; a 3-second probe first tells whether the hub answers at all, and
when it does not, this process and its trials switch to offline mode (the cache only), so a missing
model or dataset is one clear line at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def offline() -> bool:
    """Whether hub requests are off (set by the user, or by ``use_hub`` after a failed probe)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "TRUE", "YES", "ON") or \
        os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "TRUE", "YES", "ON")


@functools.cache
def reachable() -> bool:
    """One TCP connection to the hub's endpoint within ``PROBE_TIMEOUT_S``."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def use_hub() -> bool:
    """Call before looking up a hub id: returns True when the hub will be asked, False when only the
    local cache will (offline mode, set for this process and the trials it starts)."""
    if offline():
        return False
    if reachable():
        return True
    os.environ["HF_HUB_OFFLINE"] = "1"  # the trials this process starts inherit it
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return False


def where_looked(online: bool) -> str:
    return "the Hugging Face hub and the local cache" if online else \
        "the local Hugging Face cache (the hub is out of reach or offline mode is on)"
