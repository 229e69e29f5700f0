"""Bad samples are skipped and counted; shards never execute code; bad configs fail at start-up."""

from __future__ import annotations

import logging
import pickle
import tarfile
from pathlib import Path

import pytest

from capdiff.data import ImageTextDataModule
from capdiff.data.shards import main as shards_main
from capdiff.data.skips import SkipCounter, SkipLog
from tests.helpers import good_members, image_bytes, write_tar


def datamodule(train, val=None, **kwargs) -> ImageTextDataModule:
    kwargs = {"batch_size": 2, "num_workers": 0, "samples_per_epoch": 8, "shuffle_buffer": 4} | kwargs
    return ImageTextDataModule(train_urls=train, val_urls=val, **kwargs)


BAD_SAMPLES = {
    # reason: members of one bad sample
    "truncated_image": [("trunc.jpg", image_bytes(fmt="JPEG", size=(64, 64))[:300]), ("trunc.txt", b"cut")],
    "empty_image": [("zero.png", b""), ("zero.txt", b"nothing")],
    "undecodable_image": [("junk.png", b"this is not an image at all"), ("junk.txt", b"junk")],
    "missing_caption": [("nocap.png", image_bytes())],
    "empty_caption": [("blank.png", image_bytes()), ("blank.txt", b"  \n\t ")],
    "bad_caption": [("latin.png", image_bytes()), ("latin.txt", "café".encode("latin-1"))],
    "too_large": [("huge.png", image_bytes(size=(400, 300))), ("huge.txt", b"too many pixels")],
    "missing_image": [("onlytext.txt", b"a caption without an image")],
}


def shard_with_bad_samples(folder: Path) -> Path:
    members = good_members("good", 3)
    for bad in BAD_SAMPLES.values():
        members += bad
    return write_tar(folder / "mixed.tar", members + good_members("good", 2, start=3))


def test_each_bad_sample_kind_is_skipped_and_counted(shard_dir: Path) -> None:
    shard = str(shard_with_bad_samples(shard_dir))
    dm = datamodule(shard, shard, max_pixels=100_000)
    dm.setup()
    keys = [k for b in dm.val_dataloader() for k in b["keys"]]
    assert keys == [f"good{i:05d}" for i in range(5)]
    assert dm.val_skipped == dict.fromkeys(BAD_SAMPLES, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_in_workers_do_not_stop_training_and_are_counted_in_the_main_process(
    shard_dir: Path, workers: int
) -> None:
    shard = str(shard_with_bad_samples(shard_dir))
    # shuffle_buffer=1 reads each shard in order: the 40 samples drawn are 8 whole passes over its 5 good ones
    # (4 per worker with 2), each of which reaches the 8 bad ones once
    dm = datamodule([shard] * 2, None, max_pixels=100_000, num_workers=workers, batch_size=5, samples_per_epoch=40,
                    shuffle_buffer=1)  # fmt: skip
    dm.setup()
    batches = [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]  # as the trainer hands them over
    assert len(batches) == 8
    assert all(len(b["keys"]) == 5 for b in batches)
    assert dm.skipped == dict.fromkeys(BAD_SAMPLES, 8)


def cut_shard(path: Path, prefix: str, count: int, inside: str) -> Path:
    """A shard of `count` samples whose download stopped in the middle of the member `inside`."""
    write_tar(path, good_members(prefix, count))
    with tarfile.open(path) as tar:
        cut_at = tar.getmember(inside).offset_data + 50
    path.write_bytes(path.read_bytes()[:cut_at])
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_and_truncated_shards_are_counted_not_fatal(shard_dir: Path, workers: int) -> None:
    good = write_tar(shard_dir / "good.tar", good_members("g", 4))
    not_a_tar = shard_dir / "garbage.tar"
    not_a_tar.write_bytes(b"\x00garbage" * 500)
    cut = cut_shard(shard_dir / "cut.tar", "c", 20, inside="c00010.png")
    dm = datamodule([str(good)] * 2, [str(good), str(not_a_tar), str(cut), str(good)], num_workers=workers)
    dm.setup()
    keys = [k for b in dm.val_dataloader() for k in b["keys"]]
    good_keys = [f"g{i:05d}" for i in range(4)]
    assert sorted(keys) == sorted(good_keys * 2 + [f"c{i:05d}" for i in range(10)])  # the samples before the cut
    # once each, whatever the workers: the garbage shard, and the cut one (the reader reports that one twice)
    assert dm.val_skipped == {"shard_error": 1, "truncated_shard": 1}
    assert list(dm.val_dataloader()) and dm.val_skipped == {"shard_error": 1, "truncated_shard": 1}  # per pass


def test_skipped_samples_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    counter = SkipCounter()
    log = SkipLog(every_s=3600, counter=counter)
    with caplog.at_level(logging.WARNING, logger="capdiff.data.skips"):
        for i in range(1000):
            log.skip("empty_image", f"k{i}", "zero-byte image")
            log.skip("bad_caption", f"k{i}", "not UTF-8")
    assert len(caplog.records) == 2  # one per reason per interval, however many skips
    assert log.counts == {"empty_image": 1000, "bad_caption": 1000}
    assert counter.totals() == {"empty_image": 1000, "bad_caption": 1000}


class Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_members_in_a_shard_never_run(shard_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker))
    pickle.loads(payload)  # the payload is real: loading it runs code
    assert marker.exists()
    marker.unlink()

    members = []
    for i in range(4):
        key = f"evil{i}"
        members += [
            (f"{key}.png", image_bytes()),
            (f"{key}.txt", b"looks innocent"),
            (f"{key}.pyd", payload),
            (f"{key}.pickle", payload),
            (f"{key}.pth", payload),
            (f"{key}.json", b'{"a": 1}'),
        ]
    shard = str(write_tar(shard_dir / "evil.tar", members))
    dm = datamodule(shard, shard, num_workers=1)
    dm.setup()
    batches = [*dm.train_dataloader(), *dm.val_dataloader()]
    assert {c for b in batches for c in b["captions"]} == {"looks innocent"}
    for caption_key in ("pyd", "pickle", "pth"):  # even named as the caption, the bytes are only text-decoded
        dm = datamodule(shard, shard, caption_key=caption_key)
        dm.setup()
        assert list(dm.val_dataloader()) == []
        assert dm.val_skipped == {"bad_caption": 4}
    shards_main(["inspect", shard, "--json"])
    assert not marker.exists()


# ---------------------------------------------------------------- start-up errors
def test_missing_shard_file_names_the_key(shard_dir: Path) -> None:
    shard = write_tar(shard_dir / "a-000.tar", good_members("k", 4))
    dm = datamodule(str(shard_dir / "a-{000..002}.tar"), None)
    with pytest.raises(FileNotFoundError, match=r"data.train_urls: 2 of 3 shards do not exist"):
        dm.setup()
    dm = datamodule(str(shard), str(shard_dir / "nope.tar"))
    with pytest.raises(FileNotFoundError, match=r"data.val_urls"):
        dm.setup()


@pytest.mark.parametrize("urls", [[], "", " :: "])
def test_empty_url_list_names_the_key(urls) -> None:
    with pytest.raises(ValueError, match=r"data.train_urls is empty"):
        datamodule(urls, None)


def test_no_training_shards_serve_validation_only(shard_dir: Path) -> None:
    shard = str(write_tar(shard_dir / "val.tar", good_members("v", 3)))
    dm = datamodule(None, shard)  # as evaluation builds it
    dm.setup_streams(0, 1)
    assert sum(len(b["keys"]) for b in dm.val_dataloader()) == 3
    with pytest.raises(ValueError, match=r"data.train_urls is not set: training needs shards"):
        dm.train_dataloader()


def test_one_shard_feeds_two_ranks_of_two_workers(shard_dir: Path) -> None:
    """Every (rank, worker) draws from the whole shard list, so fewer shards than ranks × workers is no error:
    each rank gets its full batches, in an order of its own."""
    shard = str(write_tar(shard_dir / "only.tar", good_members("k", 5)))
    keys = []
    for rank in range(2):
        dm = datamodule([shard], None, num_workers=2, persistent_workers=False, batch_size=2, samples_per_epoch=16)
        dm.setup_streams(rank, 2)
        batches = list(dm.train_dataloader())
        assert [len(b["keys"]) for b in batches] == [2] * 4
        keys.append([k for b in batches for k in b["keys"]])
    assert keys[0] != keys[1]


def test_unknown_caption_key_lists_the_members_present(shard_dir: Path) -> None:
    shard = str(write_tar(shard_dir / "a.tar", good_members("k", 3)))
    with pytest.raises(ValueError, match=r"data.caption_key='json.caption' is in none.*\['png', 'txt'\]"):
        datamodule(shard, None, caption_key="json.caption").setup()
    with pytest.raises(ValueError, match=r"data.caption_key='txt.caption'.*only the json member has fields"):
        datamodule(shard, None, caption_key="txt.caption")
    with pytest.raises(ValueError, match=r"data.caption_key='png' names an image member"):
        datamodule(shard, None, caption_key="png")


def test_remote_shards_need_samples_per_epoch() -> None:
    dm = datamodule("pipe:cat /nonexistent/{0..3}.tar", None, samples_per_epoch=None)
    with pytest.raises(ValueError, match=r"data.samples_per_epoch is null"):
        dm._samples_per_epoch()


def test_samples_per_epoch_is_counted_for_local_shards(uneven_shards: list[str]) -> None:
    dm = datamodule(uneven_shards, None, samples_per_epoch=None, batch_size=10)
    dm.setup()
    assert dm.samples_per_epoch == 80
    assert len(dm.train_dataloader()) == 8


@pytest.mark.parametrize(
    ("key", "value"), [("image_size", 0), ("batch_size", -1), ("num_workers", -2), ("samples_per_epoch", 0)]
)
def test_bad_numbers_fail_at_construction(shard_dir: Path, key: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"data.{key}"):
        datamodule("x.tar", None, **{key: value})


def test_a_stream_with_no_usable_sample_stops_with_a_clear_error(shard_dir: Path) -> None:
    members = [(f"k{i}.png", b"not an image") for i in range(3)] + [("k0.txt", b"x")]
    members = [(f"k{i}.png", b"not an image") for i in range(3)]
    members += [(f"k{i}.txt", b"caption") for i in range(3)]
    shard = str(write_tar(shard_dir / "bad.tar", sorted(members)))
    dm = datamodule(shard, None)
    dm.setup()
    with pytest.raises(RuntimeError, match=r"no usable sample.*undecodable_image"):
        next(iter(dm.train_dataloader()))


def test_a_brace_range_that_leaves_shards_out_is_warned_about(shard_dir: Path, caplog) -> None:
    """`{000000..000001}` of five `train-` shards trains on two fifths of the data: start-up says so."""
    shards = [str(write_tar(shard_dir / f"train-{n:06d}.tar", good_members("k", 2))) for n in range(5)]
    write_tar(shard_dir / "val-000000.tar", good_members("v", 2))  # another set: not counted
    dm = datamodule(str(shard_dir / "train-{000000..000001}.tar"), None)
    with caplog.at_level(logging.WARNING, logger="capdiff.data.datamodule"):
        dm.setup_streams(0, 1)
    assert "data.train_urls lists 2 shards but 3 more like them are beside them" in caplog.text
    assert str(shard_dir / "train-*.tar") in caplog.text
    caplog.clear()
    dm = datamodule(shards, None)
    with caplog.at_level(logging.WARNING, logger="capdiff.data.datamodule"):
        dm.setup_streams(0, 1)
    assert "beside them" not in caplog.text
