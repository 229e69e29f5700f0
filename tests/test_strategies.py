"""`trainer=fsdp`: what can be checked without GPUs (Lightning runs FSDP only on CUDA)."""

from __future__ import annotations

import hydra
import pytest
from pytorch_lightning.strategies import FSDPStrategy

from capdiff.strategies import DEFAULT_WRAP, fsdp, import_class
from capdiff.train import build_datamodule, build_model


def test_the_fsdp_config_builds_lightnings_strategy_with_every_block_as_a_unit(smoke_cfg) -> None:
    cfg = smoke_cfg("trainer=fsdp")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True  # frozen and trained weights share units; names kept
    assert cfg.trainer.precision == "bf16-mixed"


def test_the_default_fsdp_units_are_the_blocks_capdiffs_models_are_made_of(smoke_cfg) -> None:
    cfg = smoke_cfg()
    model = build_model(cfg, build_datamodule(cfg)).model
    present = {type(m) for m in model.modules()}
    for path in DEFAULT_WRAP:  # a renamed block class would silently stop sharding: fail here instead
        assert import_class(path) in present, path


def test_a_wrong_block_class_names_the_key_and_an_example() -> None:
    with pytest.raises(ValueError, match=r"trainer.strategy.wrap: 'transformers.Nope' .*GPT2Block"):
        fsdp(wrap=["transformers.Nope"])
