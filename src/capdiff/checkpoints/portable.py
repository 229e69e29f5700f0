"""Checkpoints that load anywhere: every capdiff checkpoint carries what it needs to be rebuilt, so a run folder
(or a single `.ckpt`) copied to another machine loads with no hub access and no `data/` caches.

A training checkpoint holds, besides Lightning's state:
- `capdiff_parts`: the config of every part (LLM, CLIP tower, UNet, VAE) and the tokenizer's files. The
  weights are in the state dict already, the tiny preset's derived tokenizer and first-stage autoencoder
  among them, so nothing is looked up by the paths the training machine used.
- `capdiff_run`: the training run's config (unresolved, so its paths resolve on the machine that reads it),
  its run folder and its W&B run, which `evaluate.py` follows.

`load_checkpoint` builds the model from those configs with empty weights and assigns the checkpoint's
memory-mapped tensors to it: no pretrained download, no random initialisation, no second copy in memory.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from capdiff.models.connectors import MLP_TARGET

log = logging.getLogger(__name__)

PARTS_KEY = "capdiff_parts"
RUN_KEY = "capdiff_run"
FORMAT = 1


def _diffusers_config(model: torch.nn.Module) -> dict:
    """A diffusers model's constructor arguments (without the bookkeeping keys: class, version, folder)."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="capdiff-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def write_files(files: dict[str, bytes], folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / Path(name).name).write_bytes(data)
    return folder


def describe_parts(model) -> dict[str, Any]:
    """What `load_checkpoint` rebuilds `model` (a `capdiff.joint.JointModel`) from, weights aside."""
    parts: dict[str, Any] = {
        "format": FORMAT,
        "tokenizer": tokenizer_files(model.llm.tokenizer),
        "llm": model.llm.lm.config.to_dict(),
    }
    if model.vision is not None:
        parts["vision"] = model.vision.tower.config.to_dict()
    if model.diffusion is not None:
        parts["unet"] = _diffusers_config(model.diffusion.unet)
        parts["vae"] = _diffusers_config(model.diffusion.vae)
    return parts


def describe_gan_parts(model) -> dict[str, Any]:
    """The same for a `capdiff.gan.TextGAN`: the parts of its text side (a joint model); the networks are
    built from the GAN's own config."""
    return {"format": FORMAT, "recipe": "text_gan", "text": describe_parts(model.text)}


TRAINING_KEYS = ("optim", "nonfinite")  # hyperparameters of the training, not of the model (nonfinite: before 0.2)
MODEL_PREFIX = "model."  # the plain model's weights in a training checkpoint's state dict


def model_config(hparams: dict) -> dict:
    """A checkpoint's `model` config less its training settings: what builds the `JointModel`. A checkpoint
    written before connectors were a choice has the MLP's width as `conditioner.hidden`: it becomes the MLP
    connector's own."""
    config = {k: copy.deepcopy(v) for k, v in dict(hparams).items() if k not in TRAINING_KEYS and k != "_target_"}
    conditioner = dict(config.get("conditioner") or {})
    if "hidden" in conditioner and "connector" not in conditioner:
        hidden = conditioner.pop("hidden")
        config["conditioner"] = conditioner | {"connector": {"_target_": MLP_TARGET, "hidden": hidden}}
    return config


def rebuilt_config(hparams: dict, parts: dict, tokenizer_folder: Path) -> dict:
    """The model config that builds every part from the checkpoint's configs and tokenizer."""
    config = model_config(hparams)
    write_files(parts["tokenizer"], tokenizer_folder)
    config["llm"] = dict(config["llm"]) | {
        "name_or_path": None,
        "config": parts["llm"],
        "tokenizer": str(tokenizer_folder),
    }
    if "vision" in parts:
        config["vision"] = dict(config.get("vision") or {}) | {"name_or_path": None, "config": parts["vision"]}
    if "unet" in parts:
        config["unet"] = dict(config["unet"]) | {"name_or_path": None, "config": parts["unet"]}
        config["vae"] = dict(config["vae"]) | {"name_or_path": None, "config": parts["vae"]}
    # Compiling is a training-speed setting; a loaded model compiles when asked to (Module.compile).
    config["speed"] = dict(config.get("speed") or {}) | {"compile": {}}
    return config


def upgrade_checkpoint(checkpoint: dict) -> dict:
    """An older checkpoint in today's layout, in place: from before the joint model was a module of its own
    (capdiff 0.1: the parts at the top of the state dict, `nonfinite` among the hyperparameters), and from
    before the contrastive logit scale was a one-element vector (a scalar then: its weight, EMA average and
    AdamW moments). The EMA's names never changed: they are the plain model's."""
    state = checkpoint.get("state_dict")
    if state and not any(k.startswith(MODEL_PREFIX) for k in state):
        checkpoint["state_dict"] = state = {MODEL_PREFIX + k: v for k, v in state.items()}
    hparams = checkpoint.get("hyper_parameters")
    if hparams is not None and "nonfinite" in hparams:
        checkpoint["hyper_parameters"] = {k: v for k, v in hparams.items() if k != "nonfinite"}
    ema = ema_state(checkpoint)
    for weights in (state or {}, ema["shadow"] if ema else {}):
        for name, value in weights.items():
            if name.endswith("logit_scale.log_scale") and value.ndim == 0:
                weights[name] = value.reshape(1)
    for optimizer in checkpoint.get("optimizer_states") or []:
        for moments in optimizer.get("state", {}).values():  # a scalar's moments were the only scalar ones
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in moments and moments[key].ndim == 0:
                    moments[key] = moments[key].reshape(1)
    return checkpoint


def model_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The plain model's weights of a (possibly old) training checkpoint, by the model's own names."""
    state = upgrade_checkpoint(checkpoint)["state_dict"]
    return {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def ema_state(checkpoint: dict) -> dict | None:
    """The EMA callback's state in a loaded checkpoint (`shadow`, `updates`, `decay`); None if it has none."""
    return next((v for k, v in (checkpoint.get("callbacks") or {}).items() if k.startswith("EMA")), None)


def ema_shadow(checkpoint: dict) -> dict[str, torch.Tensor] | None:
    """The EMA callback's averaged weights in a loaded checkpoint, by parameter name; None if it has none."""
    state = ema_state(checkpoint)
    return dict(state["shadow"]) if state else None


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A checkpoint `trainer=fsdp` wrote with `state_dict_type: sharded`: a folder of each rank's shards and the
    rest of the checkpoint in `meta.pt`."""
    return Path(path).is_dir() and (Path(path) / "meta.pt").is_file()


def read_sharded_checkpoint(path: Path) -> dict:
    """A sharded checkpoint consolidated in memory into the layout of a one-file one (Lightning's own
    consolidation, `python -m lightning.pytorch.utilities.consolidate_checkpoint`, without the file)."""
    from lightning_fabric.utilities.load import _load_distributed_checkpoint
    from pytorch_lightning.utilities.consolidate_checkpoint import _format_checkpoint

    return _format_checkpoint(_load_distributed_checkpoint(path))


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file; pass a .ckpt written by train.py.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError) as err:  # torch's "not a zip file", a truncated copy
        raise ValueError(
            f"{path} is not a readable checkpoint ({str(err).splitlines()[0]}): pass a .ckpt written by train.py; "
            "a copy still in progress or cut short reads like this."
        ) from err


def load_checkpoint(path: str | Path, ema: bool = True, checkpoint: dict | None = None):
    """The plain model of a training checkpoint (a `JointModel`, or a `TextGAN` for `experiment=text_gan`);
    with `ema`, the EMA callback's averaged weights instead of the live ones when the checkpoint has them.
    Returns (model, EMA used).

    The file is memory-mapped and its tensors become the model's own: only the weights are read, never the
    optimizer state beside them (two thirds of an SD-1.5-sized training checkpoint)."""
    from accelerate import init_empty_weights

    from capdiff.gan.model import TextGAN
    from capdiff.joint.model import JointModel

    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    state = model_state(checkpoint)
    shadow = ema_shadow(checkpoint) if ema else None
    state |= shadow or {}
    parts = checkpoint.get(PARTS_KEY)
    hparams = checkpoint["hyper_parameters"]
    if parts is None:  # written before checkpoints carried their parts: built by the paths it names
        log.warning("%s carries no part configs: its parts load from the paths its hyperparameters name", path)
        model = JointModel.from_config(model_config(hparams))
        model.load_state_dict(state)
        return model.eval(), shadow is not None
    gan = parts.get("recipe") == "text_gan"
    joint_parts = parts["text"] if gan else parts
    with tempfile.TemporaryDirectory(prefix="capdiff-tokenizer-") as folder:
        if gan:
            config = model_config(hparams) | {"text": rebuilt_config(hparams["text"], joint_parts, Path(folder))}
        else:
            config = rebuilt_config(hparams, joint_parts, Path(folder))
        with init_empty_weights(include_buffers=False):
            model = (TextGAN if gan else JointModel).from_config(config)
    model.load_state_dict(state, assign=True)
    joint = model.text if gan else model
    if "unet" in joint_parts:  # a pretrained UNet's own default size, which building from config set to the latent size
        joint.diffusion.unet.register_to_config(sample_size=joint_parts["unet"]["sample_size"])
    if getattr(joint.llm.lm.config, "tie_word_embeddings", False):
        joint.llm.lm.tie_weights()  # assign gave the tied input and output embeddings a Parameter each
    return model.eval(), shadow is not None


def read_run(checkpoint: dict) -> dict | None:
    """The training run a checkpoint came from: `{"config", "output_dir", "wandb"}` (None before capdiff kept it)."""
    return checkpoint.get(RUN_KEY)


class RunRecord(pl.Callback):
    """Writes the run's config, folder and W&B identity into every checkpoint (`capdiff_run`)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = OmegaConf.to_container(cfg, resolve=False)
        self.output_dir = str(cfg.paths.output_dir)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        from capdiff.loggers import wandb_identity

        checkpoint[RUN_KEY] = {
            "config": self.config,
            "output_dir": self.output_dir,
            "wandb": wandb_identity(trainer.loggers),
        }


def write_autoencoder(checkpoint: dict, config: dict, folder: Path) -> Path:
    """The checkpoint's VAE as a diffusers folder (its weights from the state dict)."""
    from diffusers import AutoencoderKL

    prefix = "diffusion.vae."
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict({k[len(prefix) :]: v for k, v in model_state(checkpoint).items() if k.startswith(prefix)})
    vae.save_pretrained(folder)
    return folder
