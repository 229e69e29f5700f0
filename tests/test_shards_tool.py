"""`python -m capdiff.data.shards write` → `inspect` → the training pipeline, round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from capdiff.data import ImageTextDataModule
from capdiff.data.shards import main as shards_main
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
    # with a caption key the shards do not have, inspect reports what training would skip
    shards_main(["inspect", str(out / "shard-000000.tar"), "--caption-key", "json.caption", "--json"])
    assert json.loads(capsys.readouterr().out)[0]["bad"] == {"missing_caption": 4}


def test_write_from_jsonl(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.jpg").write_bytes(image_bytes(fmt="JPEG"))
    (tmp_path / "t.jsonl").write_text(json.dumps({"path": "a.jpg", "caption": "one", "score": 0.3}) + "\n")
    shards_main(["write", str(tmp_path / "t.jsonl"), str(tmp_path / "o"), "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 1


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
