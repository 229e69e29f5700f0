"""FSDP for models whose LLM (or UNet) does not fit with DDP: Lightning's FSDPStrategy, configured by name.

Each transformer block of the LLM, each transformer block and ResNet block of the UNet and each CLIP encoder
layer becomes its own FSDP unit, so no rank ever holds more than one unit's full weights at a time.
`use_orig_params=True` lets frozen parts (the VAE, a frozen LLM under LoRA) share units with trained ones
and keeps parameter names, which the per-part optimizer groups and the EMA callback rely on.
"""

from __future__ import annotations

import importlib

import torch
from pytorch_lightning.strategies import FSDPStrategy

DEFAULT_WRAP = (
    "transformers.models.gpt2.modeling_gpt2.GPT2Block",
    "transformers.models.clip.modeling_clip.CLIPEncoderLayer",
    "diffusers.models.attention.BasicTransformerBlock",
    "diffusers.models.resnet.ResnetBlock2D",
)


def import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"trainer.strategy.wrap: {path!r} is not an importable class; give full paths such as "
            f"{DEFAULT_WRAP[0]!r} (the block class of your LLM)."
        ) from err


def fsdp_options(
    wrap: list[str] | None = None,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "sharded",
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
    **kwargs,
) -> dict:
    """The keyword arguments `fsdp` gives Lightning's FSDPStrategy."""
    blocks = {import_class(p) for p in (wrap or DEFAULT_WRAP)}
    return dict(
        auto_wrap_policy=blocks,
        activation_checkpointing_policy=blocks if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        use_orig_params=True,
        process_group_backend="nccl" if torch.cuda.is_available() else "gloo",
        **kwargs,
    )


def fsdp(**options) -> FSDPStrategy:
    """`trainer=fsdp`: FSDP with the given block classes as units; `state_dict_type: sharded` writes one
    folder of shards per checkpoint (fast, resumable on the same world size), `full` one consolidated file.
    The options are `fsdp_options`'s."""
    return FSDPStrategy(**fsdp_options(**options))
