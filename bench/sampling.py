"""Sampling: capdiff's loop (`capdiff.sampling.sample`) vs diffusers' own StableDiffusionPipeline loop over the
same UNet, scheduler (the default sampler unless `--sampler` names another), steps, guidance scale, conditions and
starting noise.

The tiny preset's UNet (random weights) and its sampling scheduler; the pipeline gets the conditions as
`prompt_embeds` and returns latents, so both sides time the same denoising loop. The two outputs must agree
(printed), or the comparison would mean nothing. Goal ≥ 1.0× (capdiff's images/s over the pipeline's).
Which sampler and how many steps: bench/samplers.py.

    python bench/sampling.py [--rounds 5] [--sampler ddim] [--steps 25] [--batch 8]
"""

from __future__ import annotations

import torch
from common import compose, interleaved, median, parser, ratio_line, show, spread
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from capdiff.models.diffusion import LatentDiffusion
from capdiff.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler
from capdiff.sampling import sample


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--sampler", type=check_sampler, default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    args = p.parse_args()
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    model = compose([], args.data_dir).model
    torch.manual_seed(0)
    size = 16  # the tiny preset's latent side at data.image_size=32 (a ÷2 first stage)
    unet = UNet2DConditionModel(**model.unet.config, sample_size=size).eval()
    diffusion = LatentDiffusion(unet, vae=torch.nn.Identity(), latent_size=size, **model.diffusion)
    scheduler = diffusion.sampling_scheduler(args.sampler)
    width = unet.config.cross_attention_dim
    cond, uncond = torch.randn(args.batch, 20, width), torch.randn(args.batch, 20, width)
    noise = torch.stack(
        [torch.randn(4, size, size, generator=torch.Generator().manual_seed(i)) for i in range(args.batch)]
    )
    start = noise * scheduler.init_noise_sigma  # what the pipeline starts from, given `noise`

    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def capdiff() -> torch.Tensor:
        return sample(
            diffusion, cond, None, uncond, None, steps, args.guidance_scale, latents=start, guidance_rescale=0.0,
            sampler=args.sampler,
        )  # fmt: skip

    def diffusers() -> torch.Tensor:
        return pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            num_inference_steps=steps,
            guidance_scale=args.guidance_scale,
            latents=noise.clone(),
            output_type="latent",
            height=size,  # with vae=None the pipeline's scale factor is 1: these are latent sides
            width=size,
        ).images

    with torch.inference_mode():
        difference = (capdiff() - diffusers()).abs().max().item()
        results = interleaved({"capdiff sample": capdiff, "diffusers StableDiffusionPipeline": diffusers}, rounds)
    settings = f"{args.sampler}, {steps} steps, guidance {args.guidance_scale}, batch {args.batch}"
    show(
        f"{settings}, tiny UNet, {rounds} rounds",
        ["sampler", "ms per batch: median (range)", "images/s"],
        [[k, spread(v), f"{args.batch / median(v):.1f}"] for k, v in results.items()],
    )
    print(f"max |capdiff - diffusers| over the final latents: {difference:.2e}")
    ratio = median(results["diffusers StableDiffusionPipeline"]) / median(results["capdiff sample"])
    ratio_line("capdiff/diffusers sampling images/s", ratio, 1.0)


if __name__ == "__main__":
    main()
