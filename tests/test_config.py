"""Every config in every group composes, and what can be built on this machine is built."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from capdiff.artifacts import joint_config
from capdiff.data import ImageTextDataModule, ShapesDataModule
from capdiff.train import instantiate_data, prepare_datamodule, train
from tests.helpers import REPO, good_members, write_tar

CONF = REPO / "conf"
GROUPS = [
    "data",
    "model",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "extras",
    "debug",
    "experiment",
    "local",
    "hydra/launcher",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(tmp_path: Path, overrides: list[str], config: str = "train"):
    base = [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.work_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=base + overrides)


# data=from_checkpoint is evaluate.py's default (the checkpoint's own data), not a data source to train on
CASES = [(g, o) for g in GROUPS for o in options(g) if (g, o) != ("data", "from_checkpoint")]
PRESETS = [f"experiment={e}" for e in options("experiment")] + [f"debug={d}" for d in options("debug")]


@pytest.mark.parametrize("source", ["synthetic", "webdataset"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_every_data_source(tmp_path: Path, preset: str, source: str) -> None:
    overrides = [preset, f"data={source}"]
    if source == "webdataset":
        for n in range(8):  # enough shards for every preset's workers
            write_tar(tmp_path / "shards" / f"{n}.tar", good_members(f"s{n}-", 2))
        urls = f"{tmp_path}/shards/{{0..7}}.tar"
        overrides += [f"data.train_urls='{urls}'", f"data.val_urls='{urls}'"]
    cfg = compose_train(tmp_path, overrides)
    OmegaConf.resolve(cfg)
    datamodule = instantiate_data(cfg.data)  # as train.py builds it
    assert isinstance(datamodule, ShapesDataModule) == (source == "synthetic")
    if source == "webdataset":
        prepare_datamodule(datamodule)  # the shards checked and the streams built
        assert len(datamodule.train_urls) == 8 and datamodule.train_stream is not None


def test_training_refuses_the_evaluation_only_data_default(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data=from_checkpoint is evaluate\.py's default"):
        train(compose_train(tmp_path, ["data=from_checkpoint"]))


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_config_composes_and_builds(tmp_path: Path, group: str, option: str) -> None:
    cfg = compose_train(tmp_path, [f"{group}={option}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if cfg.data.train_urls is None:  # data=webdataset: the user names the shards
        shard = str(write_tar(tmp_path / "shards" / "a.tar", good_members("k", 4)))
        cfg.data.train_urls, cfg.data.val_urls, cfg.data.num_workers = shard, shard, 0

    if cfg.data.get("shapes"):
        cfg.data.shapes.num_train, cfg.data.shapes.num_val = 64, 16
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    assert isinstance(datamodule, ImageTextDataModule)
    assert isinstance(datamodule, ShapesDataModule) == (cfg.data._target_.endswith("ShapesDataModule"))

    # the model needs its data-derived parts or downloads: the test_module/test_pretrained tests build it
    assert issubclass(hydra.utils.get_class(cfg.model._target_), pl.LightningModule)
    joint, _ = joint_config(cfg.model)  # the GAN's text side is a joint model config too
    assert set(joint.loss.weights) == {"diffusion", "caption", "contrastive"}

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    assert all(isinstance(c, pl.Callback) for c in callbacks)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    assert all(isinstance(lg, pl.loggers.Logger) for lg in loggers)

    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        return  # composed and resolved above; building a GPU trainer needs a GPU
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_evaluate_config_composes(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["ckpt_path=/some/last.ckpt"], config="evaluate")
    OmegaConf.resolve(cfg)
    assert cfg.task_name == "evaluate"
    assert cfg.ckpt_path == "/some/last.ckpt"


def test_experiment_and_debug_come_last_and_override(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["experiment=smoke", "debug=default"])
    assert cfg.data.num_workers == 0  # both set it
    assert cfg.data.samples_per_epoch == 64  # debug, listed after experiment, wins
    assert cfg.data.batch_size == 8  # from the experiment


@pytest.mark.parametrize(
    ("experiment", "weights"),
    [("caption_only", (0, 1, 0)), ("diffusion_only", (1, 0, 0)), ("joint_ddim", (1, 1, 0.1))],
)
def test_experiments_set_the_loss_terms(tmp_path: Path, experiment: str, weights: tuple) -> None:
    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    assert tuple(cfg.model.loss.weights[t] for t in ("diffusion", "caption", "contrastive")) == weights


def test_joint_ddim_is_the_pretrained_recipe(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["experiment=joint_ddim"])
    assert cfg.model.llm.name_or_path == "gpt2"
    assert cfg.model.vae.name_or_path == "stabilityai/sd-vae-ft-mse"
    assert cfg.model.unet.name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.trainer.accumulate_grad_batches == 1  # in every trainer config, for `trainer.accumulate_grad_batches=4`
    assert cfg.data.image_size == 256
    assert cfg.trainer.accelerator == "gpu"


def test_shapes_paths_follow_image_size(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["data.image_size=64"])
    assert "/shapes-64px-seed0/train-{000000..000007}.tar" in str(cfg.data.train_urls)
    assert str(cfg.data.train_urls).startswith(str(tmp_path / "data"))


@pytest.mark.parametrize(
    ("accelerator", "cuda", "bf16", "expected"),
    [
        ("auto", False, False, "32-true"),
        ("cpu", True, True, "32-true"),
        ("auto", True, True, "bf16-mixed"),
        ("gpu", True, False, "16-mixed"),
    ],
)
def test_the_default_precision_follows_the_hardware(monkeypatch, accelerator, cuda, bf16, expected) -> None:
    from capdiff.config import auto_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert auto_precision(accelerator) == expected


def test_training_and_evaluation_pick_the_hardware_by_default(tmp_path: Path) -> None:
    for config in ("train", "evaluate"):
        cfg = compose_train(tmp_path, [], config=config)
        assert cfg.trainer.accelerator == "auto"
        assert cfg.trainer.precision == ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    assert compose_train(tmp_path, [])["trainer"]["max_time"] == "00:00:06:00"  # the CPU default's budget
