"""Every config in every group composes, and what can be built on this machine is built."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from capdiff.data import ImageTextDataModule, ShapesDataModule
from tests.helpers import REPO, good_members, write_tar

CONF = REPO / "conf"
GROUPS = [
    "data",
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


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_config_composes_and_builds(tmp_path: Path, group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option == "webdataset":
        shard = write_tar(tmp_path / "shards" / "a.tar", good_members("k", 4))
        overrides += [f"data.train_urls={shard}", f"data.val_urls={shard}", "data.num_workers=0"]
    cfg = compose_train(tmp_path, overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves

    if cfg.data.get("shapes"):
        cfg.data.shapes.num_train, cfg.data.shapes.num_val = 64, 16
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    assert isinstance(datamodule, ImageTextDataModule)
    assert isinstance(datamodule, ShapesDataModule) == (cfg.data._target_.endswith("ShapesDataModule"))

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
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


def test_shapes_paths_follow_image_size(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["data.image_size=64"])
    assert "/shapes-64px-seed0/train-{000000..000007}.tar" in str(cfg.data.train_urls)
    assert str(cfg.data.train_urls).startswith(str(tmp_path / "data"))
