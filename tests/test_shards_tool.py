"""`python -m capdiff.data.shards write` → `inspect` → the training pipeline, round trip."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from capdiff.data import ImageTextDataModule
from capdiff.data.decode import CaptionKey, decode_captions
from capdiff.data.shards import main as shards_main
from capdiff.data.urls import expand_urls
from tests.helpers import image_bytes


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """The img2dataset layout: images with .txt/.json sidecars in sub-folders, plus two bad files."""
    root = tmp_path / "images"
    for i in range(7):
        folder = root / f"{i // 4:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img.{i}.jpg").write_bytes(image_bytes((i * 30, 100, 50), size=(48, 32), fmt="JPEG"))
        (folder / f"img.{i}.txt").write_text(f"photo number {i}")
        (folder / f"img.{i}.json").write_text(json.dumps({"caption": f"photo number {i}", "id": i}))
    (root / "00001" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "00001" / "broken.txt").write_text("a broken image")
    (root / "00001" / "nocaption.webp").write_bytes(image_bytes(fmt="WEBP"))
    return root


def test_write_inspect_read_round_trip(image_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert shards_main(["write", str(image_folder), str(out / "part-%04d.tar"), "--shard-size", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["written"] == 7
    assert report["bad"] == {"undecodable_image": 1, "missing_caption": 1}
    shards = sorted(out.glob("part-*.tar"))
    assert [p.name for p in shards] == ["part-0000.tar", "part-0001.tar", "part-0002.tar"]

    shards_main(["inspect", str(out / "part-{0000..0002}.tar"), "--caption-key", "json.caption", "--json"])
    inspected = json.loads(capsys.readouterr().out)
    assert [r["samples"] for r in inspected] == [3, 3, 1]
    assert all(r["members"] == {"jpg": r["samples"], "txt": r["samples"], "json": r["samples"]} for r in inspected)
    assert all(r["bad"] == {} for r in inspected)
    assert inspected[0]["captions"][0] == "photo number 0"

    dm = ImageTextDataModule(
        str(out / "part-{0000..0002}.tar"),
        str(out / "part-{0000..0002}.tar"),
        image_size=16,
        batch_size=4,
        num_workers=0,
    )
    dm.setup()
    batches = list(dm.val_dataloader())
    captions = [c for b in batches for c in b["captions"]]
    assert sorted(captions) == [f"photo number {i}" for i in range(7)]
    assert batches[0]["pixels"].shape == (4, 3, 16, 16)
    assert dm.samples_per_epoch == 7  # counted from the local shards


def test_write_from_a_csv_table_and_inspect_counts_bad_samples(tmp_path: Path, capsys) -> None:
    (tmp_path / "pics").mkdir()
    rows = ["path,caption,source"]
    for i in range(4):
        (tmp_path / "pics" / f"{i}.png").write_bytes(image_bytes(size=(20, 20)))
        rows.append(f'pics/{i}.png,"a picture, number {i}",web')
    rows.append("pics/missing.png,gone,web")
    (tmp_path / "table.csv").write_text("\n".join(rows))
    out = tmp_path / "from-csv"
    assert shards_main(["write", str(tmp_path / "table.csv"), str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["written"] == 4
    assert report["bad"] == {"unreadable_file": 1}

    shards_main(["inspect", str(out / "shard-000000.tar"), "--json"])
    (shard,) = json.loads(capsys.readouterr().out)
    assert shard["samples"] == 4
    assert shard["members"] == {"png": 4, "txt": 4, "json": 4}
    assert shard["captions"] == ["a picture, number 0", "a picture, number 1", "a picture, number 2"]
    # the row's fields are in the json member, its caption too: json.caption reads the same captions
    shards_main(["inspect", str(out / "shard-000000.tar"), "--caption-key", "json.caption", "--json"])
    (shard,) = json.loads(capsys.readouterr().out)
    assert shard["captions"] == ["a picture, number 0", "a picture, number 1", "a picture, number 2"]
    assert shard["bad"] == {}
    # with a caption key the shards do not have, inspect reports what training would skip
    shards_main(["inspect", str(out / "shard-000000.tar"), "--caption-key", "json.alt_text", "--json"])
    assert json.loads(capsys.readouterr().out)[0]["bad"] == {"missing_caption": 4}


def test_write_from_jsonl_keeps_the_caption_as_json_caption_and_txt(tmp_path: Path, capsys) -> None:
    """README recipe 2 reads a JSONL-written source with `caption_key: json.caption`; a list of captions (COCO's
    five) stays a list there, and `txt` holds the first."""
    (tmp_path / "a.jpg").write_bytes(image_bytes(fmt="JPEG"))
    (tmp_path / "b.jpg").write_bytes(image_bytes(fmt="JPEG"))
    rows = [{"path": "a.jpg", "caption": "one", "score": 0.3}, {"path": "b.jpg", "caption": ["two", "deux"]}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards_main(["write", str(tmp_path / "t.jsonl"), str(tmp_path / "o"), "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 2
    samples = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "o" / "shard-000000.tar"), shardshuffle=False)}
    assert json.loads(samples["a"]["json"]) == {"caption": "one", "score": 0.3}
    assert json.loads(samples["b"]["json"]) == {"caption": ["two", "deux"]}
    assert (samples["a"]["txt"], samples["b"]["txt"]) == (b"one", b"two")
    assert decode_captions(samples["b"], CaptionKey.parse("json.caption")) == ["two", "deux"]


def test_the_command_line_entry_point_runs(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "capdiff.data.shards", "write", str(image_folder), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote 7 samples to 1 shards" in done.stdout
    assert "left out 2 bad files" in done.stdout
    shown = subprocess.run(
        [sys.executable, "-m", "capdiff.data.shards", "inspect", str(out / "shard-000000.tar")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "1 shards, 7 samples, 0 bad" in shown.stdout


def test_the_shard_tool_starts_without_lightning_and_the_package_names_still_resolve() -> None:
    import capdiff.data

    assert all(getattr(capdiff.data, name).__name__ == name for name in capdiff.data.__all__)
    check = "import sys, capdiff.data.shards; assert 'pytorch_lightning' not in sys.modules, 'Lightning was imported'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def sample_keys(shards: list[Path]) -> list[str]:
    keys = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys += [m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".png")]
    return keys


def write_split(source: Path, out: Path, capsys, *flags: str) -> dict:
    assert shards_main(["write", str(source), str(out), "--json", *flags]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return {
        split: set(sample_keys(sorted(Path(u) for u in expand_urls(info["urls"], split))))
        for split, info in report["splits"].items()
    }


def pictures(folder: Path, names: range) -> Path:
    for i in names:
        (folder / f"p{i:04d}.png").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"p{i:04d}.png").write_bytes(image_bytes(size=(8, 8)))
        (folder / f"p{i:04d}.txt").write_text(f"picture {i}")
    return folder


def test_val_fraction_splits_by_key_the_same_way_on_every_run_and_as_files_are_added(tmp_path: Path, capsys) -> None:
    source = pictures(tmp_path / "pics", range(400))
    first = write_split(source, tmp_path / "a", capsys, "--val-fraction", "0.1", "--shard-size", "100")
    assert not first["train"] & first["val"]
    assert first["train"] | first["val"] == {f"p{i:04d}" for i in range(400)}
    assert 25 <= len(first["val"]) <= 55  # 40 expected; the hash is fixed, so this never flakes
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == [f"train-{i:06d}.tar" for i in range(4)] + ["val-000000.tar"]

    assert write_split(source, tmp_path / "b", capsys, "--val-fraction", "0.1", "--shard-size", "100") == first
    pictures(source, range(400, 500))
    grown = write_split(source, tmp_path / "c", capsys, "--val-fraction", "0.1", "--shard-size", "100")
    assert first["val"] <= grown["val"] and first["train"] <= grown["train"]


def test_a_key_listed_twice_lands_in_one_split(tmp_path: Path, capsys) -> None:
    pictures(tmp_path / "pics", range(40))
    rows = ["path,caption"] + [f"pics/p{i:04d}.png,copy {copy}" for i in range(40) for copy in (1, 2)]
    (tmp_path / "table.csv").write_text("\n".join(rows))
    split = write_split(tmp_path / "table.csv", tmp_path / "out", capsys, "--val-fraction", "0.5")
    assert len(split["train"]) + len(split["val"]) == 80  # both copies are kept: p0000 and p0000_1
    stems = {name: {k.removesuffix("_1") for k in keys} for name, keys in split.items()}
    assert stems["train"] and stems["val"] and not stems["train"] & stems["val"]


def test_the_printed_urls_train_and_validate_on_the_split(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    command = [sys.executable, "-m", "capdiff.data.shards", "write", str(image_folder), str(out)]
    done = subprocess.run([*command, "--val-fraction", "0.5"], capture_output=True, text=True, check=True)
    overrides = dict(re.findall(r"\"(data\.\w+_urls)='([^']+)'\"", done.stdout))
    assert set(overrides) == {"data.train_urls", "data.val_urls"}
    dm = ImageTextDataModule(overrides["data.train_urls"], overrides["data.val_urls"], image_size=16, num_workers=0)
    dm.setup()
    val = [c for b in dm.val_dataloader() for c in b["captions"]]
    assert 0 < len(val) < 7 and dm.samples_per_epoch == 7 - len(val)


@pytest.mark.parametrize("fraction", ["1", "1.5", "-0.1", "nan", "a tenth"])
def test_a_val_fraction_outside_zero_to_one_names_the_flag(
    image_folder: Path, tmp_path: Path, fraction, capsys
) -> None:
    with pytest.raises(SystemExit) as exit:
        shards_main(["write", str(image_folder), str(tmp_path / "out"), f"--val-fraction={fraction}"])
    assert exit.value.code == 2
    assert "--val-fraction" in capsys.readouterr().err and not (tmp_path / "out").exists()
