"""`model.optim.lr` is the learning rate of every part: the per-part groups scale it (`lr_scale`), so a sweep of
it moves the whole model, in every preset and in the Optuna search."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from capdiff.joint.spec import Optim, parse
from capdiff.train import build_datamodule, build_model
from capdiff.training.optimization import GROUPS, build_optimizer, group_lr
from tests.helpers import compose_config

PRESETS = [[], ["model=sd15_gpt2"], ["experiment=joint_ddim"], ["hparams_search=joint_optuna"]]


def lrs(tmp_path: Path, overrides: list[str]) -> dict[str, float]:
    optim = compose_config(tmp_path, overrides).model.optim
    return {part: group_lr(parse(Optim, optim, "model.optim"), part) for part in GROUPS}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: " ".join(p) or "default")
def test_every_parts_lr_follows_model_optim_lr(tmp_path: Path, preset: list[str]) -> None:
    base = lrs(tmp_path, [*preset, "model.optim.lr=0.001"])
    doubled = lrs(tmp_path, [*preset, "model.optim.lr=0.002"])
    assert all(doubled[part] == pytest.approx(2 * base[part]) for part in GROUPS), (base, doubled)


def test_the_optuna_search_moves_the_unets_lr_relative_to_the_rest(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["hparams_search=joint_optuna"])
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if "hydra" in cfg else None
    if params is not None:  # compose keeps the hydra node only when asked; the keys are checked either way
        assert {"model.optim.lr", "model.optim.groups.unet.lr_scale"} <= set(params)
    scaled = lrs(tmp_path, ["model.optim.groups.unet.lr_scale=3"])
    assert scaled["unet"] == pytest.approx(3 * scaled["llm"])


def test_an_absolute_group_lr_from_an_older_config_is_kept(tmp_path: Path) -> None:
    kept = lrs(tmp_path, ["+model.optim.groups.unet.lr=0.005", "model.optim.lr=0.1"])
    assert kept["unet"] == 0.005 and kept["llm"] == pytest.approx(0.1)


def test_the_optimizers_groups_take_the_scaled_rates(smoke_cfg) -> None:
    cfg = smoke_cfg("model.optim.lr=0.004")
    model = build_model(cfg, build_datamodule(cfg)).model
    optim = parse(Optim, cfg.model.optim, "model.optim")
    optimizer = build_optimizer(model, optim, None)["optimizer"]
    rates = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert rates["unet"] == pytest.approx(0.008) and rates["unet_no_decay"] == pytest.approx(0.008)
    assert rates["llm"] == pytest.approx(0.004) and rates["heads"] == pytest.approx(0.004)
