"""Samplers by name: every one samples ε, v and zero-terminal-SNR models through one loop, an image does not
change with the batch it is in, DDIM gives the images the DDIM-only loop gave, and a bad name or a sampler that
cannot follow the model's schedule is refused before any work, naming the ones that can."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from capdiff import Pipeline
from capdiff.models.diffusion import LatentDiffusion
from capdiff.samplers import DEFAULT_SAMPLER, SAMPLERS, STOCHASTIC, check_sampler, sampler_names, usable_samplers
from capdiff.sampling import sample
from tests.helpers import run_entry_point

KINDS = {  # the model kinds a sampler meets: (prediction type, zero terminal SNR)
    "epsilon": ("epsilon", False),
    "v": ("v_prediction", False),
    "v, zero terminal SNR": ("v_prediction", True),
}


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    ).eval()  # fmt: skip


def diffusion_of(unet: UNet2DConditionModel, kind: str) -> LatentDiffusion:
    prediction_type, zero_snr = KINDS[kind]
    return LatentDiffusion(
        unet, torch.nn.Identity(), prediction_type=prediction_type, zero_terminal_snr=zero_snr, latent_size=8
    )


def conditions(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(batch, 6, 16, generator=g), torch.randn(batch, 6, 16, generator=g)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[0, 4:] = False  # the first prompt is shorter: padded
    return cond, mask, uncond, torch.ones(batch, 6, dtype=torch.bool)


@torch.no_grad()
def ddim_loop_before_samplers(diffusion, cond, cond_mask, uncond, uncond_mask, steps, guidance_scale, seeds,
                              latents=None, strength=1.0):  # fmt: skip
    """capdiff's sampling loop when DDIM was its only sampler, kept as it was (η = 0)."""
    scheduler = DDIMScheduler.from_config(
        diffusion.scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    scheduler.set_timesteps(steps)
    unet, timesteps = diffusion.unet, scheduler.timesteps
    guidance_rescale = 0.7 if scheduler.config.get("rescale_betas_zero_snr") else 0.0
    if latents is None or strength < 1.0:
        side = latents.shape[-2:] if latents is not None else (diffusion.latent_size,) * 2
        shape = (unet.config.in_channels, *side)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        if latents is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            timesteps = timesteps[steps - max(1, round(steps * strength)) :]
            latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(latents.shape[0]))
    guided = guidance_scale != 1.0
    context = torch.cat([uncond, cond]) if guided else cond
    context_mask = torch.cat([uncond_mask, cond_mask]) if guided else cond_mask
    for t in timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
        prediction = unet(model_in, t, encoder_hidden_states=context, encoder_attention_mask=context_mask).sample
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
            if guidance_rescale > 0:
                dims = tuple(range(1, prediction.ndim))
                rescaled = prediction * (conditional.std(dims, keepdim=True) / prediction.std(dims, keepdim=True))
                prediction = guidance_rescale * rescaled + (1 - guidance_rescale) * prediction
        latents = scheduler.step(prediction, t, latents, eta=0.0).prev_sample
    return latents


@pytest.mark.parametrize("kind", list(KINDS))
def test_ddim_gives_exactly_the_images_of_the_ddim_only_loop(unet, kind: str) -> None:
    diffusion = diffusion_of(unet, kind)
    cond, mask, uncond, uncond_mask = conditions(2)
    image = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for guidance in (4.0, 1.0):
        for latents, strength in ((None, 1.0), (image, 0.6), (image, 1.0)):
            settings = {
                "steps": 7,
                "guidance_scale": guidance,
                "seeds": [3, 9],
                "latents": latents,
                "strength": strength,
            }
            new = sample(diffusion, cond, mask, uncond, uncond_mask, sampler="ddim", **settings)
            old = ddim_loop_before_samplers(diffusion, cond, mask, uncond, uncond_mask, **settings)
            assert torch.equal(new, old), (guidance, strength, (new - old).abs().max())


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_sampler_samples_each_model_kind_image_by_image(unet, name: str, kind: str) -> None:
    """One loop for all: finite latents, an image the same alone as in its batch (its own seed draws its start
    and, for stochastic samplers, its step noise), another seed another image, and SDEdit from part-way."""
    diffusion = diffusion_of(unet, kind)
    cond, mask, uncond, uncond_mask = conditions(3)
    if name not in usable_samplers(diffusion.zero_terminal_snr):
        with pytest.raises(ValueError, match=r"zero terminal SNR.*Use one of ddim, ddpm"):
            sample(diffusion, cond, mask, uncond, uncond_mask, steps=4, sampler=name)
        return
    batch = sample(diffusion, cond, mask, uncond, uncond_mask, steps=6, sampler=name, seeds=[5, 6, 7])
    alone = sample(diffusion, cond[1:2], mask[1:2], uncond[1:2], uncond_mask[1:2], steps=6, sampler=name, seeds=[6])
    other = sample(diffusion, cond[1:2], mask[1:2], uncond[1:2], uncond_mask[1:2], steps=6, sampler=name, seeds=[8])
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(alone[0], batch[1], atol=1e-4, rtol=1e-4)
    assert (other[0] - batch[1]).abs().mean() > 1e-2
    image = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    edited = sample(diffusion, cond, mask, uncond, uncond_mask, steps=6, sampler=name, latents=image, strength=0.5)
    assert torch.isfinite(edited).all() and not torch.equal(edited, image)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "euler", "heun", "deis", "lms"])
def test_deterministic_solvers_reach_the_same_images_as_ddim_in_many_steps(unet, name: str) -> None:
    """Every ODE solver built from the model's schedule solves the same ODE: at 60 steps its images are far
    nearer DDIM's at 240 steps than another seed's are (a wrong prediction type or schedule is not)."""
    diffusion = diffusion_of(unet, "v")
    cond, mask, uncond, uncond_mask = conditions(2)
    args = (diffusion, cond, mask, uncond, uncond_mask)
    reference = sample(*args, steps=240, guidance_scale=1.0, sampler="ddim", seeds=[1, 2])
    solved = sample(*args, steps=60, guidance_scale=1.0, sampler=name, seeds=[1, 2])
    other = sample(*args, steps=60, guidance_scale=1.0, sampler=name, seeds=[3, 4])
    error, baseline = (solved - reference).square().mean(), (other - reference).square().mean()
    assert error < baseline / 20, (float(error), float(baseline))


def test_names_are_checked_and_a_bad_one_lists_the_valid_ones() -> None:
    assert check_sampler("UniPCMultistepScheduler") == "UniPCMultistepScheduler"  # a diffusers class by name
    assert "DPMSolverMultistepScheduler" in sampler_names() and DEFAULT_SAMPLER in SAMPLERS
    for bad in ("dpm++", "EDMEulerScheduler", "", None):  # EDM's Euler does not take a DDPM schedule
        with pytest.raises(ValueError, match=r"eval\.sampler=.*ddim, ddpm, pndm"):
            check_sampler(bad, "eval.sampler")
    with pytest.raises(ValueError, match=r"callbacks\.sample_grid\.sampler='heun' cannot sample .* zero terminal SNR"):
        check_sampler("heun", "callbacks.sample_grid.sampler", zero_terminal_snr=True)
    assert set(STOCHASTIC) <= set(SAMPLERS)


def test_eta_belongs_to_ddim(unet) -> None:
    diffusion = diffusion_of(unet, "v")
    cond, mask, uncond, uncond_mask = conditions(2)
    noisy = sample(diffusion, cond, mask, uncond, uncond_mask, steps=4, sampler="ddim", eta=1.0, seeds=[1, 2])
    alone = sample(diffusion, cond[1:], mask[1:], uncond[1:], uncond_mask[1:], steps=4, sampler="ddim", eta=1.0,
                   seeds=[2])  # fmt: skip
    torch.testing.assert_close(alone[0], noisy[1], atol=1e-4, rtol=1e-4)  # η's noise is drawn image by image too
    with pytest.raises(ValueError, match=r"eta=1\.0 is DDIM's noise level and 'euler' has none"):
        sample(diffusion, cond, mask, uncond, uncond_mask, steps=4, sampler="euler", eta=1.0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_usable_sampler_generates_through_the_pipeline(trained_checkpoint: Path, kind: str) -> None:
    """The trained smoke model (v, zero terminal SNR), and its UNet under ε and plain-v schedules."""
    pipe = Pipeline.from_checkpoint(trained_checkpoint, device="cpu")
    trained = pipe.model.diffusion
    if KINDS[kind] != ("v_prediction", True):
        prediction_type, _ = KINDS[kind]
        pipe.model.diffusion = LatentDiffusion(
            trained.unet, trained.vae, prediction_type=prediction_type, latent_size=trained.latent_size
        )
    for name in usable_samplers(pipe.model.diffusion.zero_terminal_snr):
        images = pipe.generate(["a red circle", "a blue square"], steps=3, seed=5, sampler=name)
        again = pipe.generate(["a blue square"], steps=3, seed=6, sampler=name)  # prompt i uses seed + i
        difference = np.abs(np.asarray(images[1], dtype=int) - np.asarray(again[0], dtype=int))
        assert [im.size for im in images] == [(32, 32)] * 2
        assert difference.max() <= 1 and difference.mean() < 0.01, name  # padding: float rounding only
        sdedit = pipe.edit(images[0], "a green circle", steps=4, strength=0.5, sampler=name)
        assert sdedit.size == (32, 32)
    with pytest.raises(ValueError, match="is not a sampler"):
        pipe.generate(["a red circle"], sampler="nope")
    with pytest.raises(ValueError, match="inversion editing regenerates by DDIM"):
        pipe.edit(images[0], "a green circle", source_prompt="a red circle", steps=3, sampler="euler")


@pytest.mark.slow  # two evaluate.py processes, ~40 s
def test_evaluate_samples_with_the_named_sampler_and_refuses_one_that_cannot(
    trained_checkpoint: Path, smoke_root: Path, tmp_path: Path
) -> None:
    common = [f"ckpt_path={trained_checkpoint}", "data.num_workers=0", "eval.num_samples=4", "eval.steps=3",
              "eval.fid.feature=null", "eval.probe=false", "eval.batch_size=4"]  # fmt: skip
    done = run_entry_point("evaluate.py", smoke_root, tmp_path / "ok", *common, "eval.sampler=euler_a")
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert report["settings"]["sampler"] == "euler_a" and "capdiff_image_text_score" in report["metrics"]
    refused = run_entry_point("evaluate.py", smoke_root, tmp_path / "no", *common, "eval.sampler=heun")
    assert refused.returncode != 0
    assert "eval.sampler='heun' cannot sample a model trained with zero terminal SNR" in refused.stderr
    assert not (tmp_path / "no" / "metrics.json").exists() and "Validation" not in refused.stdout


@pytest.mark.slow  # a train.py process, ~20 s
def test_train_refuses_a_bad_callback_sampler_before_any_work(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = run_entry_point(
        "train.py", root, tmp_path / "run", "experiment=smoke", "callbacks.sample_grid.sampler=dpm++"
    )
    assert done.returncode != 0
    assert "callbacks.sample_grid.sampler='dpm++' is not a sampler; use one of ddim" in done.stderr
    assert not (root / "data").exists()  # no shapes written, no tokenizer or autoencoder built


def test_the_demo_offers_the_samplers_that_can_sample_its_model(trained_checkpoint: Path) -> None:
    pytest.importorskip("gradio")
    import gradio as gr

    from capdiff.demo import build

    pipe = Pipeline.from_checkpoint(trained_checkpoint, device="cpu")  # v, zero terminal SNR
    page = build(pipe, steps=7, sampler="unipc")
    lists = [b for b in page.blocks.values() if isinstance(b, gr.Dropdown)]
    assert len(lists) == 2  # generate, and edit's SDEdit
    for dropdown in lists:
        offered = [value for _, value in dropdown.choices]
        assert dropdown.value == "unipc" and set(offered) == set(usable_samplers(True)) and "heun" not in offered
    with pytest.raises(ValueError, match="zero terminal SNR"):
        build(pipe, sampler="heun")
