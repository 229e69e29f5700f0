"""The built-in shapes dataset: deterministic, reused, captions that match the truth."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from capdiff.data import ShapesDataModule
from capdiff.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    CaptionNoise,
    ensure_split,
    make_sample,
    shapes_folder_tag,
)
from capdiff.evaluation.shapes import parse_caption


def shapes(root: Path, **kwargs) -> ShapesDataModule:
    spec = {"num_train": 40, "num_val": 8, "seed": 0} | kwargs.pop("spec", {})
    return ShapesDataModule(
        f"{root}/train-{{000..003}}.tar",
        f"{root}/val-{{000..001}}.tar",
        image_size=32,
        batch_size=8,
        num_workers=0,
        shapes=spec,
        **kwargs,
    )


def test_samples_are_deterministic_by_seed() -> None:
    assert make_sample(3, "train", 0, 32) == make_sample(3, "train", 0, 32)
    assert make_sample(3, "train", 0, 32)["png"] != make_sample(3, "train", 1, 32)["png"]
    assert make_sample(3, "train", 0, 32)["png"] != make_sample(3, "val", 0, 32)["png"]


def test_attributes_cover_the_vocabulary_and_captions_name_them() -> None:
    seen = {k: set() for k in ("shape", "color", "size", "position", "background")}
    for index in range(400):
        attributes = json.loads(make_sample(index, "train", 0, 32)["json"])
        for key in seen:
            seen[key].add(attributes[key])
        assert attributes["color"] != attributes["background"]
        for caption in attributes["captions"]:
            for key in seen:
                assert attributes[key] in caption
    assert seen == {
        "shape": set(SHAPES),
        "color": set(COLORS),
        "size": set(SIZES),
        "position": set(POSITIONS),
        "background": set(BACKGROUNDS),
    }


def test_the_shape_is_drawn_where_and_in_the_colour_the_caption_says() -> None:
    for index in range(50):
        sample = make_sample(index, "train", 0, 32)
        truth = json.loads(sample["json"])
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.int32)
        distance = np.abs(pixels - np.array(COLORS[truth["color"]])).sum(-1)
        ys, xs = np.nonzero(distance < 30)
        assert len(xs) > 10
        cx, cy = POSITIONS[truth["position"]]
        assert abs(xs.mean() / 32 - cx) < 0.12
        assert abs(ys.mean() / 32 - cy) < 0.15


def test_shards_are_written_once_and_reused(tmp_path: Path) -> None:
    dm = shapes(tmp_path)
    dm.prepare_data()
    train = sorted(tmp_path.glob("train-*.tar"))
    assert len(train) == 4
    assert len(list(tmp_path.glob("val-*.tar"))) == 2
    stamps = [p.stat().st_mtime_ns for p in train]
    shapes(tmp_path).prepare_data()
    assert [p.stat().st_mtime_ns for p in train] == stamps  # reused
    shapes(tmp_path, spec={"num_train": 48}).prepare_data()
    assert [p.stat().st_mtime_ns for p in train] != stamps  # a different spec rewrites them
    count = sum(1 for _ in wds.WebDataset([str(p) for p in train], shardshuffle=False))
    assert count == 48


def test_shapes_stream_through_the_standard_pipeline(tmp_path: Path) -> None:
    dm = shapes(tmp_path)
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (8, 3, 32, 32)
    assert len(list(dm.val_dataloader())) == 1
    for caption in batch["captions"]:
        assert any(shape in caption for shape in SHAPES)


def test_other_ranks_wait_for_the_shards_instead_of_writing_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    urls = [str(tmp_path / "train-0.tar")]
    with pytest.raises(TimeoutError, match="global rank 0"):
        ensure_split(urls, "train", 4, 0, 32, wait_s=0.5)
    assert not (tmp_path / "train-0.tar").exists()
    ensure_split(urls, "train", 4, 0, 32)  # what global rank 0 does
    assert ensure_split(urls, "train", 4, 0, 32, wait_s=0.5) is False  # found at once


TRUTH_KEYS = ("shape", "color", "size", "position", "background")


def test_noisy_captions_hold_their_shares_and_say_what_their_quality_says() -> None:
    noise = CaptionNoise(vague_fraction=0.3, wrong_fraction=0.2)
    quality: list[str] = []
    for index in range(600):
        record = json.loads(make_sample(index, "train", 0, 32, noise)["json"])
        truth = {k: record[k] for k in TRUTH_KEYS}
        for caption, kind in zip(record["captions"], record["caption_quality"], strict=True):
            quality.append(kind)
            named = {k: v for k, v in parse_caption(caption).items() if v is not None}
            if kind == "clean":
                assert named == truth, caption
            elif kind == "vague":  # only some attributes (or none), and those right
                assert len(named) < len(TRUTH_KEYS) and all(truth[k] == v for k, v in named.items()), caption
            else:  # every attribute named, exactly one of colour and shape wrong
                assert set(named) == set(TRUTH_KEYS), caption
                wrong = {k for k in TRUTH_KEYS if named[k] != truth[k]}
                assert wrong in ({"color"}, {"shape"}), caption
    shares = {kind: quality.count(kind) / len(quality) for kind in ("vague", "wrong")}
    assert abs(shares["vague"] - 0.3) < 0.04 and abs(shares["wrong"] - 0.2) < 0.04, shares
    assert "a picture" in {json.loads(make_sample(i, "train", 0, 32, noise)["json"])["captions"][0] for i in range(200)}


def test_caption_noise_keeps_the_images_and_the_truth_and_is_deterministic() -> None:
    noise = CaptionNoise(vague_fraction=0.5, wrong_fraction=0.5)
    for index in range(20):
        clean, noisy = make_sample(index, "train", 0, 32), make_sample(index, "train", 0, 32, noise)
        assert noisy["png"] == clean["png"]
        clean_record, noisy_record = json.loads(clean["json"]), json.loads(noisy["json"])
        assert {k: noisy_record[k] for k in TRUTH_KEYS} == {k: clean_record[k] for k in TRUTH_KEYS}
        assert "caption_quality" not in clean_record  # the clean dataset's bytes are those it always had
        assert noisy["txt"].decode() == noisy_record["captions"][0]
        assert make_sample(index, "train", 0, 32, noise) == noisy
    assert make_sample(0, "train", 0, 32, CaptionNoise()) == make_sample(0, "train", 0, 32)


def test_caption_noise_degrades_the_training_split_only(tmp_path: Path) -> None:
    spec = {"vague_fraction": 0.4, "wrong_fraction": 0.4}
    clean_root, noisy_root = tmp_path / "clean", tmp_path / "noisy"
    shapes(clean_root).prepare_data()
    shapes(noisy_root, spec=spec).prepare_data()

    def captions(root: Path, split: str) -> list[str]:
        urls = sorted(str(p) for p in root.glob(f"{split}-*.tar"))
        return [s["txt"].decode() for s in wds.WebDataset(urls, shardshuffle=False)]

    assert captions(noisy_root, "val") == captions(clean_root, "val")
    noisy_train, clean_train = captions(noisy_root, "train"), captions(clean_root, "train")
    assert len(noisy_train) == len(clean_train) == 40
    changed = sum(n != c for n, c in zip(noisy_train, clean_train, strict=True))
    assert 24 <= changed <= 40  # about 80% of 40 captions, drawn
    manifest = json.loads((noisy_root / "train.manifest.json").read_text())
    assert manifest["caption_noise"] == spec
    assert "caption_noise" not in json.loads((noisy_root / "val.manifest.json").read_text())


def test_noisy_training_shards_get_a_folder_of_their_own_and_bad_fractions_are_refused() -> None:
    assert shapes_folder_tag(0.0, 0.0) == ""
    assert shapes_folder_tag(0.25, 0.0) == "-vague0.25-wrong0"
    assert shapes_folder_tag(0.0, 0.1) != shapes_folder_tag(0.1, 0.0)
    with pytest.raises(ValueError, match=r"data\.shapes\.wrong_fraction=1\.5"):
        CaptionNoise(wrong_fraction=1.5)
    with pytest.raises(ValueError, match="over 1"):
        CaptionNoise(vague_fraction=0.6, wrong_fraction=0.6)
    with pytest.raises(ValueError, match="vague_fraction, wrong_fraction"):
        ShapesDataModule("a.tar", "b.tar", shapes={"vague": 0.1})


def test_held_out_pairs_never_reach_the_training_split_and_stay_in_validation(tmp_path: Path) -> None:
    """`data.shapes.holdout`: prompts of the held-out shape–position pairs are new combinations to the model."""
    from capdiff.data.shapes import HELD_OUT, is_held_out

    root = tmp_path / "holdout"
    shapes(root, spec={"num_train": 300, "num_val": 150, "holdout": True}).prepare_data()

    def attributes(split: str) -> list[dict]:
        urls = sorted(str(p) for p in root.glob(f"{split}-*.tar"))
        return [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)]

    train, val = attributes("train"), attributes("val")
    assert len(train) == 300 and not any(is_held_out(a) for a in train)
    # every shape and every position is still trained, each with other partners
    assert {a["shape"] for a in train} == set(SHAPES) and {a["position"] for a in train} == set(POSITIONS)
    assert {(a["shape"], a["position"]) for a in val if is_held_out(a)} == set(HELD_OUT)
    assert json.loads((root / "train.manifest.json").read_text())["held_out"] == [list(p) for p in HELD_OUT]
    assert shapes_folder_tag(0.0, 0.0, True) == "-holdout" and shapes_folder_tag(0.5, 0.0, True).endswith("-holdout")


def test_caches_built_from_the_shapes_follow_what_their_shards_were_written_from(tmp_path: Path) -> None:
    """A smaller run (a benchmark's --quick) rewrites the same shard paths: the probe, tokenizer, first stage
    and latents built on the small data must not be read back for the full data."""
    from capdiff.artifacts import cache_folder
    from capdiff.evaluation.shapes import probe_folder

    data = tmp_path / "data"
    full, quick = shapes(tmp_path / "data" / "s"), shapes(tmp_path / "data" / "s", spec={"num_train": 48})
    assert full.shapes_train_urls == quick.shapes_train_urls  # the same paths
    assert probe_folder(data, full) != probe_folder(data, quick)
    assert cache_folder(data, "autoencoders", full, {}) != cache_folder(data, "autoencoders", quick, {})
    assert probe_folder(data, full) == probe_folder(data, shapes(tmp_path / "data" / "s"))  # and reused otherwise
