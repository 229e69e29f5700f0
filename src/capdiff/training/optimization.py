"""What the optimizer sees and how it steps: the freezing policy, the per-part parameter groups, AdamW with its
warm-up + cosine schedule, and gradient clipping on every strategy and precision capdiff runs."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.enums import GradClipAlgorithmType
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from capdiff.distributed import unwrapped_name
from capdiff.joint.model import JointModel
from capdiff.joint.spec import Optim
from capdiff.models.lora import freeze

GROUPS = ("llm", "vision", "heads", "unet")


def apply_freezing(model: JointModel) -> None:
    """`model.<part>.freeze`, and every parameter that no active loss term reaches: both stay out of the
    optimizer and out of DDP's gradient sync (an unused trainable parameter makes DDP's sync fail)."""
    spec, weights = model.spec, model.weights
    if spec.llm.freeze and not spec.llm.lora.enabled:
        freeze(model.llm.lm)
    if model.vision is not None and spec.vision.freeze and not spec.vision.lora.enabled:
        freeze(model.vision.tower)
    if model.diffusion is not None and spec.unet.freeze and not spec.unet.lora.enabled:
        freeze(model.diffusion.unet)
    if model.vision is not None and not weights["caption"]:
        freeze(model.vision.to_prefix)
    if model.vision is not None and not weights["contrastive"]:
        freeze(model.vision.to_embed)
    if model.conditioner is not None and not weights["contrastive"]:
        freeze(model.conditioner.to_embed)
    if model.conditioner is not None and not weights["diffusion"]:
        freeze(model.conditioner.connector)
        if model.conditioner.lexical is not None:
            freeze(model.conditioner.lexical)
    llm_grad = model.conditioner is not None and model.conditioner.diffusion_grad and weights["diffusion"]
    if not (weights["caption"] or weights["contrastive"] or llm_grad):
        freeze(model.llm.lm)  # only read: the UNet's condition does not train it (model.conditioner.diffusion_grad)
    if not weights["caption"]:
        head = model.llm.lm.get_output_embeddings()
        if head is not None and head.weight is not model.llm.lm.get_input_embeddings().weight:
            freeze(head)


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by part: `llm`, `vision` (tower + resampler), `heads`, `unet`."""
    groups: dict[str, list] = {name: [] for name in GROUPS}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("llm."):
            groups["llm"].append((name, param))
        elif name.startswith(("vision.tower.", "vision.resampler.")):
            groups["vision"].append((name, param))
        elif name.startswith("diffusion.unet."):
            groups["unet"].append((name, param))
        else:
            groups["heads"].append((name, param))
    return {k: v for k, v in groups.items() if v}


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trained parameter by name: what the EMA averages. Sampling reads the LLM (the text pass), the
    connector and the UNet, captioning the vision side and the LLM: averaging them all keeps the two
    directions of one checkpoint consistent."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def group_lr(optim: Optim, part: str) -> float:
    """A part's learning rate: `model.optim.lr` × `model.optim.groups.<part>.lr_scale`, or the group's own
    absolute `lr` where one is set (configs and checkpoints written before lr_scale set them that way)."""
    own = optim.groups.get(part)
    if own is None:
        return optim.lr
    return own.lr if own.lr is not None else optim.lr * own.lr_scale


def build_optimizer(
    model: nn.Module, optim: Optim, trainer: pl.Trainer | None, ndims: dict[str, int] | None = None
) -> dict:
    """AdamW over the part groups (`model.optim.groups.<part>` scales lr and sets weight decay; biases and
    norms without decay), and the schedule: a linear warm-up, then a cosine decay to `min_lr_ratio` of each
    group's lr at the run's last optimizer step. Lightning's `configure_optimizers` return value.

    `ndims`: each parameter's number of dimensions by name, read before a strategy that flattens parameters
    (FSDP) wrapped the model; it tells matrices (decayed) from biases and norms. Without it, the parameters'
    own shapes."""

    def decayed(name: str, param: nn.Parameter) -> bool:
        return (ndims or {}).get(unwrapped_name(name), param.ndim) >= 2

    unknown = sorted(set(optim.groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"model.optim.groups: {unknown} are not parts; the parts are {', '.join(GROUPS)}.")
    groups = []
    for part, named in param_groups(model).items():
        own = optim.groups.get(part)
        lr = group_lr(optim, part)
        decay = own.weight_decay if own is not None and own.weight_decay is not None else optim.weight_decay
        groups.append({"params": [p for n, p in named if decayed(n, p)], "name": part, "lr": lr, "weight_decay": decay})
        no_decay = [p for n, p in named if not decayed(n, p)]
        if no_decay:
            groups.append({"params": no_decay, "name": f"{part}_no_decay", "lr": lr, "weight_decay": 0.0})
    # Fused AdamW: one kernel for all parameters, where torch picks a per-parameter loop on CPU (bench/step.py,
    # docs/benchmarks.md). Not under 16-mixed: its loss scaler would hand the fused kernel scaled gradients
    # that clipping cannot see unscaled.
    device = next(model.parameters()).device
    scaled = trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None
    fused = optim.fused
    fused = device.type in ("cuda", "cpu") and not scaled if fused in (None, "auto") else bool(fused)
    optimizer = torch.optim.AdamW(groups, betas=tuple(optim.betas), fused=fused)

    def total() -> int:
        return max(1, int(trainer.estimated_stepping_batches)) if trainer is not None else 1

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(optim.warmup_steps, total, optim.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(warmup: int, total: int | Callable[[], int], min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to the base LR, then a cosine decay to `min_ratio` of it at the last step.

    capdiff's own rather than transformers' `get_cosine_with_min_lr_schedule_with_warmup`, because that one
    takes the run's length when it is built: `total` here may be a function, called once, when the decay
    starts. Lightning's estimate of the length (`trainer.estimated_stepping_batches`) iterates the train loader,
    and read in `configure_optimizers` it does so before a resumed run's loop state is restored: the resumed
    epoch then replays another epoch's batches (tests/test_training.py's resume test fails that way).
    """
    known: list[int] = []

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step == warmup:
            return 1.0  # the top of the cosine, whatever the length
        if not known:
            known.append(total() if callable(total) else total)
        progress = min(1.0, (step - warmup) / max(1, known[0] - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def clip_gradients(module: pl.LightningModule, optimizer, value: float | None, algorithm: str | None) -> None:
    """`trainer.gradient_clip_val`: FSDP clips by the norm over every rank's shards (its root module's
    `clip_grad_norm_`; Lightning's FSDP plugin refuses norm clipping); without a loss scaler (32-true,
    bf16-mixed) the gradients are the true ones and are clipped directly, fused AdamW included (Lightning's
    mixed-precision plugin refuses any fused optimizer); under a loss scaler, Lightning's own clipping."""
    if not value:
        return
    by_value = algorithm == GradClipAlgorithmType.VALUE
    trainer = module.trainer
    root = trainer.strategy.model
    if isinstance(root, FullyShardedDataParallel) and not by_value:
        root.clip_grad_norm_(value)
    elif getattr(trainer.precision_plugin, "scaler", None) is None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        clip = nn.utils.clip_grad_value_ if by_value else nn.utils.clip_grad_norm_
        clip(params, value)
    else:
        module.clip_gradients(optimizer, value, algorithm)
