"""Which process builds a shared file, and how the others wait for it.

Lightning's DDP launcher and Slurm start the whole script once per rank, so anything written to disk before
training (shapes shards, tokenizer, first-stage autoencoder) is written by each node's first process only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def is_node_leader() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `ready` every second until it holds; TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for local rank 0 to write {what}")
        time.sleep(1.0)
