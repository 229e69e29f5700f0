"""The GAN baseline (experiment=text_gan) end to end: it trains on the shapes and on shards, its checkpoint
generates through the Pipeline and evaluates through evaluate.py, it resumes, and two ranks stay in step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from capdiff.checkpoints.portable import read_checkpoint
from capdiff.train import train
from tests.helpers import compose_config, good_members, run_entry_point, write_tar

# the smoke experiment's data and text-side sizes (its tokenizer is the session's smoke one), a small GAN
GAN_SMOKE = [
    "experiment=text_gan",
    "data.batch_size=8",
    "data.val_batch_size=8",
    "data.num_workers=0",
    "data.samples_per_epoch=32",
    "data.shapes.num_train=256",
    "data.shapes.num_val=16",
    "model.text.llm.build_tokenizer.vocab_size=300",
    "model.text.llm.config.n_embd=32",
    "model.text.llm.config.n_layer=1",
    "model.text.llm.config.n_head=2",
    "model.text.vision.config.hidden_size=32",
    "model.text.vision.config.intermediate_size=64",
    "model.text.vision.config.num_hidden_layers=1",
    "model.text.vision.config.num_attention_heads=2",
    "model.text.vision.resampler.width=32",
    "model.text.vision.resampler.heads=2",
    "model.text.conditioner.width=32",
    "model.text.contrastive.embed_dim=16",
    "model.gan.base_channels=8",
    "callbacks.sample_grid.steps=3",
    "callbacks.sample_grid.num_prompts=4",
    "callbacks.periodic_eval.num_samples=4",
    "trainer.max_epochs=1",
]


@pytest.fixture
def gan_cfg(smoke_root: Path, tmp_path: Path):
    def make(*overrides: str):
        base = GAN_SMOKE if "data=webdataset" not in overrides else [o for o in GAN_SMOKE if "data.shapes" not in o]
        return compose_config(smoke_root, [*base, f"paths.output_dir={tmp_path / 'run'}", *overrides])

    return make


def test_the_gan_trains_and_its_checkpoint_generates_and_evaluates(gan_cfg, smoke_root: Path, tmp_path: Path) -> None:
    from capdiff.pipeline import Pipeline

    metrics = train(gan_cfg("trainer.max_epochs=2"))
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("val/d_loss", "val/g_loss", "train/gp_loss"))
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(path)
    assert checkpoint["global_step"] == 16  # 2 epochs × 4 batches × 2 optimizer steps (G and D)
    assert checkpoint["capdiff_parts"]["recipe"] == "text_gan"
    assert (tmp_path / "run" / "samples" / "generated_final.png").is_file()

    pipe = Pipeline.from_checkpoint(path, device="cpu")
    images = pipe.generate(["a large red circle", "a small blue square"], seed=3)
    assert [im.size for im in images] == [(32, 32)] * 2
    again = pipe.generate(["a large red circle", "a small blue square"], seed=3)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again, strict=True))  # seeded
    assert images[0].tobytes() != images[1].tobytes()
    with pytest.raises(RuntimeError, match="no captioner"):
        pipe.caption(images[0])
    filtered = pipe.generate(["a large red circle", "a small blue square"], seed=3, postprocess=["median"])
    assert [im.size for im in filtered] == [(32, 32)] * 2 and filtered[0].tobytes() != images[0].tobytes()

    done = run_entry_point(
        "evaluate.py", smoke_root, tmp_path / "eval", f"ckpt_path={path}", "data.num_workers=0",
        "eval.num_samples=8", "eval.batch_size=4", "eval.postprocess=[median]",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    scores = report["metrics"]
    assert 0 <= scores["probe_attr/mean"] <= 1 and "fd_probe" in scores
    assert 0 <= scores["median/probe_attr/mean"] <= 1 and "median/fd_probe" in scores  # with post-processing
    assert not any(k.startswith(("bleu", "cider", "rouge", "caption_attr", "recall")) for k in scores)
    assert set(report["settings"]["not_applicable"]) == {"captions", "retrieval"}  # said, not reported as 0


@pytest.mark.slow  # with `make test-slow` (CI runs it)
def test_the_gan_trains_on_shards_in_bf16(gan_cfg, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    for n in range(2):
        write_tar(shards / f"train-{n}.tar", good_members("t", 8, 8 * n))
    write_tar(shards / "val-0.tar", good_members("v", 8))
    cfg = gan_cfg(
        "data=webdataset", f"data.train_urls='{shards}/train-{{0..1}}.tar'", f"data.val_urls={shards}/val-0.tar",
        "data.samples_per_epoch=16", "model.text.llm.build_tokenizer.vocab_size=280", "callbacks.periodic_eval=null",
        "trainer.precision=bf16-mixed",  # under autocast; the penalty's norm is taken in float32
    )  # fmt: skip
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/g_loss"]))
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 4


@pytest.mark.slow  # with `make test-slow` (CI runs it)
def test_a_resumed_gan_run_goes_on_with_its_steps_optimizers_and_ema(gan_cfg, tmp_path: Path) -> None:
    quiet = ["callbacks.sample_grid=null", "callbacks.periodic_eval=null"]
    train(gan_cfg(*quiet))
    first = Path(shutil.copy(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "first.ckpt"))
    train(gan_cfg(*quiet, f"ckpt_path={first}", "trainer.max_epochs=2"))
    resumed = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 16
    for state in resumed["optimizer_states"]:  # G's and D's Adam each took one step per batch, 8 in all
        assert {float(s["step"]) for s in state["state"].values()} == {8.0}
    ema = next(v for k, v in resumed["callbacks"].items() if k.startswith("EMA"))
    assert ema["updates"] == 8 and all(k.startswith(("generator.", "text.")) for k in ema["shadow"])


@pytest.mark.slow  # with `make test-slow` (CI runs it)
def test_two_ranks_step_both_networks_and_keep_the_same_weights(smoke_root: Path, tmp_path: Path) -> None:
    record = ["+callbacks.final._target_=tests.recording.FinalWeights", f"+callbacks.final.out={tmp_path / 'w'}"]
    overrides = [*GAN_SMOKE, "trainer=ddp_cpu", "trainer.devices=2", "callbacks.sample_grid=null",
                 "callbacks.periodic_eval=null", *record]  # fmt: skip
    done = run_entry_point("train.py", smoke_root, tmp_path / "run", *overrides)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / "w" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4  # 32 samples over 2 ranks × 8: 2 batches
    for name, value in ranks[0]["last"].items():
        # the same weights on both ranks: every gradient (the penalty's and the text side's included) was synced
        assert torch.equal(value, ranks[1]["last"][name]), name
    moved = {n.split(".")[0] for n, v in ranks[0]["last"].items() if not torch.equal(v, ranks[0]["first"][n])}
    assert moved == {"generator", "discriminator", "head", "text"}


class PoisonDiscriminator(pl.Callback):
    """Makes the discriminator's loss NaN in the second batch, and keeps D's weights around that batch."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        losses = model.discriminator_losses

        def poisoned(*args, **kwargs):
            out = losses(*args, **kwargs)
            if trainer.global_step == 2:  # batch 1's D step (each batch takes a D and a G step)
                out["d_loss"] = out["d_loss"] * float("nan")
            return out

        model.discriminator_losses = poisoned

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            self.before = {n: p.detach().clone() for n, p in pl_module.model.discriminator.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            self.after = {n: p.detach().clone() for n, p in pl_module.model.discriminator.named_parameters()}


@pytest.mark.slow  # with `make test-slow` (CI runs it)
def test_a_nonfinite_discriminator_loss_skips_its_step_and_training_goes_on(gan_cfg, tmp_path: Path) -> None:
    from capdiff.training.nonfinite import find_guard

    poison = PoisonDiscriminator()
    seen = {}

    class Guard(pl.Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            seen["skipped"] = find_guard(trainer).skipped

    train(gan_cfg("callbacks.sample_grid=null", "callbacks.periodic_eval=null"), extra_callbacks=[poison, Guard()])
    assert seen["skipped"] == 1
    assert all(torch.equal(poison.before[n], v) for n, v in poison.after.items())  # D's step was skipped
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
