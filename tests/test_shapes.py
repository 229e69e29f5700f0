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
from capdiff.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ensure_split, make_sample


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
