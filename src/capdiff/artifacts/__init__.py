"""What a run derives from its own data, cached under `paths.data_dir`: the tiny preset's tokenizer and its
first-stage autoencoder (before the model is built: its vocabulary and latent shape depend on them), and the
VAE latents of the shards (`data.latents`). Each is keyed by the data and the settings that made it, built
once, and reused by later runs. The tokenizer and autoencoder are built by global rank 0 while every other
rank of a DDP run waits (Lightning's `prepare_data` runs inside `fit`, after the model they shape is built);
the latent cache is encoded by all ranks together when fit starts.

The functions return what they built; the config stays as the user gave it (`DerivedParts.overrides`)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import webdataset as wds
from omegaconf import DictConfig, OmegaConf

from capdiff.artifacts.autoencoder import train_autoencoder
from capdiff.data import ImageTextDataModule
from capdiff.data.cache_latents import cache_latents, check_cache, is_complete, read_manifest, vae_fingerprint
from capdiff.data.decode import BadSample, CaptionKey, decode_captions
from capdiff.distributed import is_global_leader, wait_until
from capdiff.models.tokenizer import build_byte_bpe

log = logging.getLogger(__name__)


@dataclass
class DerivedParts:
    """Where the derived tokenizer and first-stage autoencoder are (None: the model names its own)."""

    tokenizer: str | None = None  # for model.llm.tokenizer
    autoencoder: str | None = None  # for model.vae.name_or_path
    key: str | None = None  # where the joint model config is in `model` (`text` for the GAN; None: `model` itself)

    def overrides(self) -> dict[str, Any]:
        """The `model` config keys these fill in."""
        out: dict[str, Any] = {}
        if self.tokenizer:
            out["llm"] = {"tokenizer": self.tokenizer}
        if self.autoencoder:
            out["vae"] = {"name_or_path": self.autoencoder}
        return {self.key: out} if self.key and out else out


def joint_config(model: DictConfig) -> tuple[DictConfig, str | None]:
    """The joint model config inside a recipe's `model` config and its key: the recipe's LightningModule
    names it (`text_key`, the GAN's text side); the joint recipe's is `model` itself."""
    import hydra

    key = getattr(hydra.utils.get_class(model._target_), "text_key", None) if model.get("_target_") else None
    return (model[key], key) if key else (model, None)


def derives_tokenizer(model: Mapping) -> bool:
    """`model.llm.tokenizer: null` with no pretrained LLM: the tokenizer is built on the training captions."""
    llm = model.get("llm") or {}
    return not (llm.get("tokenizer") or llm.get("name_or_path"))


def derives_autoencoder(model: Mapping) -> bool:
    """A diffusion model with `model.vae.name_or_path: null`: the first stage is trained on the data."""
    weights = (model.get("loss") or {}).get("weights") or {}
    return bool(weights.get("diffusion")) and not (model.get("vae") or {}).get("name_or_path")


def derive_parts(cfg: DictConfig, datamodule: ImageTextDataModule, given: DerivedParts | None = None) -> DerivedParts:
    """The tokenizer and first-stage autoencoder the model config leaves to the data, built or found in the
    cache (`given` ones, e.g. restored from a checkpoint, are kept)."""
    given = given or DerivedParts()
    joint, key = joint_config(cfg.model)
    tokenizer = given.tokenizer or (str(prepare_tokenizer(cfg, datamodule)) if derives_tokenizer(joint) else None)
    autoencoder = given.autoencoder
    if autoencoder is None and derives_autoencoder(joint):
        autoencoder = str(prepare_autoencoder(cfg, datamodule))
    return DerivedParts(tokenizer, autoencoder, key)


def cache_folder(
    root: str | Path, kind: str, datamodule: ImageTextDataModule, settings: dict, urls: list[str] | None = None
) -> Path:
    """`root/kind/<folder>-<digest>`, the digest of what the cached thing is built from: the training shards
    (`urls` when it is built from those alone), their caption keys and `settings`."""
    identity = {"urls": urls or datamodule.train_urls, "caption_key": datamodule.caption_key.spec, "settings": settings}
    written = getattr(datamodule, "written_as", None)
    if written is not None:  # data written by the run itself (the shapes): the same paths can hold other data
        identity["written_as"] = written
    if urls is None and (
        len(datamodule.sources) > 1 or any(s.caption_key != datamodule.caption_key for s in datamodule.sources)
    ):
        # a mixture: its weights and each source's caption key decide what the tokenizer is built on
        identity["sources"] = [(s.name, s.weight, s.caption_key.spec) for s in datamodule.sources]
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = Path((urls or datamodule.train_urls)[0]).parent.name or "data"
    return Path(root) / kind / f"{name}-{digest}"


def training_captions(datamodule: ImageTextDataModule, limit: int) -> Iterator[str]:
    """The captions of up to `limit` training samples, each source's with its own caption key; a mixture gives
    each source its weight's share of the samples (and a source that runs out leaves its share unused)."""
    total = sum(s.weight for s in datamodule.sources)
    for source in datamodule.sources:
        share = max(1, round(limit * source.weight / total))
        samples = wds.tarfile_samples([{"url": u} for u in source.urls], handler=wds.warn_and_continue)
        for sample in islice(_decodable(samples, source.caption_key), share):
            yield from sample


def _decodable(samples: Iterable[dict], caption_key: CaptionKey) -> Iterator[list[str]]:
    for sample in samples:
        try:
            yield decode_captions(sample, caption_key)
        except BadSample:
            continue


def prepare_tokenizer(cfg: DictConfig, datamodule: ImageTextDataModule) -> Path:
    """A byte-level BPE built on the training captions (`model.llm.build_tokenizer`); returns its folder."""
    spec = OmegaConf.to_container(joint_config(cfg.model)[0].llm.get("build_tokenizer") or {}, resolve=True)
    settings = {"vocab_size": int(spec.get("vocab_size", 512)), "captions": int(spec.get("captions", 20000))}
    folder = cache_folder(cfg.paths.data_dir, "tokenizers", datamodule, settings)
    if not folder.is_dir():
        if is_global_leader():
            build_byte_bpe(training_captions(datamodule, settings["captions"]), folder, settings["vocab_size"])
        else:
            wait_until(folder.is_dir, 3600, f"the tokenizer in {folder}")
    return folder


def prepare_autoencoder(cfg: DictConfig, datamodule: ImageTextDataModule, force: bool = False) -> Path:
    """The first stage trained on the training data (`model.vae.first_stage`, once unless `force`); returns its
    folder."""
    vae = joint_config(cfg.model)[0].get("vae") or {}
    stage = OmegaConf.to_container(vae.get("first_stage") or {}, resolve=True)
    if not stage:
        raise ValueError("model.vae.name_or_path is null and model.vae.first_stage is not set: give one of them.")
    settings = {"image_size": datamodule.image_size} | stage
    folder = cache_folder(cfg.paths.data_dir, "autoencoders", datamodule, settings)
    if force or not (folder / "config.json").is_file():
        if is_global_leader():
            train_autoencoder(
                datamodule,
                folder,
                config=stage["config"],
                max_steps=int(stage.get("max_steps", 600)),
                lr=float(stage.get("lr", 1e-3)),
                kl_weight=float(stage.get("kl_weight", 1e-4)),
                accelerator=cfg.trainer.get("accelerator", "cpu"),
            )
        else:
            wait_until((folder / "config.json").is_file, 3600, f"the first-stage autoencoder in {folder}")
    else:
        log.info("reusing the first-stage autoencoder in %s", folder)
    return folder


class LatentCache(pl.Callback):
    """`data.latents=true`: the run's shards encoded once with its VAE, by the training processes themselves.

    When fit starts (every rank's device and rank known), global rank r of N encodes shards r, r + N, ... on
    its own device, and every rank waits until all are cached, then reads the cached copies. A finished cache
    (the same data, image size and VAE) is reused as it is."""

    def __init__(self, urls: list[str], folder: Path, vae_name: str, caption_key: str, fingerprint: str) -> None:
        self.urls = urls
        self.folder = folder
        self.vae_name = vae_name
        self.caption_key = caption_key
        self.fingerprint = fingerprint

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.encode(trainer.datamodule, pl_module.model.diffusion.vae, trainer.global_rank, trainer.world_size,
                        trainer.strategy.root_device)  # fmt: skip

    def encode(self, datamodule: ImageTextDataModule, vae, rank: int, world_size: int, device) -> None:
        """Encode this rank's share (unless cached), wait for the others', point `datamodule` at the cache."""
        if not is_complete(self.urls, self.folder):
            log.info("caching VAE latents of %d shards in %s (rank %d of %d)", len(self.urls), self.folder, rank,
                     world_size)  # fmt: skip
            cache_latents(self.urls, self.folder, vae.to(device), self.vae_name, datamodule.image_size,
                          self.caption_key, rank=rank, world_size=world_size, fingerprint=self.fingerprint)  # fmt: skip
            wait_until(lambda: is_complete(self.urls, self.folder), 24 * 3600, f"the cached latents in {self.folder}")
        else:
            log.info("reusing the cached latents in %s", self.folder)
        datamodule.use_cached_shards(self.folder)
        check_cache(datamodule.train_urls, "data.latents_dir", datamodule.image_size, self.fingerprint)


def prepare_latents(cfg: DictConfig, datamodule: ImageTextDataModule, vae, vae_name: str) -> LatentCache | None:
    """`data.latents=true`: where the run's latents are cached (per data and VAE, or `data.latents_dir`), as a
    callback that encodes them when fit starts; None when `data.train_urls` already are cached shards."""
    fingerprint = vae_fingerprint(vae)
    if read_manifest(datamodule.train_urls) is not None:  # data.train_urls are cached shards already
        datamodule.use_cached_shards(None)
        check_cache(datamodule.train_urls, "data.train_urls", datamodule.image_size, fingerprint)
        return None
    folder = cfg.data.get("latents_dir")
    if not folder:
        settings = {"vae": fingerprint, "image_size": datamodule.image_size, "val": datamodule.val_urls}
        folder = cache_folder(cfg.paths.data_dir, "latents", datamodule, settings)
    urls = datamodule.train_urls + datamodule.val_urls
    return LatentCache(urls, Path(folder), vae_name, datamodule.caption_key.spec, fingerprint)
