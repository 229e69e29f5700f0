"""An offline Hugging Face hub: `python -m capdiff.testing.hub DIR [--size full|reduced]`.

Writes a hub cache (the `HF_HUB_CACHE` layout: `models--<org>--<name>/refs/main` holding a revision, and
`snapshots/<revision>/<files>`) with random-weight models built from the published configs of the four
repos the `sd15_gpt2` preset names:

    gpt2                                        GPT2LMHeadModel, config, generation config, tokenizer files
    openai/clip-vit-base-patch16                CLIPModel (the vision tower capdiff reads), image processor
    stabilityai/sd-vae-ft-mse                   AutoencoderKL at the top of the repo
    stable-diffusion-v1-5/stable-diffusion-v1-5 model_index.json, scheduler/, unet/, vae/

With `HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1` these ids resolve exactly as on a machine that downloaded them, so
the code path a user takes after `hf download` runs here with no network. `--size full` has the published
sizes (about 5 GB on disk; the SD-1.5 UNet alone is 860 M parameters); `--size reduced` keeps every id, file
layout, block type and vocabulary and shrinks the widths and depths, small enough for the test suite. SD-1.5's
text encoder, tokenizer and safety checker are left out: capdiff never reads them (model_index.json still
lists them, as published). The GPT-2 tokenizer is a byte-level BPE with GPT-2's 50,257 ids and
`<|endoftext|>` at 50256, its merges learned from a short built-in text, not GPT-2's own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GPT2 = "gpt2"
CLIP = "openai/clip-vit-base-patch16"
SD_VAE = "stabilityai/sd-vae-ft-mse"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
REPOS = (GPT2, CLIP, SD_VAE, SD15)
SIZES = ("full", "reduced")

GPT2_CONFIG = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "embd_pdrop": 0.1,
    "eos_token_id": 50256,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "resid_pdrop": 0.1,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257,
}
CLIP_TEXT = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
}
CLIP_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "quick_gelu",
}
CLIP_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
VAE_CONFIG = {  # stabilityai/sd-vae-ft-mse; SD-1.5's vae/ differs only in sample_size (512)
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
UNET_CONFIG = {  # stable-diffusion-v1-5 unet/config.json
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": True,
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# `--size reduced`: the same ids, files, block types and vocabularies; narrower and shallower.
REDUCED = {
    "gpt2": {"n_embd": 64, "n_head": 2, "n_layer": 2},
    "clip_text": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1},
    "clip_vision": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "image_size": 64,
    },
    "vae": {"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8},
    "unet": {
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
    },
}

# Text the stand-in GPT-2 tokenizer learns its merges from: captions of the kind capdiff trains on.
CORPUS = [
    f"a {size} {color} {shape} in the {where} on a {bg} background"
    for size in ("small", "large", "tiny", "big")
    for color in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    for shape in ("circle", "square", "triangle", "star", "cross", "diamond")
    for where, bg in (("top left", "white"), ("center", "gray"), ("bottom right", "blue"), ("middle", "black"))
] + ["a photo of a cat sitting on a table next to a cup of coffee", "an image of a dog running on the beach"]


def revision(repo: str, size: str) -> str:
    """A fixed 40-hex revision per repo and size, as `refs/main` holds a commit hash."""
    return hashlib.sha1(f"capdiff-offline-hub:{repo}:{size}".encode()).hexdigest()


def repo_folder(cache: Path, repo: str) -> Path:
    """Where the hub cache keeps `repo`: `models--<org>--<name>`."""
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo, repo_type="model")


def snapshot(cache: Path, repo: str, size: str) -> Path:
    folder = repo_folder(cache, repo)
    rev = revision(repo, size)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    return folder / "snapshots" / rev


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def gpt2_tokenizer(vocab_size: int):
    """A byte-level BPE in GPT-2's format: the 256 byte tokens, merges learned on CORPUS, unused ids up to
    `vocab_size - 1`, and `<|endoftext|>` last, as in GPT-2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    learner.train_from_iterator(CORPUS, trainer)
    state = json.loads(learner.to_str())["model"]
    vocab = dict(state["vocab"])
    vocab |= {f"<|unused{i}|>": i for i in range(len(vocab), vocab_size - 1)}
    vocab["<|endoftext|>"] = vocab_size - 1
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return GPT2Tokenizer(vocab=vocab, merges=merges), vocab, [" ".join(m) for m in merges]


def write_gpt2(cache: Path, size: str) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = snapshot(cache, GPT2, size)
    spec = GPT2_CONFIG | (REDUCED["gpt2"] if size == "reduced" else {})
    GPT2LMHeadModel(GPT2Config(**spec)).save_pretrained(folder)
    _json(folder / "config.json", spec)  # as published: no transformers_version or dtype entries
    _json(folder / "generation_config.json", {"_from_model_config": True, "bos_token_id": 50256, "eos_token_id": 50256})
    tokenizer, vocab, merges = gpt2_tokenizer(spec["vocab_size"])
    tokenizer.save_pretrained(folder)
    _json(folder / "tokenizer_config.json", {"model_max_length": 1024})
    _json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def write_clip(cache: Path, size: str) -> Path:
    from transformers import CLIPConfig, CLIPModel

    folder = snapshot(cache, CLIP, size)
    text = CLIP_TEXT | (REDUCED["clip_text"] if size == "reduced" else {})
    vision = CLIP_VISION | (REDUCED["clip_vision"] if size == "reduced" else {})
    projection = 512 if size == "full" else 32
    # each sub-config says the projection size too, as the published config.json does: CLIPVisionModelWithProjection
    # (FID in CLIP's feature space) reads the vision config's own
    config = CLIPConfig(text_config=text | {"projection_dim": projection},
                        vision_config=vision | {"projection_dim": projection}, projection_dim=projection)  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    preprocessor = CLIP_PREPROCESSOR | (
        {"crop_size": vision["image_size"], "size": vision["image_size"]} if size == "reduced" else {}
    )
    _json(folder / "preprocessor_config.json", preprocessor)
    return folder


def _vae(size: str, sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(VAE_CONFIG | {"sample_size": sample_size} | (REDUCED["vae"] if size == "reduced" else {})))


def write_sd_vae(cache: Path, size: str) -> Path:
    folder = snapshot(cache, SD_VAE, size)
    _vae(size, 256).save_pretrained(folder)
    return folder


def write_sd15(cache: Path, size: str) -> Path:
    from diffusers import UNet2DConditionModel

    folder = snapshot(cache, SD15, size)
    _json(folder / "model_index.json", MODEL_INDEX)
    _json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG | {"_diffusers_version": "0.6.0"})
    _vae(size, 512).save_pretrained(folder / "vae")
    unet = UNet2DConditionModel(**(UNET_CONFIG | (REDUCED["unet"] if size == "reduced" else {})))
    unet.save_pretrained(folder / "unet")
    return folder


WRITERS: dict[str, Callable[[Path, str], Path]] = {
    GPT2: write_gpt2,
    CLIP: write_clip,
    SD_VAE: write_sd_vae,
    SD15: write_sd15,
}


def write_hub(cache: str | Path, size: str = "reduced", repos: tuple[str, ...] = REPOS, seed: int = 0) -> Path:
    """Write the offline hub into `cache` (an `HF_HUB_CACHE` folder); a repo already there is replaced."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}: use one of {SIZES}.")
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for repo in repos:
            shutil.rmtree(repo_folder(cache, repo), ignore_errors=True)
            log.info("writing %s (%s) into %s", repo, size, cache)
            WRITERS[repo](cache, size)
    return cache


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capdiff.testing.hub", description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path, help="the folder to write: use it as HF_HUB_CACHE")
    parser.add_argument("--size", choices=SIZES, default="reduced", help="published sizes, or reduced (default)")
    parser.add_argument("--repos", nargs="+", choices=REPOS, default=list(REPOS), help="which repos to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_hub(args.cache, args.size, tuple(args.repos))
    print(f"offline hub written: use it with\n  export HF_HUB_CACHE={args.cache.resolve()} HF_HUB_OFFLINE=1")


if __name__ == "__main__":
    main()
