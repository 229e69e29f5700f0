"""Latent caching: the training step with cached VAE latents (`data.latents=true`) vs encoding on the fly.

Default (CPU): the whole joint training step of the tiny preset, both ways, on the same batches.
`--sd`: the diffusion part at Stable Diffusion 1.5 shapes (random weights from configs, no download) at
256² on this machine: SD VAE encode + UNet forward/backward vs the UNet step alone, batch 1. On a GPU,
bench/gpu.py measures the whole joint step at SD size with and without the cache.
Goal ≥ 1.4× on a GPU at SD size.

    python bench/latents.py [--rounds 5] [--sd]
"""

from __future__ import annotations

import torch
from common import batches, build_tiny, interleaved, median, parser, ratio_line, show, spread
from shapes import sd_unet, sd_vae

from capdiff.data.transforms import as_unit


def joint_steps(model, data: list[dict], optimizer) -> None:
    for batch in data:
        loss = model.losses(batch, "train")["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def tiny(args, rounds: int) -> float:
    torch.manual_seed(0)
    _, datamodule, module = build_tiny(args)
    model = module.model
    model.train()
    on_the_fly = batches(datamodule, 2 if args.quick else 8)
    cached = []
    for batch in on_the_fly:
        mean, std = model.diffusion.posterior(as_unit(batch["pixels"]))
        cached.append(batch | {"latent_mean": mean, "latent_std": std})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    results = interleaved(
        {
            "encode on the fly": lambda: joint_steps(model, on_the_fly, optimizer),
            "cached latents": lambda: joint_steps(model, cached, optimizer),
        },
        rounds=rounds,
    )
    per_step = {k: [v / len(on_the_fly) for v in values] for k, values in results.items()}
    show(
        f"Joint training step, tiny preset, batch {on_the_fly[0]['pixels'].shape[0]}, {rounds} rounds",
        ["latents", "ms per step: median (range)"],
        [[k, spread(v)] for k, v in per_step.items()],
    )
    return median(per_step["encode on the fly"]) / median(per_step["cached latents"])


def sd(rounds: int, image_size: int) -> float:
    torch.manual_seed(0)
    vae, unet = sd_vae().eval().requires_grad_(False), sd_unet(image_size // 8)
    unet.enable_gradient_checkpointing()
    pixels = torch.rand(1, 3, image_size, image_size) * 2 - 1
    posterior = vae.encode(pixels).latent_dist
    mean, std = posterior.mean.detach(), posterior.std.detach()
    context = torch.randn(1, 40, unet.config.cross_attention_dim)

    def unet_step(latents: torch.Tensor) -> None:
        timestep = torch.randint(0, 1000, (1,))
        unet(latents, timestep, encoder_hidden_states=context).sample.square().mean().backward()

    def on_the_fly() -> None:
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * 0.18215
        unet_step(latents)

    def cached() -> None:
        unet_step((mean + std * torch.randn_like(std)) * 0.18215)

    results = interleaved({"encode on the fly": on_the_fly, "cached latents": cached}, rounds=rounds)
    show(
        f"SD-1.5 shapes at {image_size}², batch 1: VAE encode + UNet fwd/bwd (grad. checkpointing), {rounds} rounds",
        ["latents", "ms per step: median (range)"],
        [[k, spread(v)] for k, v in results.items()],
    )
    return median(results["encode on the fly"]) / median(results["cached latents"])


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--sd", action="store_true", help="also measure the diffusion part at SD-1.5 shapes (slow on CPU)")
    p.add_argument("--sd-image-size", type=int, default=256)
    args = p.parse_args()
    rounds = 1 if args.quick else args.rounds
    tiny_ratio = tiny(args, rounds)
    ratio_line("tiny preset: on-the-fly / cached step time (CPU)", tiny_ratio, 1.4)
    if args.sd:
        size = 64 if args.quick else args.sd_image_size
        ratio_line(f"SD shapes {size}²: on-the-fly / cached diffusion step", sd(min(rounds, 3), size), 1.4)


if __name__ == "__main__":
    main()
