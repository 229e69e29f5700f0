"""What a training run prints: the end-of-run summary, a model summary without an empty FLOPs count, and none of
the library notices that do not apply to capdiff."""

from __future__ import annotations

import json
import logging
import shlex
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from capdiff.evaluation.callback import PeriodicEval
from capdiff.summary import ModelSummary, run_summary
from capdiff.training.samples import SampleGrid
from tests.helpers import run_entry_point

# What the libraries print, as they print it (not capdiff's filter patterns).
KNOWN_NOTICES = (
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "Your `IterableDataset` has `__len__` defined",
    "Total length of `DataLoader` across ranks is zero",
    "module(s) in eval mode at the start of training",
    "The attention mask and the pad token id were not set",
    "The attention mask is not set",
    "We strongly recommend passing in an `attention_mask`",
    "Total FLOPs",
    "💡 Tip: For seamless cloud",
    "Trainer already configured with model summary callbacks",
)


def fake_run(tmp_path: Path, best: str = "", last: str = "", grid: SampleGrid | None = None, peval=None):
    run = tmp_path / "my run"
    checkpoint = ModelCheckpoint(dirpath=run / "checkpoints")
    checkpoint.best_model_path, checkpoint.last_model_path = best, last
    callbacks = [checkpoint, *(c for c in (grid, peval) if c is not None)]
    trainer = SimpleNamespace(
        callbacks=callbacks, default_root_dir=str(run), global_step=40, current_epoch=2, is_global_zero=True
    )
    return OmegaConf.create({"paths": {"output_dir": str(run)}}), trainer, run


def test_the_summary_names_the_run_its_checkpoints_grids_figures_and_next_commands(tmp_path: Path) -> None:
    run = tmp_path / "my run"
    samples = run / "samples"
    samples.mkdir(parents=True)
    for name in ("generated_epoch000.png", "captions_epoch000.png", "generated_final.png", "captions_final.png"):
        (samples / name).write_bytes(b"png")  # written in this order: the final ones are the newest
    (samples / "captions_final.jsonl").write_text(
        json.dumps({"key": "k", "reference": "a small blue square at the top left", "generated": "x"}) + "\n"
    )
    peval = PeriodicEval()
    peval.last_metrics = {"peval/bleu4": 0.25, "peval/probe_attr/mean": 0.5, "peval/probe_attr/shape": 0.75}
    best, last = str(run / "checkpoints" / "epoch001.ckpt"), str(run / "checkpoints" / "last.ckpt")
    cfg, trainer, run = fake_run(tmp_path, best, last, SampleGrid(), peval)
    metrics = {"val/loss": 1.23456, "val/caption_loss": 2.0, "train/loss": 9.0}

    text = run_summary(cfg, trainer, metrics)
    lines = text.splitlines()
    assert f"run folder      {run}" in lines
    assert "trained         40 steps over 2 epoch(s)" in lines
    assert f"best checkpoint {best}" in lines and f"last checkpoint {last}" in lines
    assert f"sample grids    {samples}: captions_final.png, generated_final.png (4 grids in all)" in lines
    assert "validation      val/caption_loss 2  val/loss 1.235" in lines  # val/* only, not train/*
    assert "periodic eval   peval/bleu4 0.25  peval/probe_attr/mean 0.5" in lines  # per-attribute ones left out
    ckpt = shlex.quote(best)  # the run folder's name has a space: every path is quoted for the shell
    assert lines[-5:] == [
        "next:",
        f"  python evaluate.py ckpt_path={ckpt}",
        f"  capdiff caption --ckpt {ckpt} IMG",
        f"  capdiff generate --ckpt {ckpt} 'a small blue square at the top left' -n 4 "
        f"--out {shlex.quote(str(run / 'generated'))}",
        f"  capdiff demo {ckpt}",
    ]


def test_without_a_best_checkpoint_the_commands_use_the_last_and_without_any_there_are_none(tmp_path: Path) -> None:
    last = str(tmp_path / "last.ckpt")
    cfg, trainer, _ = fake_run(tmp_path, last=last, grid=SampleGrid(prompts=["a red circle"]))
    text = run_summary(cfg, trainer, {})
    assert f"last checkpoint {last}" in text and "best checkpoint" not in text
    assert f"capdiff demo {last}" in text and "'a red circle' -n 4" in text
    assert "validation" not in text and "periodic eval" not in text and "sample grids" not in text

    cfg, trainer, _ = fake_run(tmp_path)
    text = run_summary(cfg, trainer, {})
    assert "checkpoints     none written" in text and "next:" not in text


def test_the_model_summary_leaves_out_flops_only_when_none_were_counted() -> None:
    from rich import get_console

    data = [(" ", ["0", "1"]), ("Name", ["llm", "unet"]), ("Type", ["LM", "UNet"]), ("Params", ["1 K", "2 K"])]
    data += [("Mode", ["train", "train"]), ("FLOPs", ["0", "0"])]
    totals = (3000, 2000, 0.012, {"train": 2, "eval": 0})
    with get_console().capture() as captured:
        ModelSummary.summarize(data, *totals, total_flops=0)
    shown = captured.get()
    assert "FLOPs" not in shown
    assert "unet" in shown and "Trainable params: 2.0 K" in shown and "Modules in eval mode: 0" in shown
    with get_console().capture() as captured:
        ModelSummary.summarize([*data[:-1], ("FLOPs", ["5 M", "7 M"])], *totals, total_flops=12_000_000)
    assert "Total FLOPs: 12.0 M" in captured.get()


def test_known_notices_are_silenced_by_their_exact_message_only() -> None:
    from capdiff.quiet import quiet_known_warnings

    emitted = [
        ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`", FutureWarning),
        ("Found 107 module(s) in eval mode at the start of training. This may lead to", UserWarning),
        ("Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading", UserWarning),
        ("something else is deprecated", FutureWarning),  # same category, another message: shown
        ("Your `IterableDataset` is empty", UserWarning),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for message, category in emitted:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated", "Your `IterableDataset` is empty"]


@pytest.mark.parametrize(
    ("logger_name", "dropped", "kept"),
    [
        (  # Lightning's adverts
            "pytorch_lightning.utilities.rank_zero",
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
            "GPU available: False, used: False",
        ),
        (  # caption generation's all-ones attention mask, dropped by transformers' generate()
            "transformers.modeling_utils",
            "We strongly recommend passing in an `attention_mask` since your input_ids may be padded.",
            "Some weights of the model checkpoint were not used",
        ),
    ],
)
def test_known_log_lines_are_left_out_and_the_loggers_other_lines_kept(caplog, logger_name, dropped, kept) -> None:
    from capdiff.quiet import LIGHTNING_INFO_LOGGER, TRANSFORMERS_LOGGER, quiet_known_warnings

    assert logger_name in (LIGHTNING_INFO_LOGGER, TRANSFORMERS_LOGGER)
    quiet_known_warnings()
    logger = logging.getLogger(logger_name)
    with caplog.at_level(logging.INFO, logger=logger_name):
        logger.warning(dropped)
        logger.warning(kept)
    assert [r.getMessage() for r in caplog.records] == [kept]


@pytest.mark.slow  # a whole smoke run as `python train.py` runs it, ~1 min
def test_a_smoke_run_prints_its_summary_and_none_of_the_known_notices(smoke_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = run_entry_point("train.py", smoke_root, run, "experiment=smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for notice in KNOWN_NOTICES:
        assert notice not in output, notice
    assert "Trainable params" in output  # the model summary itself is still printed
    summary = done.stdout[done.stdout.index("capdiff: run finished") :]
    (best,) = (run / "checkpoints").glob("epoch*.ckpt")
    assert f"run folder      {run}" in summary
    assert f"best checkpoint {best}" in summary and f"last checkpoint {run / 'checkpoints' / 'last.ckpt'}" in summary
    assert f"sample grids    {run / 'samples'}: captions_final.png, generated_final.png" in summary
    assert "val/loss" in summary and "peval/probe_attr/mean" in summary
    assert f"python evaluate.py ckpt_path={best}" in summary and f"capdiff demo {best}" in summary
