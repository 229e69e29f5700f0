"""The joint model's config (`model.*`), typed: every key a dataclass field with its default and type.

`parse` checks a plain dict (a Hydra `model` node, a checkpoint's hyperparameters) against these classes
through OmegaConf's structured configs, so a misspelt key (`model.loss.weights.captions`) or a value of the
wrong type fails before anything is built, with the key and the valid ones named, instead of silently
becoming a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from capdiff.models.connectors import MLP_TARGET

T = TypeVar("T")


@dataclass
class Lora:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)


@dataclass
class TokenizerBuild:
    """A byte-level BPE trained on the run's captions (`model.llm.tokenizer: null`, no pretrained LLM)."""

    vocab_size: int = 512
    captions: int = 20000


@dataclass
class LLM:
    name_or_path: str | None = None  # hub id or folder; null builds `config` from scratch
    tokenizer: str | None = None  # null: the pretrained LLM's own, or one built on the data
    build_tokenizer: TokenizerBuild = field(default_factory=TokenizerBuild)
    config: dict[str, Any] | None = None  # transformers config of a from-scratch LLM
    prompt: str = ""
    max_tokens: int = 48
    freeze: bool = False
    gradient_checkpointing: bool = False
    lora: Lora = field(default_factory=Lora)


@dataclass
class Resampler:
    num_queries: int = 8
    width: int = 256
    layers: int = 2
    heads: int = 4
    grid: int = 4
    layout_tokens: int = 1


@dataclass
class Vision:
    name_or_path: str | None = None
    config: dict[str, Any] | None = None  # transformers CLIPVisionConfig of a from-scratch tower
    freeze: bool = False
    gradient_checkpointing: bool = False
    lora: Lora = field(default_factory=Lora)
    resampler: Resampler = field(default_factory=Resampler)


def _mlp_connector() -> dict[str, Any]:
    return {"_target_": MLP_TARGET}


@dataclass
class Conditioner:
    # `_target_` (a `capdiff.models.connectors.Connector`) and its arguments (conf/model/conditioner/connector/);
    # a config without one was written before connectors were a choice, with the MLP
    connector: dict[str, Any] = field(default_factory=_mlp_connector)
    width: int = 512  # what the connector configs read as their width (the constructor's own default without one)
    pool: str = "last"
    diffusion_grad: bool = True
    lexical: bool = False  # a learned table of token ids added to the condition (configs before it: without)
    in_dim: int | None = None  # checked against the LLM's width; null follows it
    out_dim: int | None = None  # checked against the UNet's cross_attention_dim; null follows it


@dataclass
class UNet:
    name_or_path: str | None = None
    config: dict[str, Any] | None = None  # diffusers UNet2DConditionModel arguments of a from-scratch UNet
    freeze: bool = False
    gradient_checkpointing: bool = False
    lora: Lora = field(default_factory=Lora)


@dataclass
class VAE:
    name_or_path: str | None = None
    config: dict[str, Any] | None = None  # a checkpoint's own VAE, rebuilt from its config
    first_stage: dict[str, Any] | None = None  # the tiny preset's autoencoder trained on the data


@dataclass
class Diffusion:
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    min_snr_gamma: float = 5.0
    zero_terminal_snr: bool = False
    weighting: str = "min_snr"


@dataclass
class Contrastive:
    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0


@dataclass
class Weights:
    diffusion: float = 0.0
    caption: float = 0.0
    contrastive: float = 0.0


@dataclass
class Loss:
    weights: Weights = field(default_factory=Weights)


@dataclass
class Compile:
    """`torch.compile` of the UNet and/or the LLM; any other key is passed to it (`mode`, `dynamic`, ...)."""

    unet: bool = False
    llm: bool = False
    mode: str | None = None
    dynamic: bool | None = None
    fullgraph: bool = False
    backend: str | None = None
    options: dict[str, Any] | None = None


@dataclass
class Speed:
    channels_last: Any = "auto"  # true, false or auto (on GPUs)
    compile: Compile = field(default_factory=Compile)


@dataclass
class JointSpec:
    """What builds a `capdiff.joint.JointModel` (the `model` config group, less the training settings)."""

    llm: LLM = field(default_factory=LLM)
    vision: Vision = field(default_factory=Vision)
    conditioner: Conditioner = field(default_factory=Conditioner)
    unet: UNet = field(default_factory=UNet)
    vae: VAE = field(default_factory=VAE)
    diffusion: Diffusion = field(default_factory=Diffusion)
    contrastive: Contrastive = field(default_factory=Contrastive)
    loss: Loss = field(default_factory=Loss)
    image_size: int = 32
    caption_dropout: float = 0.1
    speed: Speed = field(default_factory=Speed)


@dataclass
class GroupOptim:
    lr_scale: float = 1.0  # the part's lr is model.optim.lr × this, so a sweep of model.optim.lr moves every part
    lr: float | None = None  # an absolute lr instead, which no longer follows model.optim.lr
    weight_decay: float | None = None


@dataclass
class Optim:
    """AdamW and its warm-up + cosine schedule; `groups.<part>` scales (or sets) lr and sets weight decay per
    part."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    fused: Any = "auto"  # auto, true or false
    groups: dict[str, GroupOptim] = field(default_factory=dict)


def parse(cls: type[T], values: Any, key: str) -> T:
    """`values` (a dict or DictConfig, None for all defaults) as a `cls`, every nested key checked; `key` is
    where the values come from (`model`), for the error."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), values or {})
    except (ConfigKeyError, ValidationError) as err:
        raise ValueError(_explain(cls, err, key)) from None
    return OmegaConf.to_object(merged)


def _explain(cls: type, err: Exception, key: str) -> str:
    path = str(getattr(err, "full_key", "") or "")
    parts = [p for p in path.split(".") if p]
    node: Any = cls
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            break
        node = _field_class(fields[part])
    full = ".".join([key, *parts])
    if isinstance(err, ConfigKeyError) and dataclasses.is_dataclass(node):
        valid = ", ".join(f.name for f in dataclasses.fields(node))
        return f"{full} is not a key of {'.'.join([key, *parts[:-1]])}: the valid ones are {valid}."
    return f"{full}: {str(err).splitlines()[0]}"


def _field_class(f: dataclasses.Field) -> Any:
    factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    return type(factory()) if factory is not None else None


def as_dict(spec: Any) -> dict[str, Any]:
    """A spec as the plain dict `parse` reads back (checkpoint hyperparameters, export files)."""
    return dataclasses.asdict(spec)
