"""The contrastive loss on 2 CPU processes (gloo), gathered by Lightning's collective as training gathers it,
equals the single-process loss over the concatenated batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_lightning import LightningModule
from pytorch_lightning.strategies import DDPStrategy

from capdiff.distributed import gather_rows
from capdiff.models.contrastive import contrastive_loss

BATCH, DIM, WORLD = 8, 5, 2


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, DIM, generator=generator), torch.randn(BATCH, DIM, generator=generator)


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        image, text = full_batch()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        image = image[rows].clone().requires_grad_(True)
        text = text[rows].clone().requires_grad_(True)
        scale = torch.tensor(7.0, requires_grad=True)
        module = LightningModule()
        # what a DDP trainer gives the module: its strategy's all_gather, its rank and world size
        module._trainer = SimpleNamespace(strategy=DDPStrategy(), world_size=WORLD, global_rank=rank)
        loss = contrastive_loss(image, text, scale, gather=gather_rows(module))
        loss.backward()
        torch.save(
            {"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_over_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    image, text = (t.clone().requires_grad_(True) for t in full_batch())
    scale = torch.tensor(7.0, requires_grad=True)
    single = contrastive_loss(image, text, scale)
    single.backward()

    # local loss: each rank's rows against all columns; their mean (what DDP's gradient averaging optimizes)
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    torch.testing.assert_close(mean_loss, single.detach())
    # gather-with-grad sends every rank's contribution back to the rows' owner: DDP's 1/N averaging of
    # parameter gradients then gives exactly the single-process gradient
    image_grad = torch.cat([r["image"] for r in ranks]) / WORLD
    text_grad = torch.cat([r["text"] for r in ranks]) / WORLD
    torch.testing.assert_close(image_grad, image.grad)
    torch.testing.assert_close(text_grad, text.grad)
    torch.testing.assert_close(sum(r["scale"] for r in ranks) / WORLD, scale.grad)
