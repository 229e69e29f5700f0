"""The CLIP vision tower's per-part switches: LoRA adapters (`model.vision.lora.*`) and gradient checkpointing
(`model.vision.gradient_checkpointing`), as the LLM and the UNet have them."""

from __future__ import annotations

import torch
from transformers import CLIPVisionModel

from capdiff.data.transforms import as_unit
from capdiff.export import export
from capdiff.train import build_datamodule, build_model

LORA = ("model.vision.lora.enabled=true", "model.vision.lora.target_modules=[q_proj,v_proj]")


def build(cfg):
    datamodule = build_datamodule(cfg)
    return build_model(cfg, datamodule).model, next(iter(datamodule.val_dataloader()))


def test_a_lora_vision_tower_trains_only_its_adapters_and_exports_them_merged(smoke_cfg, tmp_path) -> None:
    model, batch = build(smoke_cfg(*LORA, "model.vision.freeze=true"))
    tower = model.vision.tower
    trained = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(".q_proj." in n for n in trained) and any(".v_proj." in n for n in trained)
    pixels = model.vision.preprocess(as_unit(batch["pixels"]))
    with torch.no_grad():
        before = tower(pixel_values=pixels).last_hidden_state
    frozen = {n: p.detach().clone() for n, p in tower.named_parameters() if not p.requires_grad}

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.losses(batch, "train")["loss"].backward()
    optimizer.step()

    model.eval()
    with torch.no_grad():
        after = tower(pixel_values=pixels).last_hidden_state
    assert (after - before).abs().max() > 1e-4  # the adapters moved the tower's output
    assert all(torch.equal(p, frozen[n]) for n, p in tower.named_parameters() if n in frozen)

    exported = CLIPVisionModel.from_pretrained(export(model, tmp_path / "exported") / "vision").eval()
    assert not any("lora" in n for n in exported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(exported(pixel_values=pixels).last_hidden_state, after, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_of_the_vision_tower_gives_the_same_loss_and_gradients(smoke_cfg) -> None:
    plain, batch = build(smoke_cfg(*LORA))
    checkpointed, _ = build(smoke_cfg(*LORA, "model.vision.gradient_checkpointing=true"))
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.vision.tower.is_gradient_checkpointing and not plain.vision.tower.is_gradient_checkpointing
    results = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(0)  # the same noise, timesteps and caption dropout for both
        loss = model.losses(batch, "train")["loss"]
        loss.backward()
        grads = {n: p.grad for n, p in model.vision.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-5)
    assert grads.keys() == grads_ckpt.keys() and any("lora_" in n for n in grads)
    for name, grad in grads.items():
        assert grad is not None and grads_ckpt[name] is not None, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-5, msg=name)
