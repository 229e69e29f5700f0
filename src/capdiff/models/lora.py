"""LoRA adapters (Hu et al., 2021) through peft, injected in place so the model keeps its own class."""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str], key: str) -> None:
    """Add LoRA to `target_modules` and freeze every other weight of `model`."""
    names = [name for name, _ in model.named_modules() if name]
    unknown = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise ValueError(f"{key}.target_modules: {unknown} match no module; this model has e.g. {leaves[:15]}.")
    # GPT-2 style Conv1D layers store their weight transposed; peft must be told.
    conv1d = any(
        isinstance(m, Conv1D) and any(n == t or n.endswith(f".{t}") for t in target_modules)
        for n, m in model.named_modules()
    )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), fan_in_fan_out=conv1d
    )
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
