"""The `sd15_gpt2` preset's loading code, run on tiny models saved to folders (no download here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

from capdiff.models.tokenizer import build_byte_bpe, load_tokenizer
from capdiff.train import build_datamodule, build_model, check_config, train
from tests.helpers import compose_config


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
        "model.conditioner.width=32",
    ]


def test_the_pretrained_preset_loads_local_folders_and_trains_a_step(smoke_cfg, saved_models) -> None:
    cfg = smoke_cfg(*sd15_overrides(saved_models))
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule).model
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


def hub_overrides(*extra: str) -> list[str]:
    """The sd15_gpt2 preset by its hub ids (the reduced offline hub), at 64² and reduced head widths."""
    return [
        "model=sd15_gpt2",
        "data.image_size=64",
        "model.vision.resampler.width=64",
        "model.conditioner.width=64",
        "model.contrastive.embed_dim=32",
        *extra,
    ]


def without_unet(hub: Path) -> str:
    """A cached copy of the SD-1.5 repo that lacks its unet/ (a partial `hf download`), under another id."""
    source = hub / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    target = hub / "models--someone--sd15-without-unet"
    if not target.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("unet"))
    return "someone/sd15-without-unet"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # not in the local cache while offline: the download command, then the folder key
        ("model.llm.name_or_path=gpt2-medium", r"model.llm.name_or_path='gpt2-medium': not in the local Hugging Face "
         r"cache .*offline.*`hf download gpt2-medium --local-dir /models/gpt2-medium`.*model.llm.name_or_path=/models"),
        ("model.vision.name_or_path=openai/clip-vit-large-patch14", r"model.vision.name_or_path=.*not in the local"),
        # a part that may sit in a pipeline's sub-folder: the command fetches the whole repo, --include is a hint
        ("model.vae.name_or_path=stabilityai/sd-vae-ft-ema", r"`hf download stabilityai/sd-vae-ft-ema --local-dir "
         r"/models/sd-vae-ft-ema`.* \(of a whole pipeline, `--include 'vae/\*'` fetches only this part\)"),
        # no such folder
        ("model.vae.name_or_path=/nonexistent/sd-vae", r"model.vae.name_or_path='/nonexistent/sd-vae': no such folder"
         r".*hf download <hub id> --local-dir /nonexistent/sd-vae"),
        # a repo without the part: a VAE repo named as the UNet, a cached pipeline without unet/
        ("model.unet.name_or_path=stabilityai/sd-vae-ft-mse", r"holds AutoencoderKL, not UNet2DConditionModel"),
        ("model.unet.name_or_path=WITHOUT_UNET", r"its cached copy has no unet/config.json and no config.json at "
         r"its top.*hf download someone/sd15-without-unet --include 'unet/\*'"),
    ],
)  # fmt: skip
def test_a_part_that_cannot_be_found_fails_before_any_work_naming_the_key_and_the_fix(
    tmp_path: Path, reduced_hub: Path, override: str, message: str
) -> None:
    override = override.replace("WITHOUT_UNET", without_unet(reduced_hub))
    cfg = compose_config(tmp_path, hub_overrides(override, f"paths.output_dir={tmp_path / 'run'}"))
    with pytest.raises((OSError, ValueError), match=message):
        train(cfg)
    assert not (tmp_path / "data").exists()  # no shards, tokenizer, autoencoder or cache were built


def test_a_missing_repo_online_is_told_apart_from_one_not_cached(monkeypatch) -> None:
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from capdiff.models import hub

    def not_found(repo: str, filename: str, subfolder=None):
        response = httpx2.Response(404, request=httpx2.Request("GET", f"https://huggingface.co/{repo}"))
        raise RepositoryNotFoundError("404", response=response)

    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    with pytest.raises(OSError, match=r"model.unet.name_or_path='nobody/nothing': no such repo on the Hugging Face"):
        hub.locate("nobody/nothing", "model.unet.name_or_path", "unet")


def test_an_unreachable_hub_still_finds_the_top_of_a_cached_repo(monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from capdiff.models import hub

    def cached_top_only(repo: str, filename: str, subfolder=None):
        if subfolder:  # not cached, and the hub cannot be asked
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
        return f"/cache/{repo}/{filename}"

    monkeypatch.setattr(hub, "offline", lambda: False)  # no HF_HUB_OFFLINE, but no network either
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cached_top_only)
    assert hub.locate("stabilityai/sd-vae-ft-mse", "model.vae.name_or_path", "vae") == hub.Source(
        "stabilityai/sd-vae-ft-mse"
    )

    def nothing_cached(repo: str, filename: str, subfolder=None):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", nothing_cached)
    with pytest.raises(OSError, match=r"the hub could not be reached and the part is not in the local cache"):
        hub.locate("stabilityai/sd-vae-ft-mse", "model.vae.name_or_path", "vae")


def test_hub_ids_resolve_subfolders_and_the_unet_trains_at_any_multiple_of_its_downsampling(
    tmp_path: Path, reduced_hub: Path
) -> None:
    cfg = compose_config(tmp_path, hub_overrides())
    check_config(cfg)
    model = build_model(cfg, build_datamodule(cfg)).model
    unet = model.diffusion.unet
    assert unet.config.sample_size == 64 and model.diffusion.latent_size == 8  # SD-1.5's 512² default, at 64²
    assert model.diffusion.vae.config.sample_size == 256  # stabilityai/sd-vae-ft-mse, at the repo's top
    assert model.generate(["a red circle"], steps=2).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"data.image_size=72: .*multiple of 64: set data.image_size=64 or 128"):
        check_config(compose_config(tmp_path, hub_overrides("data.image_size=72")))


def test_a_caption_sequence_longer_than_the_llm_fails_at_construction(smoke_cfg) -> None:
    cfg = smoke_cfg("model.llm.config.n_positions=16", "model.llm.max_tokens=40")
    with pytest.raises(
        ValueError, match=r"image prefix \(21 tokens.* model.llm.max_tokens=40 = 61 exceeds the LLM's 16 positions"
    ):
        build_model(cfg, build_datamodule(cfg))
