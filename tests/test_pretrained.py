"""The `sd15_gpt2` preset's loading code, run on tiny models saved to folders (no download here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

from capdiff.models.tokenizer import build_byte_bpe, load_tokenizer
from capdiff.train import build_datamodule, build_model


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """GPT-2, a CLIP vision tower, an SD-style VAE and UNet, tiny, each saved the way the hub serves them."""
    root = tmp_path_factory.mktemp("models")
    gpt2 = build_byte_bpe(["a red circle", "a blue square on green", "a small triangle"] * 20, root / "gpt2", 300)
    tokenizer = load_tokenizer(str(gpt2))
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=1,
            n_head=2,
            n_positions=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(gpt2)
    clip = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    CLIPVisionModel(clip).save_pretrained(root / "clip")
    AutoencoderKL(
        block_out_channels=(16, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).save_pretrained(root / "sd-vae" / "vae")
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
    )
    unet.save_pretrained(root / "sd" / "unet")
    return {"gpt2": gpt2, "clip": root / "clip", "vae": root / "sd-vae", "unet": root / "sd"}


def sd15_overrides(models: dict[str, Path]) -> list[str]:
    return [
        "model=sd15_gpt2",
        f"model.llm.name_or_path={models['gpt2']}",
        f"model.vision.name_or_path={models['clip']}",
        f"model.vae.name_or_path={models['vae']}",
        f"model.unet.name_or_path={models['unet']}",
        "model.vision.resampler.width=32",
        "model.vision.resampler.heads=2",
        "model.conditioner.hidden=32",
    ]


def test_the_pretrained_preset_loads_local_folders_and_trains_a_step(smoke_cfg, saved_models) -> None:
    cfg = smoke_cfg(*sd15_overrides(saved_models))
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule)
    assert model.llm.lm.config.n_embd == 32
    # the preset's choices: frozen GPT-2 base with LoRA, frozen CLIP tower, frozen VAE, trainable UNet
    assert all("lora_" in n for n, p in model.llm.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in model.vision.tower.parameters())
    assert not any(p.requires_grad for p in model.diffusion.vae.parameters())
    assert all(p.requires_grad for p in model.diffusion.unet.parameters())
    batch = next(iter(datamodule.train_dataloader()))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.losses(batch, "train")["loss"].backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_" in n for n in changed) and any(n.startswith("diffusion.unet.") for n in changed)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("model.llm.name_or_path", "gpt2"),
        ("model.vision.name_or_path", "openai/clip-vit-base-patch16"),
        ("model.vae.name_or_path", "stabilityai/sd-vae-ft-mse"),
    ],
)
def test_a_hub_name_offline_fails_fast_saying_how_to_pass_a_folder(smoke_cfg, saved_models, key, name) -> None:
    overrides = [o for o in sd15_overrides(saved_models) if not o.startswith(f"{key}=")]
    cfg = smoke_cfg(*overrides, f"{key}={name}")
    with pytest.raises(OSError, match=rf"{key}='{name}': the hub is offline here.*pass the local folder"):
        build_model(cfg, build_datamodule(cfg))


def test_a_caption_sequence_longer_than_the_llm_fails_at_construction(smoke_cfg) -> None:
    cfg = smoke_cfg("model.llm.config.n_positions=16", "model.llm.max_tokens=40")
    with pytest.raises(
        ValueError, match=r"image prefix \(21 tokens.* model.llm.max_tokens=40 = 61 exceeds the LLM's 16 positions"
    ):
        build_model(cfg, build_datamodule(cfg))
