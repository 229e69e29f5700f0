"""Where the tiny preset's training step spends its time, and what the speed defaults bought.

Part by part (forward, or forward + backward where marked) on one batch, then whole steps with the previous
defaults (per-parameter AdamW loop, GPT-2's 0.1 dropout) against the current ones, alternating rounds.

    python bench/step.py [--rounds 5]
"""

from __future__ import annotations

import copy

import torch
from common import batches, build_tiny, interleaved, median, parser, ratio_line, show, spread

from capdiff.data.transforms import as_unit
from capdiff.models.language import caption_loss


def set_dropout(model: torch.nn.Module, p: float) -> None:
    for module in model.llm.lm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    model.llm.lm.config.attn_pdrop = p  # GPT-2 reads it per forward for scaled_dot_product_attention


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    rounds = 1 if args.quick else args.rounds
    torch.manual_seed(0)
    _, datamodule, module = build_tiny(args)
    model = module.model
    model.train()
    batch = batches(datamodule, 1)[0]
    pixels, captions = as_unit(batch["pixels"]), batch["captions"]
    latents = model.diffusion.encode(pixels)
    cond = model.condition(captions)

    def vision_caption() -> None:
        prefix = model.vision(pixels)["prefix"]
        out = model.llm.caption_logits(prefix, captions)
        caption_loss(out["logits"], out["labels"]).backward()

    def text_condition() -> None:
        model.encode_text(captions, embed=True)["cond"].sum().backward()

    def unet() -> None:
        model.diffusion.loss(latents, cond["cond"], cond["cond_mask"]).backward()

    parts = interleaved(
        {
            "VAE encode (no grad)": lambda: model.diffusion.encode(pixels),
            "vision + caption LM, fwd + bwd": vision_caption,
            "text pass + connector, fwd + bwd": text_condition,
            "UNet, fwd + bwd": unet,
        },
        rounds=rounds,
    )
    model.zero_grad(set_to_none=True)

    data = batches(datamodule, 4)
    before = copy.deepcopy(model)
    set_dropout(before, 0.1)
    optimizers = {
        "before": torch.optim.AdamW(before.parameters(), lr=1e-4, fused=False, foreach=False),
        "now": torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True),
    }
    models = {"before": before, "now": model}

    def steps(which: str) -> float:
        net, optimizer = models[which], optimizers[which]
        for b in data:
            optimizer.zero_grad(set_to_none=True)
            net.losses(b, "train")["loss"].backward()
            optimizer.step()
        return None

    whole = interleaved({k: (lambda k=k: steps(k)) for k in models}, rounds=rounds)
    per_step = {k: [v / len(data) for v in values] for k, values in whole.items()}
    rows = [[name, spread(values)] for name, values in parts.items()]
    rows += [
        ["whole step, before: AdamW loop, dropout 0.1", spread(per_step["before"])],
        ["whole step, now: fused AdamW, no dropout", spread(per_step["now"])],
    ]
    show(f"Tiny preset, batch {pixels.shape[0]}, {rounds} rounds", ["part", "ms: median (range)"], rows)
    ratio_line("step time before / now", median(per_step["before"]) / median(per_step["now"]), 1.0)


if __name__ == "__main__":
    main()
