"""The JointModule: parts, trainable parameters, dimension checks, and that it learns."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from capdiff.module import JointModule, warmup_cosine
from capdiff.train import build_datamodule, build_model
from tests.helpers import REPO


def build(cfg) -> tuple[JointModule, dict]:
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule)
    batch = next(iter(datamodule.val_dataloader()))
    return model, batch


def trainable(model: torch.nn.Module, prefix: str) -> set[str]:
    return {n for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad}


def test_the_joint_model_computes_every_term_and_their_weighted_sum(smoke_cfg) -> None:
    model, batch = build(smoke_cfg())
    out = model.losses(batch, "train")
    assert set(out) == {"diffusion_loss", "caption_loss", "contrastive_loss", "loss"}
    expected = out["diffusion_loss"] + out["caption_loss"] + 0.1 * out["contrastive_loss"]
    torch.testing.assert_close(out["loss"], expected)


def test_lora_leaves_only_adapters_trainable_and_freezing_freezes(smoke_cfg) -> None:
    cfg = smoke_cfg("model.llm.lora.enabled=true", "model.unet.lora.enabled=true", "model.vision.freeze=true")
    model, batch = build(cfg)
    llm = trainable(model, "llm.")
    assert llm and all("lora_" in n for n in llm)
    unet = trainable(model, "diffusion.unet.")
    assert unet and all("lora_" in n for n in unet)
    assert not trainable(model, "vision.tower.")
    assert trainable(model, "vision.resampler.")  # the resampler always trains
    assert not trainable(model, "diffusion.vae.")  # the first stage is frozen
    out = model.losses(batch, "train")
    out["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and n.startswith("llm."))


def test_unknown_lora_targets_name_the_key(smoke_cfg) -> None:
    with pytest.raises(ValueError, match=r"model.llm.lora.target_modules: \['q_proj'\] match no module"):
        build(smoke_cfg("model.llm.lora.enabled=true", "model.llm.lora.target_modules=[q_proj]"))


def test_a_zero_weight_term_is_not_computed_and_its_parts_get_no_optimizer_state(smoke_cfg) -> None:
    model, batch = build(smoke_cfg("model.loss.weights.diffusion=0", "model.loss.weights.contrastive=0"))
    assert model.diffusion is None and model.conditioner is None and model.logit_scale is None
    assert set(model.losses(batch, "train")) == {"caption_loss", "loss"}
    assert not trainable(model, "vision.to_embed")
    assert set(model.param_groups()) == {"llm", "vision", "heads"}

    model, batch = build(smoke_cfg("model.loss.weights.caption=0", "model.loss.weights.contrastive=0"))
    assert model.vision is None and model.logit_scale is None
    assert set(model.losses(batch, "train")) == {"diffusion_loss", "loss"}
    assert not trainable(model, "conditioner.to_embed")
    grouped = {n for named in model.param_groups().values() for n, _ in named}
    assert grouped == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("conditioner.to_embed") for n in grouped)


def test_without_diffusion_grad_the_diffusion_loss_trains_the_connector_but_not_the_llm(smoke_cfg) -> None:
    model, batch = build(smoke_cfg("model.conditioner.diffusion_grad=false"))
    model.losses(batch, "train")["diffusion_loss"].backward()
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is not None for p in model.conditioner.connector.parameters())
    assert trainable(model, "llm.")  # the captioner and contrastive losses still train it

    # experiment=diffusion_only laid over the smoke sizes (composing it alone would build the default's data)
    diffusion_only = OmegaConf.load(REPO / "conf" / "experiment" / "diffusion_only.yaml")
    model, _ = build(OmegaConf.merge(smoke_cfg(), diffusion_only))
    assert not trainable(model, "llm.")  # nothing trains it: no optimizer state, no DDP sync
    assert "llm" not in model.param_groups()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.unet.config.in_channels=3", r"model.unet.config.in_channels=3 but the VAE .* 4-channel latents"),
        ("model.unet.config.sample_size=8", r"data.image_size=32 gives 16×16 latents .*config.sample_size=16"),
        ("model.conditioner.out_dim=64", r"model.conditioner.out_dim=64 but model.unet.config.cross_attention_dim=32"),
        ("model.conditioner.in_dim=48", r"model.conditioner.in_dim=48 but the LLM \(model.llm\) has hidden size 32"),
    ],
)
def test_dimension_mismatches_fail_at_construction_naming_both_keys(smoke_cfg, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(smoke_cfg(override))


def test_a_few_steps_on_one_batch_lower_every_term(smoke_cfg) -> None:
    torch.manual_seed(0)
    model, batch = build(smoke_cfg("model.caption_dropout=0"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = {k: v.item() for k, v in model.losses(batch, "val").items()}
    for _ in range(40):
        loss = model.losses(batch, "train")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = {k: v.item() for k, v in model.losses(batch, "val").items()}
    # The v-prediction loss (the default) keeps the high-noise steps, where the image must come from the caption
    # alone; it falls slower than the other terms (40 steps: about 0.85×).
    limits = {"caption_loss": 0.8, "contrastive_loss": 0.8, "diffusion_loss": 0.9}
    for term, limit in limits.items():
        assert last[term] < limit * first[term], (term, first[term], last[term])


def test_the_schedule_reads_a_lazy_length_once_and_only_when_the_decay_starts() -> None:
    calls = []

    def length() -> int:
        calls.append(1)
        return 50

    lazy, fixed = warmup_cosine(10, length, 0.1), warmup_cosine(10, 50, 0.1)
    assert [lazy(step) for step in range(11)] == [fixed(step) for step in range(11)] and not calls
    assert [lazy(step) for step in range(11, 60)] == [fixed(step) for step in range(11, 60)] and len(calls) == 1
    assert fixed(50) == pytest.approx(0.1) and fixed(10) == 1.0
