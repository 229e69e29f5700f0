"""Using a trained model: caption images, generate images from prompts, edit an image by text.

from capdiff import Pipeline
pipe = Pipeline.from_checkpoint("logs/train/runs/<run>/checkpoints/last.ckpt")   # or .from_pretrained(export)
pipe.caption([Image.open("cat.png")])                       # ["a small red circle in the top left ..."]
pipe.generate(["a large blue square in the center on a white background"], seed=0)   # [PIL.Image]
pipe.edit(Image.open("cat.png"), "a large green square in the center on a white background")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from capdiff.checkpoints.portable import load_checkpoint
from capdiff.data.transforms import resize_crop, to_rgb_uint8, to_uint8_chw, uint8_to_unit, unit_to_uint8
from capdiff.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler, is_ddim
from capdiff.sampling import ddim_invert

ImageLike = Image.Image | torch.Tensor


def default_device() -> torch.device:
    """A GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    """A trained model of either recipe (`JointModel`, or `TextGAN`, which generates only); `device`: where it
    runs, None picks a GPU when there is one, else the CPU."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, ema: bool = True, device: str | torch.device | None = None) -> Pipeline:
        """A training checkpoint (it carries every part, so it loads on any machine); its EMA weights are used
        when it has them and `ema`."""
        return cls(load_checkpoint(path, ema=ema)[0], device)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None) -> Pipeline:
        """A folder written by `python -m capdiff.export`."""
        from capdiff.export import load_exported

        return cls(load_exported(folder), device)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def pixels(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """PIL images (any mode or size: resized and centre-cropped), uint8 C×H×W / B×C×H×W tensors, or float
        tensors in [-1, 1] → a float batch in [-1, 1] at the model's size."""
        if isinstance(images, torch.Tensor):
            batch = images if images.ndim == 4 else images.unsqueeze(0)
            batch = uint8_to_unit(batch) if batch.dtype == torch.uint8 else batch.float()
            if batch.shape[-1] != self.image_size or batch.shape[-2] != self.image_size:
                batch = torch.nn.functional.interpolate(
                    batch, size=(self.image_size,) * 2, mode="bicubic", antialias=True
                ).clamp(-1, 1)
            return batch.to(self.device)
        if isinstance(images, Image.Image):
            images = [images]
        rows = [to_uint8_chw(resize_crop(to_rgb_uint8(im), self.image_size)) for im in images]
        return uint8_to_unit(torch.stack(rows)).to(self.device)

    @torch.no_grad()
    def caption(self, images: ImageLike | Sequence[ImageLike], **generate_kwargs) -> list[str]:
        """Captions (greedy by default; pass `num_beams=4`, `do_sample=True, top_p=0.9`, `max_new_tokens`, ...)."""
        return self.model.caption(self.pixels(images), **generate_kwargs)

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = 4.0,
        eta: float = 0.0,
        seed: int = 0,
        batch_size: int = 32,
        postprocess: Callable[[torch.Tensor], torch.Tensor] | Sequence | None = None,
        sampler: str = DEFAULT_SAMPLER,
    ) -> list[Image.Image]:
        """One image per prompt; prompt i starts from the noise of `seed + i`. `sampler`: a short name such as
        `ddim`, `dpmpp_2m`, `unipc`, `euler_a` or a diffusers scheduler class name (`capdiff.samplers`), with
        `steps` steps. `postprocess`: a `capdiff.postprocess` chain (`build_chain(...)`, with a reference for its
        colour step) or a list of steps such as `["median", {"name": "sharpen", "amount": 0.5}]`, applied to
        every image."""
        check_sampler(sampler)
        if postprocess is not None and not callable(postprocess):
            from capdiff.postprocess import build_chain

            postprocess = build_chain(postprocess)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out: list[Image.Image] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            seeds = [seed + start + i for i in range(len(chunk))]
            pixels = self.model.generate(
                chunk, steps=steps, guidance_scale=guidance_scale, eta=eta, seeds=seeds, sampler=sampler
            )
            out += to_pil(postprocess(pixels) if postprocess is not None else pixels)
        return out

    @torch.no_grad()
    def invert(self, image: ImageLike, prompt: str, steps: int = 50) -> torch.Tensor:
        """The starting noise from which DDIM under `prompt` regenerates `image` (DDIM inversion)."""
        latents = self.model.diffusion.encode(self.pixels(image), sample=False)
        cond = self.model.condition([prompt])
        return ddim_invert(self.model.diffusion, latents, cond["cond"], cond["cond_mask"], steps=steps)

    @torch.no_grad()
    def edit(
        self,
        image: ImageLike,
        prompt: str,
        source_prompt: str | None = None,
        steps: int = 50,
        guidance_scale: float = 4.0,
        strength: float | None = None,
        seed: int = 0,
        sampler: str | None = None,
    ) -> Image.Image:
        """`image` changed to match `prompt`.

        Default: DDIM-invert the image under `source_prompt` (the model's own caption of it when not given),
        then regenerate from that noise under `prompt`, by DDIM: the noise inversion finds is the one the DDIM
        update maps back to the image, not another solver's. With `strength` in (0, 1]: SDEdit instead, noising
        the image to that share of the schedule and denoising under `prompt` (lower keeps more of the image) by
        `sampler` (default: the default sampler).
        """
        if strength is not None:
            sampler = check_sampler(sampler or DEFAULT_SAMPLER)
            latents = self.model.diffusion.encode(self.pixels(image), sample=False)
            pixels = self.model.generate(
                [prompt], steps=steps, guidance_scale=guidance_scale, seeds=[seed], latents=latents,
                strength=strength, sampler=sampler,
            )  # fmt: skip
            return to_pil(pixels)[0]
        if sampler is not None and not is_ddim(sampler):
            raise ValueError(
                f"sampler={sampler!r}: inversion editing regenerates by DDIM, from the noise DDIM inversion found; "
                "pass strength= for SDEdit with another sampler, or leave sampler out."
            )
        if source_prompt is None:
            source_prompt = self.caption(image)[0]
        noise = self.invert(image, source_prompt, steps=steps)
        pixels = self.model.generate(
            [prompt], steps=steps, guidance_scale=guidance_scale, latents=noise, sampler="ddim"
        )
        return to_pil(pixels)[0]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """`[-1, 1]` float batch → PIL images (clamped and rounded)."""
    return [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in unit_to_uint8(pixels)]
