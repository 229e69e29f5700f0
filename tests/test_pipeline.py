"""The training and validation streams: shapes of batches, images of every kind, ranks and workers."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capdiff.data import ImageTextDataModule
from capdiff.data.loaders import EpochLoader
from capdiff.data.transforms import as_unit
from tests.helpers import good_members, image_bytes, write_tar


def datamodule(train, val=None, **kwargs) -> ImageTextDataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, "samples_per_epoch": 16, "shuffle_buffer": 8} | kwargs
    return ImageTextDataModule(train_urls=train, val_urls=val, **kwargs)


def all_batches(loader) -> list[dict]:
    return list(loader)


def test_batches_have_the_documented_shape_range_and_types(shard_dir: Path) -> None:
    shard = write_tar(shard_dir / "a.tar", good_members("k", 10))
    dm = datamodule(str(shard), str(shard), image_size=16, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    # skipped and position: counted and noted (for a resume) as it reaches the model
    assert set(batch) == {"pixels", "captions", "keys", "skipped", "position"}
    assert batch["pixels"].shape == (4, 3, 16, 16)
    assert batch["pixels"].dtype == torch.uint8  # a quarter of the bytes between processes and to the GPU
    seen = dm.on_after_batch_transfer(batch, 0)  # what the model sees
    assert set(seen) == {"pixels", "captions", "keys"}
    on_device = seen["pixels"]
    assert on_device.dtype == torch.float32
    assert on_device.min() >= -1.0
    assert on_device.max() <= 1.0
    torch.testing.assert_close(on_device, batch["pixels"].float() / 127.5 - 1)
    assert all(isinstance(c, str) for c in batch["captions"])
    # whitespace normalized: "caption  of\nk00003 " → "caption of k00003"
    assert all(c == f"caption of {k}" for c, k in zip(batch["captions"], batch["keys"], strict=True))
    val = all_batches(dm.val_dataloader())
    assert [b["pixels"].shape[0] for b in val] == [4, 4, 2]  # the last, partial batch is kept


def test_pixel_values_map_uint8_to_unit_range(shard_dir: Path) -> None:
    members = [
        ("black.png", image_bytes((0, 0, 0))),
        ("black.txt", b"black"),
        ("white.png", image_bytes((255, 255, 255))),
        ("white.txt", b"white"),
    ]
    dm = datamodule(str(write_tar(shard_dir / "a.tar", members)), None)
    dm.val_urls = dm.train_urls
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    by_key = dict(zip(batch["keys"], dm.on_after_batch_transfer(batch, 0)["pixels"], strict=True))
    assert torch.all(by_key["black"] == -1.0)
    assert torch.all(by_key["white"] == 1.0)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("JPEG", "CMYK"),
        ("PNG", "P"),
        ("PNG", "LA"),
        # No 16-bit case: image_bytes makes one of value 250 in 65535, near black; test_image_modes.py checks it.
        ("WEBP", "RGB"),
        ("PNG", "1"),
    ],
)
def test_every_image_mode_becomes_rgb(shard_dir: Path, fmt: str, mode: str) -> None:
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    members = [(f"x.{ext}", image_bytes((250, 250, 250), size=(30, 20), fmt=fmt, mode=mode)), ("x.txt", b"a")]
    dm = datamodule(str(write_tar(shard_dir / "a.tar", members)), None, image_size=8)
    dm.val_urls = dm.train_urls
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["pixels"].shape == (1, 3, 8, 8)
    assert as_unit(batch["pixels"]).mean() > 0.8  # near-white survived every conversion


def test_transparency_is_composited_on_white(shard_dir: Path) -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    members = [("t.png", buffer.getvalue()), ("t.txt", b"transparent")]
    dm = datamodule(str(write_tar(shard_dir / "a.tar", members)), None, image_size=10)
    dm.val_urls = dm.train_urls
    dm.setup()
    assert torch.all(next(iter(dm.val_dataloader()))["pixels"] == 255)


def test_center_crop_keeps_the_middle_of_a_wide_image(shard_dir: Path) -> None:
    # 30×10: left third red, middle third green, right third blue → the crop is the green square.
    array = np.zeros((10, 30, 3), np.uint8)
    array[:, :10, 0], array[:, 10:20, 1], array[:, 20:, 2] = 255, 255, 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    members = [("w.png", buffer.getvalue()), ("w.txt", b"wide")]
    dm = datamodule(str(write_tar(shard_dir / "a.tar", members)), None, image_size=10)
    dm.val_urls = dm.train_urls
    dm.setup()
    pixels = as_unit(next(iter(dm.val_dataloader()))["pixels"][0])
    assert pixels[1].mean() > 0.9
    assert pixels[0].mean() < -0.9
    assert pixels[2].mean() < -0.9


def test_json_caption_field_with_several_captions(shard_dir: Path) -> None:
    captions = ["first caption", "second caption", "third caption"]
    members = []
    for i in range(8):
        members += [(f"k{i}.png", image_bytes()), (f"k{i}.json", json.dumps({"caption": captions}).encode())]
    shard = str(write_tar(shard_dir / "a.tar", members))
    dm = datamodule(shard, shard, caption_key="json.caption", batch_size=8, samples_per_epoch=64)
    dm.setup()
    seen = Counter(c for b in dm.train_dataloader() for c in b["captions"])
    assert set(seen) == set(captions)  # training draws among them
    assert {c for b in dm.val_dataloader() for c in b["captions"]} == {"first caption"}  # validation: the first


def shard_keys(url: str) -> set[str]:
    with tarfile.open(url) as tar:
        return {m.name.split(".", 1)[0] for m in tar}


def loader_for_rank(shards: list[str], rank: int, world_size: int, workers: int, **kwargs):
    dm = datamodule(shards, None, num_workers=workers, persistent_workers=False, **kwargs)
    dm.setup_streams(rank, world_size)
    return dm.train_dataloader()


def test_two_ranks_two_workers_get_equal_full_batches_from_uneven_shards(uneven_shards: list[str]) -> None:
    counts, keys = {}, {}
    for rank in range(2):
        loader = loader_for_rank(uneven_shards, rank, 2, workers=2, batch_size=3, samples_per_epoch=50)
        epochs = [all_batches(loader) for _ in range(2)]
        counts[rank] = [len(e) for e in epochs]
        assert all(b["pixels"].shape[0] == 3 for e in epochs for b in e)
        assert counts[rank] == [len(loader)] * 2
        keys[rank] = {k for e in epochs for b in e for k in b["keys"]}
    assert counts[0] == counts[1] == [10, 10]  # ceil(50 / (3 × 2)) = 9 → rounded up to 2 workers × 5
    # every (rank, worker) draws from the whole shard list: each rank reads from both halves of it
    shard_of = {k: n for n, url in enumerate(uneven_shards) for k in shard_keys(url)}
    for rank in range(2):
        drawn = {shard_of[k] for k in keys[rank]}
        assert min(drawn) < len(uneven_shards) // 2 <= max(drawn)


def test_training_order_is_set_by_seed_rank_and_epoch(uneven_shards: list[str]) -> None:
    def order(rank: int, seed: int, epochs: int) -> list[list[str]]:
        loader = loader_for_rank(uneven_shards, rank, 1, workers=0, seed=seed, batch_size=4)
        return [[k for b in loader for k in b["keys"]] for _ in range(epochs)]

    first = order(0, seed=1, epochs=2)
    assert order(0, seed=1, epochs=2) == first  # a rerun (or a resumed run) replays the same stream
    assert first[0] != first[1]  # a new epoch reshuffles
    assert order(0, seed=2, epochs=1)[0] != first[0]


def test_validation_sees_every_sample_exactly_once_across_ranks(shard_dir: Path) -> None:
    sizes = [5, 1, 12, 3, 7]
    shards, start = [], 0
    for n, size in enumerate(sizes):
        shards.append(str(write_tar(shard_dir / f"val-{n}.tar", good_members("v", size, start))))
        start += size
    seen: list[str] = []
    per_rank = []
    for rank in range(2):
        dm = datamodule(shards, shards, num_workers=2, batch_size=4, persistent_workers=False)
        dm.setup_streams(rank, 2)
        keys = [k for b in dm.val_dataloader() for k in b["keys"]]
        per_rank.append(len(keys))
        seen += keys
    assert sorted(seen) == sorted(f"v{i:05d}" for i in range(sum(sizes)))
    assert abs(per_rank[0] - per_rank[1]) <= 2


def test_validation_order_is_deterministic(shard_dir: Path) -> None:
    shards = [str(write_tar(shard_dir / f"v{n}.tar", good_members(f"s{n}-", 6))) for n in range(3)]

    def keys() -> list[str]:
        dm = datamodule(shards, shards, num_workers=2, persistent_workers=False)
        dm.setup()
        return [k for b in dm.val_dataloader() for k in b["keys"]]

    assert keys() == keys()


def test_shards_written_by_other_tools_with_folders_in_member_names(shard_dir: Path) -> None:
    members = [
        ("part/a/000.jpg", image_bytes(fmt="JPEG")),
        ("part/a/000.txt", b"one"),
        ("part/a/001.jpeg", image_bytes(fmt="JPEG")),
        ("part/a/001.txt", b"two"),
        ("part/a/001.npy", b"\x93NUMPY ignored"),
    ]
    shard = str(write_tar(shard_dir / "other.tar", members))
    dm = datamodule(shard, shard)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["keys"] == ["part/a/000", "part/a/001"]
    assert batch["captions"] == ["one", "two"]


def test_the_epoch_reaches_persistent_workers(uneven_shards: list[str]) -> None:
    dm = datamodule(uneven_shards, None, num_workers=2, persistent_workers=True, batch_size=2)
    dm.setup()
    loader = dm.train_dataloader()
    first, second = ([k for b in loader for k in b["keys"]] for _ in range(2))
    assert first != second
    # Fresh workers told "epoch 1" (what a resumed run's trainer says) replay the persistent workers' 2nd epoch.
    fresh = datamodule(uneven_shards, None, num_workers=2, batch_size=2)
    fresh.setup()
    resumed = EpochLoader(fresh.train_stream, epoch_fn=lambda: 1, num_workers=2)
    assert [k for b in resumed for k in b["keys"]] == second


def test_a_mid_epoch_resume_skips_the_trained_samples_without_decoding_them(shard_dir: Path, monkeypatch) -> None:
    """The resumed epoch's batches are those the uninterrupted one went on with (bad samples included in the
    skipped part), and the samples its trained batches drew are not decoded again; a checkpoint without the
    positions (written before they were saved) replays by decoding, to the same batches."""
    import capdiff.data.streams as streams

    members = []
    for i in range(12):  # every third sample has no caption
        members += [(f"k{i:03d}.png", image_bytes())] + ([] if i % 3 == 2 else [(f"k{i:03d}.txt", b"a caption")])
    shards = [str(write_tar(shard_dir / f"s{n}.tar", [(f"{n}{k}", v) for k, v in members])) for n in range(3)]

    def data() -> ImageTextDataModule:
        return datamodule(shards, None, batch_size=4, samples_per_epoch=40, shuffle_buffer=5, random_crop=True)

    whole = data()
    whole.setup_streams(0, 1)
    batches = list(whole.train_dataloader())
    assert len(batches) == 10
    state = {"train_stream": {"epoch": 0, "trained_batches": 4, "positions": [[batches[3]["position"][2]]]}}

    decodes = []
    real = streams._load_rgb
    monkeypatch.setattr(streams, "_load_rgb", lambda *a, **k: decodes.append(1) or real(*a, **k))
    for positions, decoded in ((state["train_stream"]["positions"], 6 * 4), (None, 10 * 4)):
        resumed = data()
        resumed.setup_streams(0, 1)
        resumed.load_state_dict({"train_stream": state["train_stream"] | {"positions": positions}})
        decodes.clear()
        rest = list(resumed.train_dataloader())
        assert [b["keys"] for b in rest] == [b["keys"] for b in batches[4:]]
        assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(rest, batches[4:], strict=True))
        assert [b["captions"] for b in rest] == [b["captions"] for b in batches[4:]]
        assert len(decodes) == decoded  # caption-less samples fail before their image is decoded
