"""GPU throughput: the joint training step at 256² with the `sd15_gpt2` shapes (random weights from configs,
no download) in bf16, and the UNet alone in the same run; peak memory; with and without torch.compile,
gradient checkpointing and channels_last, and with cached latents.

Goals on one H100: ≥ 150 img/s for the joint step, and ≥ 0.75× the UNet-only rate.
Without a CUDA device it prints SKIP and exits 0 (`--allow-cpu` runs a small smoke version of the same code).

    python bench/gpu.py [--batch 32] [--steps 10]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from common import compose, console, parser, ratio_line, show
from omegaconf import open_dict
from shapes import CLIP_VIT_B16, GPT2_SMALL, sd_vae

from capdiff.models.tokenizer import build_byte_bpe
from capdiff.train import instantiate

CAPTIONS = [f"a photo of {n} {c} {s} on a table" for n in range(50) for c in ("red", "blue") for s in ("cups", "cats")]


def build(folder: Path, image_size: int, checkpointing: bool, channels_last: bool, compile_unet: bool, data_dir=None):
    """The sd15_gpt2 recipe with every pretrained part replaced by its shape from config."""
    cfg = compose(["model=sd15_gpt2", f"data.image_size={image_size}"], data_dir)
    with open_dict(cfg):
        cfg.model.llm.name_or_path = None
        cfg.model.llm.tokenizer = str(folder / "tokenizer")
        cfg.model.llm.config = GPT2_SMALL
        cfg.model.vision.name_or_path = None
        cfg.model.vision.config = CLIP_VIT_B16 | {"image_size": image_size}
        cfg.model.vae.name_or_path = str(folder / "vae")
        cfg.model.unet.name_or_path = None  # the SD-1.5 UNet's shape from the preset's config, random weights
        cfg.model.unet.gradient_checkpointing = checkpointing
        cfg.model.speed = {"channels_last": channels_last, "compile": {"unet": compile_unet}}
    model = instantiate(cfg.model, recursive=False)
    model.model.llm.lm.resize_token_embeddings(50257)  # GPT-2's real vocabulary: its output layer is a real cost
    return model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def measure(model, batch: dict, device: str, dtype, steps: int, warmup: int, unet_only: bool = False) -> tuple:
    model.to(device).train()
    model.use_channels_last(device)  # model.speed.channels_last, as the Trainer's setup applies it
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device != "mps")
    cond = torch.randn(
        batch["pixels"].shape[0], 40, model.model.diffusion.unet.config.cross_attention_dim, device=device
    )

    def step() -> None:
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            if unet_only:
                latents = (batch["latent_mean"] + batch["latent_std"] * torch.randn_like(batch["latent_std"])) * 0.18215
                loss = model.model.diffusion.loss(latents, cond)
            else:
                loss = model.model.losses(batch, "train")["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(step, steps, warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    model.to("cpu")
    return batch["pixels"].shape[0] / seconds, peak  # the optimizer state goes with this frame


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-run the code on CPU at a small size")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        console.print("SKIP bench/gpu.py: no CUDA device here; it measures the SD-size joint step on a GPU.")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    size, batch_size = (args.image_size, args.batch) if device == "cuda" else (64, 2)
    steps, warmup = (args.steps, args.warmup) if device == "cuda" and not args.quick else (1, 1)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_byte_bpe(CAPTIONS, folder / "tokenizer", vocab_size=512)
        sd_vae().save_pretrained(folder / "vae")
        torch.manual_seed(0)
        pixels = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
        captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
        batch = {"pixels": pixels, "captions": captions}
        kind = "bf16" if dtype == torch.bfloat16 else "fp32"
        variants = {
            f"{kind}, grad. ckpt, channels_last": dict(checkpointing=True, channels_last=True, compile_unet=False),
            f"{kind}, no grad. ckpt": dict(checkpointing=False, channels_last=True, compile_unet=False),
            f"{kind}, grad. ckpt, no channels_last": dict(checkpointing=True, channels_last=False, compile_unet=False),
        }
        if not args.no_compile and device == "cuda":
            variants[f"{kind}, grad. ckpt, channels_last, compiled UNet"] = dict(
                checkpointing=True, channels_last=True, compile_unet=True
            )
        rows, rates = [], {}
        for name, options in variants.items():
            model = build(folder, size, **options)
            with torch.no_grad():
                mean, std = model.model.diffusion.to(device).posterior(pixels)
            cached = batch | {"latent_mean": mean, "latent_std": std}
            for label, data, unet_only in (
                ("joint", batch, False),
                ("joint, cached latents", cached, False),
                ("UNet only", cached, True),
            ):
                try:
                    rate, peak = measure(model, data, device, dtype, steps, warmup, unet_only)
                except torch.OutOfMemoryError:
                    rows.append([name, label, "out of memory", "-"])
                    continue
                finally:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                rates[(name, label)] = rate
                rows.append([name, label, f"{rate:.1f}", f"{peak:.1f}"])
            del model
    title = f"Training step at {size}², sd15_gpt2 shapes, batch {batch_size}, {steps} steps after {warmup} warm-up"
    show(title, ["variant", "step", "images/s", "peak GiB"], rows)
    best = max((r for (n, label), r in rates.items() if label == "joint"), default=float("nan"))
    base = next(iter(variants))
    if device == "cuda":
        ratio_line("joint images/s (best variant)", best, 150.0)
    unet_rate = rates.get((base, "UNet only"), float("nan"))
    ratio_line("joint / UNet-only images/s", rates.get((base, "joint"), float("nan")) / unet_rate, 0.75)


if __name__ == "__main__":
    main()
