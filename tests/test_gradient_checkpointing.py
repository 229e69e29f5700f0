"""Gradient checkpointing of the LLM and the vision tower is never reentrant, whatever the installed
transformers defaults to (4.x: reentrant, which cuts a frozen LLM's LoRA gradients in the text-only pass), and a
switch that cannot do anything says so."""

from __future__ import annotations

import logging

from transformers import PreTrainedModel

from capdiff.train import build_datamodule, build_model

LLM_LORA = ("model.llm.freeze=true", "model.llm.lora.enabled=true", "model.llm.lora.target_modules=[c_attn]")


def test_the_llm_checkpoints_without_reentry_and_its_lora_adapters_still_learn(smoke_cfg, monkeypatch) -> None:
    asked = []
    enable = PreTrainedModel.gradient_checkpointing_enable
    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable",
                        lambda self, kwargs=None: asked.append(kwargs) or enable(self, kwargs))  # fmt: skip
    cfg = smoke_cfg(*LLM_LORA, "model.llm.gradient_checkpointing=true")
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule).model
    assert asked == [{"use_reentrant": False}] and model.llm.lm.is_gradient_checkpointing
    captions = next(iter(datamodule.val_dataloader()))["captions"]
    model.train()
    # the text-only pass (the UNet's condition), whose input embeddings need no gradient: the adapters still
    # learn from it (here peft also makes the embeddings' output require grad, so this half holds either way;
    # the kwargs above are what transformers 4.x would otherwise get wrong)
    model.encode_text(captions)["cond"].square().mean().backward()
    lora_b = {n: p.grad for n, p in model.llm.named_parameters() if "lora_B" in n}
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())


def test_checkpointing_a_frozen_vision_tower_without_lora_is_reported(smoke_cfg, caplog) -> None:
    cfg = smoke_cfg("model.vision.freeze=true", "model.vision.gradient_checkpointing=true")
    with caplog.at_level(logging.WARNING, logger="capdiff.joint.model"):
        build_model(cfg, build_datamodule(cfg))
    assert "model.vision.gradient_checkpointing=true does nothing here" in caplog.text
