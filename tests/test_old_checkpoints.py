"""A checkpoint written by capdiff 0.1 (tests/data/README.md), before the joint model became a plain module
inside a LightningModule, still loads for inference with the same outputs and still resumes training."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from capdiff.checkpoints.portable import load_checkpoint, read_checkpoint
from capdiff.train import train
from tests.helpers import compose_config

DATA = Path(__file__).parent / "data"
OLD = DATA / "joint-v0.1-smoke.ckpt"
# the overrides the checkpoint was trained with (with experiment=smoke, trainer.max_epochs=2)
OLD_RUN = [
    "experiment=smoke",
    "callbacks.periodic_eval=null",
    "model.unet.config.block_out_channels=[8,16]",
    "model.unet.config.norm_num_groups=4",
    "model.unet.config.attention_head_dim=4",
    "model.unet.config.cross_attention_dim=16",
    "model.vae.first_stage.config.block_out_channels=[8,8]",
    "model.vae.first_stage.config.norm_num_groups=4",
    "model.llm.config.n_embd=16",
    "model.vision.config.hidden_size=16",
    "model.vision.config.intermediate_size=32",
    "model.vision.resampler.width=16",
    "model/conditioner/connector=mlp",  # written before connectors were a choice: the MLP, 16 wide
    "model.conditioner.width=16",
    "model.conditioner.lexical=false",  # written before the lexical table
    "model.contrastive.embed_dim=8",
    "data.shapes.num_train=64",
]


def test_the_old_layout_is_what_this_test_keeps() -> None:
    checkpoint = read_checkpoint(OLD)
    assert not any(k.startswith("model.") for k in checkpoint["state_dict"])
    assert "nonfinite" in checkpoint["hyper_parameters"]


def test_an_old_checkpoint_captions_and_generates_as_it_did() -> None:
    expected = torch.load(DATA / "joint-v0.1-smoke.expected.pt", weights_only=True)
    model, ema = load_checkpoint(OLD)
    assert ema == expected["ema"]
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert model.caption(pixels) == expected["captions"]
    generated = model.generate(["a red circle", "a blue square"], steps=3, seed=0, sampler="ddim")
    torch.testing.assert_close(generated, expected["generated"], atol=1e-5, rtol=0)
    assert torch.isfinite(model.generate(["a red circle"], steps=3)).all()  # and the default sampler samples it


def test_an_old_checkpoint_resumes_at_its_step(tmp_path: Path) -> None:
    """Its weights, optimizer state, EMA and loop counters carry on: 8 steps done, 4 more for epoch 3."""
    run = tmp_path / "run"
    cfg = compose_config(tmp_path, [*OLD_RUN, f"paths.output_dir={run}", f"ckpt_path={OLD}", "trainer.max_epochs=3"])
    train(cfg)
    resumed = read_checkpoint(run / "checkpoints" / "last.ckpt")
    old = read_checkpoint(OLD)
    assert resumed["global_step"] == 12
    assert resumed["epoch"] == 2
    ema_key = next(k for k in resumed["callbacks"] if k.startswith("EMA"))
    assert resumed["callbacks"][ema_key]["updates"] == old["callbacks"][ema_key]["updates"] + 4
    steps = {float(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert steps == {12.0}  # AdamW's own count carried on from the old optimizer state
    # the tokenizer and first-stage autoencoder came from the checkpoint, not from a data cache
    assert (run / "parts" / "tokenizer").is_dir() and (run / "parts" / "autoencoder" / "config.json").is_file()


def test_resuming_a_checkpoint_from_before_a_preset_change_says_which_key_to_set(tmp_path: Path) -> None:
    """Today's smoke preset has the lexical table, the old checkpoint does not: the resume stops before
    training, naming the key, instead of failing inside Lightning's strict load."""
    todays = [o for o in OLD_RUN if "lexical" not in o]
    run = tmp_path / "run"
    cfg = compose_config(tmp_path, [*todays, f"paths.output_dir={run}", f"ckpt_path={OLD}", "trainer.max_epochs=3"])
    with pytest.raises(ValueError, match=r"predates the lexical table: add model\.conditioner\.lexical=false"):
        train(cfg)
    assert not (run / "checkpoints").exists()
    cfg = compose_config(tmp_path, [*todays, f"paths.output_dir={run}", f"init_from={OLD}", "trainer.max_epochs=1"])
    with pytest.raises(ValueError, match=r"init_from=.*predates the lexical table"):
        train(cfg)


def test_an_old_checkpoint_starts_a_new_run_with_init_from(tmp_path: Path) -> None:
    class Captured(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.step = trainer.global_step
            self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    captured = Captured()
    run = tmp_path / "run"
    cfg = compose_config(tmp_path, [*OLD_RUN, f"paths.output_dir={run}", f"init_from={OLD}", "trainer.max_epochs=1"])
    train(cfg, extra_callbacks=[captured])
    assert captured.step == 0
    for name, value in read_checkpoint(OLD)["state_dict"].items():
        # the same values; the logit scale, a scalar then, is a one-element vector now
        torch.testing.assert_close(captured.state[name], value.reshape(captured.state[name].shape))
