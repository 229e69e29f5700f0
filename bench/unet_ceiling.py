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

`--condition` swaps the oracle for a text condition, to see where the gap between text and a perfect condition
opens (docs/conditioning.md): `words`, the caption's tokens through a fresh embedding table (no LLM), or `llm`,
the frozen LLM of `--llm-from CKPT` through a fresh `--connector` (mlp, refiner; or slots / mean / mean-mlp:
five tokens from the last token's state or the states' masked mean):

    python bench/unet_ceiling.py --batch-sizes 16 --samples 9600 --every 4800 --condition llm --llm-from CKPT

The last line compares the best accuracy reached with the default run's goal (0.9); its name says "oracle" for
every condition, so that benchmarks' ratio lines keep one name.
"""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
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


class CaptionWords(nn.Module):
    """The caption's tokens (the run's tokenizer) through a fresh embedding table with learned positions, the
    padding masked: the caption's words without any LLM. A dropped caption is one learned null token."""

    def __init__(self, llm, width: int) -> None:
        super().__init__()
        self.llm = llm  # for its tokenizer only
        self.embed = nn.Embedding(len(llm.tokenizer), width)
        self.positions = nn.Parameter(torch.randn(llm.max_tokens + 1, width) * 0.02)
        self.null = nn.Parameter(torch.randn(1, width) * 0.02)

    def forward(self, captions: list[str | None], drop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        dropped = [c is None or (drop > 0 and float(torch.rand(())) < drop) for c in captions]
        ids, mask = self.llm.tokenize([c or "" for c in captions], bos=True, eos=False)
        tokens = self.embed(ids) + self.positions[: ids.shape[1]]
        keep = ~torch.tensor(dropped).view(-1, 1)
        tokens = torch.where(keep.unsqueeze(-1), tokens, self.null.expand_as(tokens))
        mask = torch.where(keep, mask, torch.nn.functional.one_hot(torch.zeros_like(mask[:, 0]), mask.shape[1]))
        return tokens, mask


class FrozenLLMStates(nn.Module):
    """A trained checkpoint's LLM, frozen: its last-layer text states (the text-only pass the joint model uses)
    through a fresh MLP connector of the tiny preset's width. A dropped caption is the empty prompt."""

    def __init__(self, checkpoint: Path, width: int, connector: str = "mlp", hidden: int = 256, slots: int = 5) -> None:
        super().__init__()
        from capdiff.checkpoints.portable import load_checkpoint
        from capdiff.models.connectors import MLP, Refiner

        model, _ = load_checkpoint(checkpoint)
        self.llm = model.llm.eval().requires_grad_(False)
        self.kind, self.slots = connector, slots
        d = self.llm.hidden_size
        if connector == "mlp":
            self.connector = MLP(d, width, hidden)
        elif connector == "refiner":
            self.connector = Refiner(d, width, hidden)
        elif connector == "mean-mlp":  # the masked mean of the states → an MLP → `slots` tokens
            self.connector = nn.Sequential(
                nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, slots * width)
            )
        else:  # slots / mean: the last real token's state (it has read the whole caption), or the masked mean of
            # all of them, → `slots` tokens
            self.connector = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, slots * width))

    def forward(self, captions: list[str | None], drop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        captions = ["" if c is None or (drop > 0 and float(torch.rand(())) < drop) else c for c in captions]
        with torch.no_grad():
            text = self.llm.text_hidden(captions)
        if self.kind == "slots":
            last = text["hidden"][torch.arange(len(captions)), text["mask"].sum(1) - 1]
            return self.connector(last).view(len(captions), self.slots, -1), None
        if self.kind in ("mean", "mean-mlp"):
            weights = text["mask"].unsqueeze(-1).to(text["hidden"].dtype)
            mean = (text["hidden"] * weights).sum(1) / weights.sum(1)
            return self.connector(mean).view(len(captions), self.slots, -1), None
        return self.connector([text["hidden"]], text["mask"])[0], text["mask"]


class OracleCondition(nn.Module):
    """`AttributeTokens` read from the captions: the interface every `--condition` shares."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.tokens = AttributeTokens(width)

    def forward(self, captions: list[str | None], drop: float = 0.0) -> tuple[torch.Tensor, None]:
        return self.tokens([parse_caption(c) if c is not None else None for c in captions], drop=drop), None


def oracle_step(diffusion, condition, optimizer, params, batch: dict, lr: float, dropout: float) -> list[dict]:
    """One optimizer step of the UNet and its condition (any `--condition` module: captions → condition and mask)
    on a training batch; returns its attributes."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.no_grad():
        latents = diffusion.encode(as_unit(batch["pixels"]))
    attributes = [parse_caption(c) for c in batch["captions"]]
    loss = diffusion.loss(latents, *condition(batch["captions"], drop=dropout))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return attributes


def study(args, batch_size: int, probe, val_captions, val_attributes) -> list[list[str]]:
    torch.manual_seed(0)
    cfg = compose([*quick_overrides(args), f"data.batch_size={batch_size}"], args.data_dir)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule).model
    diffusion = model.diffusion.train()
    width = diffusion.unet.config.cross_attention_dim
    if args.condition == "words":
        condition = CaptionWords(model.llm, width)
    elif args.condition == "llm":
        condition = FrozenLLMStates(args.llm_from, width, args.connector)
    else:
        condition = OracleCondition(width)
    params = [p for p in (*diffusion.unet.parameters(), *condition.parameters()) if p.requires_grad]
    lr = group_lr(parse(Optim, cfg.model.optim, "model.optim"), "unet")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.model.optim.weight_decay, fused=True)
    warmup = cfg.model.optim.warmup_steps

    def probe_accuracy() -> dict[str, float]:
        diffusion.eval()
        with torch.no_grad():
            null, null_mask = condition([None] * len(val_captions))
            cond, mask = condition(val_captions)
            if mask is not None and null.shape[1] < cond.shape[1]:  # guidance batches both: pad the empty prompt
                pad = cond.shape[1] - null.shape[1]
                null = torch.nn.functional.pad(null, (0, 0, 0, pad))
                null_mask = torch.nn.functional.pad(null_mask, (0, pad))
            latents = ddim_sample(diffusion, cond, mask, null, null_mask, steps=25, seed=0)
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
    p.add_argument("--condition", choices=("oracle", "words", "llm"), default="oracle",
                   help="oracle: the true attributes; words: the caption's tokens, no LLM; llm: --llm-from's frozen "
                        "LLM states through a fresh MLP")  # fmt: skip
    p.add_argument("--llm-from", type=Path, default=None, help="a checkpoint whose LLM --condition llm reads")
    p.add_argument("--connector", choices=("mlp", "refiner", "slots", "mean", "mean-mlp"), default="mlp",
                   help="--condition llm: the fresh connector (slots: the last token's state as 5 tokens)")  # fmt: skip
    args = p.parse_args()
    if args.quick:
        args.batch_sizes, args.samples, args.every, args.eval_samples = [4], 8, 8, 4

    cfg = compose(quick_overrides(args), args.data_dir)
    datamodule = build_datamodule(cfg)
    probe, _ = load_probe(datamodule.train_urls, datamodule.val_urls, probe_folder(cfg.paths.data_dir, datamodule))
    _, _, val_attributes = read_split(datamodule.val_urls, args.eval_samples)
    val_captions = [s["txt"].decode() for s in islice(wds.tarfile_samples([{"url": u} for u in datamodule.val_urls]),
                                                       args.eval_samples)]  # fmt: skip
    rows = [row for b in args.batch_sizes for row in study(args, b, probe, val_captions, val_attributes)]
    show(
        f"UNet alone, condition: {args.condition}: probe accuracy of its generations",
        ["batch", "step", "samples", "train s", "ms/sample", *VOCAB, "mean"],
        rows,
    )
    best = max(float(r[-1]) for r in rows)
    ratio_line("best oracle-conditioned probe accuracy / default-run goal", best / GOAL, 1.0)


if __name__ == "__main__":
    main()
