"""Distributed helpers: which process writes a shared file and how the others wait for it, per-rank random
streams, the gather with gradient behind the contrastive loss, the gather of evaluation records, and the
names of wrapped parameters.

Lightning's DDP launcher, torchrun and Slurm start the whole script once per rank, so anything written to disk
before training (shapes shards, tokenizer, first-stage autoencoder, the shapes probe) is written by one
process of the whole job, global rank 0, and every other rank, on every node, waits for it. The data folder
(`paths.data_dir`) is then one that every node sees, as on a cluster's shared filesystem.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the shard tools import this module and start without torch and Lightning
    import pytorch_lightning as pl
    import torch

# Where each launcher puts the global rank before any process group exists: torchrun / Lightning's own
# launcher, Slurm (srun), LSF (jsrun).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_global_leader() -> bool:
    """Whether this process is global rank 0, from the launcher's environment (true when there is none).

    The processes Lightning's launcher starts inherit the parent's variables (SLURM_PROCID=0 in an interactive
    allocation) and get a LOCAL_RANK ≥ 1 and the node's NODE_RANK, so those count too."""
    ranks = [int(os.environ[n]) for n in RANK_VARIABLES if os.environ.get(n, "").isdigit()]
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", "0") or 0)
    return (not ranks or ranks[0] == 0) and local == 0 and node == 0


def host_tag() -> str:
    """This host's name without dots (a cluster's hosts are often fully qualified), for file names."""
    return socket.gethostname().replace(".", "-")


def partial_path(path: Path) -> Path:
    """A temporary name next to `path`, unique to this host and process: two writers never share one."""
    return path.with_name(f".{path.name}.{host_tag()}.{os.getpid()}.partial")


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `ready` every second until it holds; TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for global rank 0 to write {what}. Every node must see the same "
                "paths.data_dir (a shared filesystem); on node-local disks, build it once before the job (run the "
                "same command on one process) and copy it to every node."
            )
        time.sleep(1.0)


def seed_for_rank(rank: int, offset: int = 0) -> int:
    """Seed Python, NumPy and torch (every device) with the run's seed + `offset` + `rank` (open_clip's
    `random_seed(seed, rank)`): each rank its own reproducible stream. Returns the seed."""
    import numpy as np
    import torch  # here, not at the top: the shard tools import this module and start without torch

    seed = int(os.environ.get("PL_GLOBAL_SEED", "0") or 0) + offset + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def gather_rows(module: pl.LightningModule) -> Callable[[torch.Tensor], tuple[torch.Tensor, int]]:
    """A gather for `capdiff.models.contrastive.contrastive_loss`: every rank's rows, concatenated in rank order,
    with gradients flowing back to each row's own rank (`LightningModule.all_gather(sync_grads=True)`), and
    the offset of this rank's rows in them."""

    def gather(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        if module._trainer is None or module.trainer.world_size == 1:
            return rows, 0
        stacked = module.all_gather(rows, sync_grads=True)  # world × rows × ...
        return stacked.flatten(0, 1), module.global_rank * rows.shape[0]

    return gather


def gather_lists(items: list) -> list:
    """Every rank's list (of picklable records), concatenated in rank order, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def unwrapped_name(name: str) -> str:
    """A parameter's name without the segments FSDP and activation checkpointing insert when they wrap."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name
