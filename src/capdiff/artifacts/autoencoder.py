"""The first stage of latent diffusion for the tiny preset: a small AutoencoderKL trained on the run's own data.

LDM (Rombach et al., 2022) trains its autoencoder with a perceptual and an adversarial loss; on the flat
colours of the shapes data an L1 + MSE reconstruction loss with a light KL term reconstructs well in about a
minute of CPU time, which is what the tiny preset is for. The result is saved in diffusers format with the
scaling factor measured on the data (1 / std of the latents, as LDM does), so it loads like any VAE.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from pytorch_lightning.callbacks import RichProgressBar
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from capdiff.data.transforms import as_unit
from capdiff.distributed import partial_path

log = logging.getLogger(__name__)


class AutoencoderModule(pl.LightningModule):
    def __init__(
        self, config: dict, lr: float = 1e-3, kl_weight: float = 1e-4, warmup_steps: int = 50, total_steps: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vae = AutoencoderKL(**config)
        self.lr = lr
        self.kl_weight = kl_weight
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps  # > 0: cosine decay to 0 at that step (sharper edges than a constant lr)

    def losses(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample()
        reconstruction = self.vae.decode(latents).sample
        rec = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels)
        kl = posterior.kl().mean() / latents[0].numel()
        return {"rec_loss": rec, "kl_loss": kl, "loss": rec + self.kl_weight * kl}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.losses(as_unit(batch["pixels"]))
        for name, value in out.items():
            self.log(f"autoencoder/{name}", value, prog_bar=name == "rec_loss", batch_size=batch["pixels"].shape[0])
        return out["loss"]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)
        if self.total_steps:
            schedule = get_cosine_schedule_with_warmup(optimizer, self.warmup_steps, self.total_steps)
        else:
            schedule = get_constant_schedule_with_warmup(optimizer, self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def measure_scaling_factor(self, loader, batches: int = 8) -> float:
        latents = []
        for i, batch in enumerate(loader):
            if i == batches:
                break
            latents.append(self.vae.encode(as_unit(batch["pixels"].to(self.device))).latent_dist.sample())
        return float(1.0 / torch.cat(latents).flatten().std())


@torch.no_grad()
def held_out_loss(module: AutoencoderModule, loader, batches: int = 16) -> float:
    """The reconstruction loss over up to `batches` held-out batches (one batch is too few to tell a first stage
    that lost the small objects' colour from one that did not)."""
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i == batches:
            break
        pixels = as_unit(batch["pixels"].to(module.device))
        total += float(module.losses(pixels)["rec_loss"]) * pixels.shape[0]
        count += pixels.shape[0]
    return total / max(1, count)


def train_autoencoder(
    datamodule,
    folder: Path,
    config: dict,
    max_steps: int,
    lr: float,
    kl_weight: float,
    accelerator: str = "cpu",
    seed: int = 0,
) -> Path:
    """Train, measure the scaling factor, save in diffusers format at `folder` (written whole, then renamed).

    Seeded on its own (`seed`), without touching the caller's random state: the cached first stage is the same
    whatever ran before it in the process (a session's tests, the run's seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train(datamodule, folder, config, max_steps, lr, kl_weight, accelerator)


def _train(datamodule, folder: Path, config: dict, max_steps: int, lr: float, kl_weight: float, accelerator: str):
    module = AutoencoderModule(config, lr=lr, kl_weight=kl_weight, total_steps=max_steps)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[RichProgressBar()],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    log.info("training the first-stage autoencoder for %d steps → %s", max_steps, folder)
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    module.eval()
    held_out = datamodule.val_dataloader() if datamodule.val_urls else datamodule.train_dataloader()
    scaling = module.measure_scaling_factor(held_out)
    module.vae.register_to_config(scaling_factor=scaling)
    partial = partial_path(folder)
    shutil.rmtree(partial, ignore_errors=True)
    module.vae.save_pretrained(partial)
    report = {"steps": max_steps, "scaling_factor": scaling, "val_rec_loss": held_out_loss(module, held_out)}
    (partial / "capdiff_first_stage.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(folder)
    log.info("autoencoder saved: %s", report)
    return folder
