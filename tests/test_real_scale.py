"""The path researchers run, `experiment=joint_ddim` with GPT-2, CLIP ViT-B/16, the SD VAE and SD-1.5's UNet
by their hub ids, on the reduced offline hub: train → checkpoint → resume → evaluate → export → the standard
loaders. `bench/fullsize.py` runs the same path at the published sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from capdiff.data.shapes import write_split
from capdiff.export import main as export_main
from capdiff.testing.hub import CLIP, GPT2, SD15, SD_VAE, repo_folder, revision
from capdiff.train import train
from tests.helpers import compose_config, run_entry_point


def test_the_offline_hub_has_the_cache_layout_and_the_ids_load_as_after_a_download(reduced_hub: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    for repo in (GPT2, CLIP, SD_VAE, SD15):
        folder = repo_folder(reduced_hub, repo)
        assert (folder / "refs" / "main").read_text() == revision(repo, "reduced")
        assert (folder / "snapshots" / revision(repo, "reduced")).is_dir()
    lm = AutoModelForCausalLM.from_pretrained(GPT2)
    tokenizer = AutoTokenizer.from_pretrained(GPT2)
    assert lm.config.vocab_size == len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer.decode(tokenizer("a small red circle")["input_ids"]) == "a small red circle"
    assert CLIPVisionModel.from_pretrained(CLIP).config.patch_size == 16
    unet = UNet2DConditionModel.from_pretrained(SD15, subfolder="unet")
    assert unet.config.sample_size == 64 and len(unet.config.block_out_channels) == 4
    assert AutoencoderKL.from_pretrained(SD15, subfolder="vae").config.sample_size == 512
    assert AutoencoderKL.from_pretrained(SD_VAE).config.latent_channels == 4


def shards(folder: Path) -> tuple[str, str]:
    train = [folder / f"train-{i}.tar" for i in range(2)]
    write_split(train, "train", 16, seed=0, image_size=64)
    write_split([folder / "val-0.tar"], "val", 4, seed=0, image_size=64)
    return str(folder / "train-{0..1}.tar"), str(folder / "val-0.tar")


def reduced(train_urls: str, val_urls: str) -> list[str]:
    """experiment=joint_ddim on CPU, at the reduced hub's widths, on 64² shapes shards."""
    return [
        "experiment=joint_ddim",
        f"data.train_urls='{train_urls}'",
        f"data.val_urls='{val_urls}'",
        "data.image_size=64",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.samples_per_epoch=8",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.max_epochs=1",
        "model.vision.resampler.width=64",
        "model.conditioner.width=64",
        "model.contrastive.embed_dim=32",
        "callbacks.sample_grid.steps=2",
        "callbacks.sample_grid.num_prompts=2",
        "callbacks.periodic_eval.every_n_steps=0",
        "logger=csv",
    ]


@pytest.mark.usefixtures("reduced_hub")
def test_hub_ids_train_resume_evaluate_and_export_to_the_standard_loaders(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, run = tmp_path / "root", tmp_path / "run"
    common = reduced(*shards(tmp_path / "shards"))
    done = run_entry_point("train.py", root, run, *common)  # bf16-mixed, as the experiment sets it
    assert done.returncode == 0, done.stderr[-4000:]
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    assert saved["global_step"] == 2
    assert saved["hyper_parameters"]["unet"]["name_or_path"] == SD15  # the hub id, as the user gave it

    # the resume and the export run in this process (the same task functions, without a second start-up)
    train(compose_config(root, [*common, f"paths.output_dir={run}", "trainer.max_epochs=2", "ckpt_path=last"]))
    assert torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"] == 4

    train_urls, val_urls = common[1].split("=", 1)[1], common[2].split("=", 1)[1]
    evaluation = tmp_path / "eval"
    done = run_entry_point(
        "evaluate.py", root, evaluation, f"ckpt_path={last}", "data=webdataset", f"data.train_urls={train_urls}",
        f"data.val_urls={val_urls}", "data.image_size=64", "data.num_workers=0", "eval.num_samples=2",
        "eval.steps=2", "eval.batch_size=2", "eval.fid.feature=null", "eval.probe=false",
        "trainer.precision=bf16-mixed",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((evaluation / "metrics.json").read_text())["metrics"]
    assert metrics["num_validation"] == 2 and "capdiff_image_text_score" in metrics
    samples = [json.loads(line) for line in (evaluation / "samples" / "index.jsonl").read_text().splitlines()]
    assert Image.open(evaluation / "samples" / samples[0]["file"]).size == (64, 64)

    export = tmp_path / "export"
    export_main([str(last), str(export)])
    ema = next(v for k, v in torch.load(last, weights_only=True, mmap=True)["callbacks"].items() if "EMA" in k)
    unet = UNet2DConditionModel.from_pretrained(export / "unet")
    assert unet.config.sample_size == 64
    assert torch.equal(unet.conv_in.weight, ema["shadow"]["diffusion.unet.conv_in.weight"])  # the EMA weights
    AutoencoderKL.from_pretrained(export / "vae")
    lm = AutoModelForCausalLM.from_pretrained(export / "llm")
    hub_lm = AutoModelForCausalLM.from_pretrained(GPT2)
    assert not any("lora" in n for n, _ in lm.named_parameters())  # GPT-2's LoRA merged into its own weights
    assert not torch.equal(lm.transformer.h[0].attn.c_attn.weight, hub_lm.transformer.h[0].attn.c_attn.weight)
    assert len(AutoTokenizer.from_pretrained(export / "llm")) == 50257
