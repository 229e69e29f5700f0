"""The bootstrapping loop (`python -m capdiff.bootstrap`): the data each stage hands the next, the shapes data
trained on recaptioned copies while its own split stays the probe's, and the whole loop on the smoke recipe."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from capdiff.bootstrap import Plan, moved, parse_mix, retrain_overrides, training_shards
from capdiff.recaption.members import read_json_records
from capdiff.train import instantiate_data
from tests.helpers import REPO, compose_config


def test_caption_mixes_are_read_as_key_probability_pairs() -> None:
    assert parse_mix("json.caption_syn=0.9, json.caption_orig=0.1") == {
        "json.caption_syn": 0.9,
        "json.caption_orig": 0.1,
    }
    for bad in ("json.caption_syn", "=0.5", "json.caption_syn=most", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=P"):
            parse_mix(bad)


def test_the_retraining_stage_reads_the_filtered_shards_with_their_captions(tmp_path: Path) -> None:
    """The overrides the fourth stage is given parse as Hydra overrides, and the data they make reads the
    filtered copies of the first stage's shards with the mix, the captioner on the original captions."""
    first = compose_config(tmp_path, ["data.shapes.vague_fraction=0.5"])
    urls, key, shapes = training_shards_of(first, tmp_path)
    assert shapes and key == "txt" and urls[0].endswith("-vague0.5-wrong0/train-{000000..000007}.tar")
    filtered = moved(urls, tmp_path / "loop" / "3-filter")
    assert filtered == str(tmp_path / "loop" / "3-filter" / "train-{000000..000007}.tar")

    plan = Plan(tmp_path / "loop", mix=parse_mix("json.caption_filtered=0.8,json.caption_orig=0.2"))
    cfg = compose_config(tmp_path, ["data.shapes.vague_fraction=0.5", *retrain_overrides(plan, filtered, shapes)])
    dm = instantiate_data(cfg.data)
    assert [len(s.urls) for s in dm.sources] == [8] and dm.train_urls[0].startswith(str(tmp_path / "loop"))
    assert dict(zip((k.spec for k in dm.caption_mix.keys), dm.caption_mix.probabilities, strict=True)) == {
        "json.caption_filtered": 0.8, "json.caption_orig": 0.2}  # fmt: skip
    assert dm.captioner_caption_key.spec == "json.caption_orig"
    # the shapes' own (noisy) training split is still what the probe trains on
    assert dm.shapes_train_urls == [u.replace("{000000..000007}", f"{i:06d}") for u in urls for i in range(8)]

    web = compose_config(tmp_path, ["data=webdataset", "data.val_urls=/v.tar",
                                    *retrain_overrides(plan, filtered, shapes=False)])  # fmt: skip
    assert instantiate_data(web.data).train_urls == [f"{tmp_path}/loop/3-filter/train-{i:06d}.tar" for i in range(8)]


def training_shards_of(cfg, tmp_path: Path) -> tuple[list[str], str, bool]:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    return training_shards(run)


def test_a_first_stage_on_a_mixture_is_refused_with_the_fix(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["data=webdataset", 'data.sources=[{urls:"/a/{0..3}.tar",weight:1}]'])
    with pytest.raises(ValueError, match=r"give it as data\.train_urls"):
        training_shards_of(cfg, tmp_path)


def test_noisy_shapes_have_their_own_folder_and_clean_ones_keep_theirs(tmp_path: Path) -> None:
    clean = compose_config(tmp_path, [])
    assert Path(str(clean.data.train_urls)).parent.name == "shapes-32px-seed0"
    noisy = compose_config(tmp_path, ["data.shapes.vague_fraction=0.5", "data.shapes.wrong_fraction=0.1"])
    assert Path(str(noisy.data.train_urls)).parent.name == "shapes-32px-seed0-vague0.5-wrong0.1"
    assert noisy.data.val_urls == clean.data.val_urls  # validation captions stay complete and true


@pytest.mark.slow
def test_the_whole_loop_runs_in_one_command_and_continues_where_it_stopped(tmp_path: Path) -> None:
    out = tmp_path / "loop"
    command = [sys.executable, "-m", "capdiff.bootstrap", str(out), "experiment=smoke", f"paths.data_dir={tmp_path}",
               "data.shapes.vague_fraction=0.5", "callbacks.sample_grid=null",
               "--recaption=--sample --num-candidates 2 --batch-size 64"]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, timeout=900)
    for stage in ("1-train", "4-retrain"):
        metrics = json.loads((out / stage / "metrics.json").read_text())
        assert "val/loss" in metrics and (out / stage / "checkpoints" / "last.ckpt").is_file()  # validated too
    records = [r for shard in sorted((out / "3-filter").glob("*.tar")) for r in read_json_records(str(shard))]
    assert len(records) == 256  # data.shapes.num_train of the smoke recipe: every sample recaptioned
    assert all(len(r["caption_syn"]) == 2 and r["caption_orig"] for r in records)
    kept = sum(len(r["caption_filtered"]) for r in records) / sum(1 + bool(r["caption_syn"]) for r in records)
    assert 0.45 <= kept <= 0.6  # the top half of the candidates (ties at the cut kept)
    used = OmegaConf.load(out / "4-retrain" / "config.yaml")
    assert used.init_from == str(out / "1-train" / "checkpoints" / "last.ckpt")
    assert used.data.sources[0].urls == str(out / "3-filter" / "train-{000000..000007}.tar")
    stages = json.loads((out / "bootstrap.json").read_text())
    assert list(stages) == ["1-train", "2-recaption", "3-filter", "4-retrain"]

    # the retrained checkpoint evaluates as any other (its training caption mix is not the evaluation's)
    checkpoint = out / "4-retrain" / "checkpoints" / "last.ckpt"
    evaluation = [sys.executable, "evaluate.py", f"hydra.run.dir={tmp_path / 'eval'}", f"paths.data_dir={tmp_path}",
                  f"ckpt_path={checkpoint}", "eval.num_samples=4", "eval.steps=2"]  # fmt: skip
    subprocess.run(evaluation, cwd=REPO, check=True, timeout=600)
    assert "probe_attr/mean" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]

    # a rerun skips the finished training stages and the shards already written
    again = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    assert "stage 1-train: finished already" in again.stderr and "stage 4-retrain: finished already" in again.stderr
    assert "0 shards written, 8 already done" in again.stderr
