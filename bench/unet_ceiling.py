"""The UNet's ceiling in the CPU budget: diffusion alone, conditioned on the true attributes.

The default run's generated images are scored by the shapes probe (prompt faithfulness). This study asks how
far the tiny preset's UNet could get in the same minutes if the text condition were perfect: the LLM's
hidden states are replaced by five tokens from a learned table, one per true attribute (shape, colour,
size, position, background; index 0 is the dropped condition, used for guidance), and only the diffusion
loss is trained, with the default's autoencoder, noise schedule, UNet and learning rate. Every `--every`
samples it generates images for validation captions (DDIM, 25 steps, guidance 4) and reads them with the
probe. Batch sizes are compared at equal samples seen; the table also gives each one's measured time per
sample, so they can be compared at equal time.

    python bench/unet_ceiling.py [--batch-sizes 16 32] [--samples 25600] [--every 6400]

The last line compares the best accuracy reached with the issue's goal for the default run (0.9).
"""

from __future__ import annotations

import time

import torch
from common import FAST_AUTOENCODER, QUICK_DATA, compose, console, parser, ratio_line, show
from torch import nn

from capdiff.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES
from capdiff.data.transforms import as_unit, unit_to_uint8
from capdiff.evaluation.shapes import attribute_accuracy, load_probe, parse_caption, probe_folder, read_split
from capdiff.joint.spec import Optim, parse
from capdiff.sampling import ddim_sample
from capdiff.train import build_datamodule, build_model
from capdiff.training.optimization import group_lr

VOCAB = {
    "shape": list(SHAPES),
    "color": list(COLORS),
    "size": list(SIZES),
    "position": list(POSITIONS),
    "background": list(BACKGROUNDS),
}
GOAL = 0.9


class AttributeTokens(nn.Module):
    """Five condition tokens from the true attributes; index 0 of each table is the dropped condition."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({k: nn.Embedding(len(v) + 1, width) for k, v in VOCAB.items()})

    def forward(self, attributes: list[dict], drop: float = 0.0) -> torch.Tensor:
        tokens = []
        for key, values in VOCAB.items():
            index = torch.tensor([values.index(a[key]) + 1 if a is not None else 0 for a in attributes])
            if drop:
                index = torch.where(torch.rand(len(index)) < drop, torch.zeros_like(index), index)
            tokens.append(self.tables[key](index))
        return torch.stack(tokens, 1)


def oracle_step(diffusion, condition, optimizer, params, batch: dict, lr: float, dropout: float) -> list[dict]:
    """One optimizer step of the UNet and the attribute tokens on a training batch; returns its attributes."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.no_grad():
        latents = diffusion.encode(as_unit(batch["pixels"]))
    attributes = [parse_caption(c) for c in batch["captions"]]
    loss = diffusion.loss(latents, condition(attributes, drop=dropout))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return attributes


def study(args, batch_size: int, probe, val_images, val_attributes) -> list[list[str]]:
    torch.manual_seed(0)
    cfg = compose([*quick_overrides(args), f"data.batch_size={batch_size}"], args.data_dir)
    datamodule = build_datamodule(cfg)
    diffusion = build_model(cfg, datamodule).model.diffusion.train()
    condition = AttributeTokens(diffusion.unet.config.cross_attention_dim)
    params = [*diffusion.unet.parameters(), *condition.parameters()]
    lr = group_lr(parse(Optim, cfg.model.optim, "model.optim"), "unet")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.model.optim.weight_decay, fused=True)
    warmup = cfg.model.optim.warmup_steps

    def probe_accuracy() -> dict[str, float]:
        diffusion.eval()
        with torch.no_grad():
            null = condition([None] * len(val_attributes))
            latents = ddim_sample(diffusion, condition(val_attributes), None, null, None, steps=25, seed=0)
            images = unit_to_uint8(diffusion.decode(latents))
        diffusion.train()
        return attribute_accuracy(probe.predict(images), val_attributes)

    rows, seen, step, train_seconds = [], 0, 0, 0.0
    loader = iter(datamodule.train_dataloader())
    while seen < args.samples:
        batch = next(loader, None)
        if batch is None:
            loader = iter(datamodule.train_dataloader())
            continue
        start = time.perf_counter()
        step += 1
        attributes = oracle_step(diffusion, condition, optimizer, params, batch, lr * min(1.0, step / warmup),
                                 cfg.model.caption_dropout)  # fmt: skip
        train_seconds += time.perf_counter() - start
        before, seen = seen, seen + len(attributes)
        if seen // args.every > before // args.every or seen >= args.samples:
            accuracy = probe_accuracy()
            rows.append(
                [str(batch_size), str(step), str(seen), f"{train_seconds:.0f}", f"{train_seconds / seen * 1e3:.1f}"]
                + [f"{accuracy[k]:.2f}" for k in (*VOCAB, "mean")]
            )
            console.print(" ".join(rows[-1]))
    return rows


def quick_overrides(args) -> list[str]:
    return [*FAST_AUTOENCODER, *QUICK_DATA] if args.quick else []


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--samples", type=int, default=25600, help="training samples per batch size")
    p.add_argument("--every", type=int, default=6400, help="evaluate after every this many samples")
    p.add_argument("--eval-samples", type=int, default=128, help="validation captions generated per evaluation")
    args = p.parse_args()
    if args.quick:
        args.batch_sizes, args.samples, args.every, args.eval_samples = [4], 8, 8, 4

    cfg = compose(quick_overrides(args), args.data_dir)
    datamodule = build_datamodule(cfg)
    probe, _ = load_probe(datamodule.train_urls, datamodule.val_urls, probe_folder(cfg.paths.data_dir, datamodule))
    _, val_images, val_attributes = read_split(datamodule.val_urls, args.eval_samples)
    rows = [row for b in args.batch_sizes for row in study(args, b, probe, val_images, val_attributes)]
    show(
        "UNet alone with the true attributes as its condition: probe accuracy of its generations",
        ["batch", "step", "samples", "train s", "ms/sample", *VOCAB, "mean"],
        rows,
    )
    best = max(float(r[-1]) for r in rows)
    ratio_line("best oracle-conditioned probe accuracy / default-run goal", best / GOAL, 1.0)


if __name__ == "__main__":
    main()
