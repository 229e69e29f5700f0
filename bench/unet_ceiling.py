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

The ablations of docs/conditioning.md: `--canonical` (words, every caption in one template), `--frozen-words`
(words from a fixed random table), `--pooled` (the condition's mean also added to the timestep embedding),
`--connector embeddings|layer_mix` (the LLM's input embeddings alone, or a mix of its layers), `--out-norm`
(a LayerNorm on the connector's output), `--lexical STD` (a learned table of token ids added to the LLM path,
initialised N(0, STD²); with `--connector refiner --lexical-in`, added before the refiner's blocks), `--gate`
(the LLM path × a learned gate from 0), and `--override KEY=VALUE ...` for the config (e.g.
`model.unet.config.attention_head_dim=2`: diffusers reads it as the number of heads).

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

from capdiff.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, TEMPLATES
from capdiff.data.transforms import as_unit, unit_to_uint8
from capdiff.evaluation.shapes import attribute_accuracy, load_probe, parse_caption, probe_folder, read_split
from capdiff.joint.spec import Optim, parse
from capdiff.sampling import sample
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

    def __init__(self, llm, width: int, canonical: bool = False) -> None:
        super().__init__()
        self.llm = llm  # for its tokenizer only
        self.canonical = canonical  # every caption rewritten in the first template: one word order
        self.embed = nn.Embedding(len(llm.tokenizer), width)
        self.positions = nn.Parameter(torch.randn(llm.max_tokens + 1, width) * 0.02)
        self.null = nn.Parameter(torch.randn(1, width) * 0.02)

    def forward(self, captions: list[str | None], drop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        dropped = [c is None or (drop > 0 and float(torch.rand(())) < drop) for c in captions]
        if self.canonical:
            captions = [TEMPLATES[0].format(**parse_caption(c)) if c else c for c in captions]
        ids, mask = self.llm.tokenize([c or "" for c in captions], bos=True, eos=False)
        tokens = self.embed(ids) + self.positions[: ids.shape[1]]
        keep = ~torch.tensor(dropped).view(-1, 1)
        tokens = torch.where(keep.unsqueeze(-1), tokens, self.null.expand_as(tokens))
        mask = torch.where(keep, mask, torch.nn.functional.one_hot(torch.zeros_like(mask[:, 0]), mask.shape[1]))
        return tokens, mask


class FrozenLLMStates(nn.Module):
    """A trained checkpoint's LLM, frozen: its last-layer text states (the text-only pass the joint model uses)
    through a fresh MLP connector of the tiny preset's width. A dropped caption is the empty prompt."""

    def __init__(
        self,
        checkpoint: Path,
        width: int,
        connector: str = "mlp",
        hidden: int = 256,
        slots: int = 5,
        out_norm: bool = False,
        lexical: float = 0.0,
        gate: bool = False,
        lexical_in: bool = False,
    ) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(())) if gate else None  # the LLM path × gate, which starts at 0
        if (lexical or gate or out_norm) and connector in ("slots", "mean", "mean-mlp"):
            raise ValueError(f"--lexical, --gate and --out-norm act on per-token connectors, not {connector}.")
        self.out_norm = nn.LayerNorm(width) if out_norm else nn.Identity()
        from capdiff.checkpoints.portable import load_checkpoint
        from capdiff.models.connectors import MLP, LayerMix, Refiner

        model, _ = load_checkpoint(checkpoint)
        self.llm = model.llm.eval().requires_grad_(False)
        if lexical_in and (connector != "refiner" or not lexical):
            raise ValueError("--lexical-in needs --connector refiner and --lexical STD.")
        self.lexical = None
        self.lexical_in = lexical_in  # the rows go in before the refiner's blocks, as wide as it (`hidden`)
        if lexical:  # a learned table of the tokenizer's ids, added to the connector's output, initialised N(0, σ²)
            self.lexical = nn.Embedding(len(self.llm.tokenizer), hidden if lexical_in else width)
            nn.init.normal_(self.lexical.weight, std=lexical)
        self.kind, self.slots = connector, slots
        d = self.llm.hidden_size
        self.layers = (-1,)
        if connector == "mlp":
            self.connector = MLP(d, width, hidden)
        elif connector == "embeddings":  # the LLM's input embeddings alone (its layer 0) through the MLP
            self.connector, self.layers = MLP(d, width, hidden), (0,)
        elif connector == "layer_mix":
            self.connector = LayerMix(d, width, hidden, num_layers=self.llm.lm.config.num_hidden_layers)
            self.layers = self.connector.hidden_layers
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
            text = self.llm.text_hidden(captions, layers=self.layers)
        if self.kind == "slots":
            last = text["hidden"][torch.arange(len(captions)), text["mask"].sum(1) - 1]
            return self.connector(last).view(len(captions), self.slots, -1), None
        if self.kind in ("mean", "mean-mlp"):
            weights = text["mask"].unsqueeze(-1).to(text["hidden"].dtype)
            mean = (text["hidden"] * weights).sum(1) / weights.sum(1)
            return self.connector(mean).view(len(captions), self.slots, -1), None
        rows = None
        if self.lexical is not None:
            ids, _ = self.llm.tokenize(captions, bos=True, eos=False)
            rows = self.lexical(ids)
        if self.lexical_in:  # the refiner's own layers, with the table's rows added before its blocks
            r = self.connector
            x = r.blocks(r.proj_in(r.norm_in(text["layers"][-1])) + rows, src_key_padding_mask=text["mask"] == 0)
            cond = self.out_norm(r.proj_out(r.norm_out(x)))
        else:
            cond = self.out_norm(self.connector(text["layers"], text["mask"])[0])
        if self.gate is not None:
            cond = cond * self.gate
        if rows is not None and not self.lexical_in:
            cond = cond + rows
        return cond, text["mask"]


class PooledUNet(nn.Module):
    """The UNet with its condition's masked mean also added to the timestep embedding (diffusers'
    `class_embed_type="projection"`): a global path beside cross-attention, as Imagen and SD-XL add a pooled text
    embedding."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.inner = unet

    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self):
        return self.inner.dtype

    def forward(self, sample, timesteps, encoder_hidden_states, encoder_attention_mask=None, **kwargs):
        if encoder_attention_mask is None:
            pooled = encoder_hidden_states.mean(1)
        else:
            weights = encoder_attention_mask.unsqueeze(-1).to(encoder_hidden_states.dtype)
            pooled = (encoder_hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1)
        return self.inner(
            sample,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            class_labels=pooled,
            **kwargs,
        )


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
    if args.pooled:
        diffusion.unet = PooledUNet(diffusion.unet)
    if args.condition == "words":
        condition = CaptionWords(model.llm, width, canonical=args.canonical)
        condition.embed.requires_grad_(not args.frozen_words)
    elif args.condition == "llm":
        condition = FrozenLLMStates(
            args.llm_from, width, args.connector, out_norm=args.out_norm, lexical=args.lexical, gate=args.gate,
            lexical_in=args.lexical_in,
        )  # fmt: skip
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
            latents = sample(diffusion, cond, mask, null, null_mask, steps=25, seed=0, sampler="ddim")
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
    pooled = [
        "+model.unet.config.class_embed_type=projection",
        "+model.unet.config.projection_class_embeddings_input_dim=${model.unet.config.cross_attention_dim}",
    ]
    return [*(FAST_AUTOENCODER + QUICK_DATA if args.quick else []), *(pooled if args.pooled else []), *args.override]


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
    p.add_argument("--connector", default="mlp",
                   choices=("mlp", "refiner", "slots", "mean", "mean-mlp", "embeddings", "layer_mix"),
                   help="--condition llm: the fresh connector (slots: the last token's state as 5 tokens)")  # fmt: skip
    p.add_argument(
        "--pooled", action="store_true", help="also add the condition's masked mean to the UNet's timestep embedding"
    )
    p.add_argument("--out-norm", action="store_true", help="--condition llm: a LayerNorm on the connector's output")
    p.add_argument("--frozen-words", action="store_true", help="--condition words: the embedding table not trained")
    p.add_argument(
        "--lexical", type=float, default=0.0, help="--condition llm: add a learned token table of this init std"
    )
    p.add_argument("--lexical-in", action="store_true",
                   help="--connector refiner: the table added to the refiner's input, before its bidirectional "
                        "blocks, instead of to its output")  # fmt: skip
    p.add_argument("--gate", action="store_true", help="--condition llm: the connector's output × a gate from 0")
    p.add_argument("--canonical", action="store_true", help="--condition words: every caption in one template")
    p.add_argument(
        "--override", nargs="*", default=[], help="config overrides, e.g. model.unet.config.attention_head_dim=2"
    )
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
