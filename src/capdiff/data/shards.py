"""Shard tools: `python -m capdiff.data.shards write|inspect`.

`write` packs an image folder with sidecar captions (the img2dataset layout: `a/0001.jpg` + `a/0001.txt`
and/or `a/0001.json`) or a CSV/JSONL table of `path,caption` rows into plain WebDataset tar shards.
Every image is decoded once to validate it; bad files are reported and left out, never fatal.

`inspect` reports samples per shard, the members present, a few captions and the bad-sample counts the
training pipeline would see with a given caption key.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from rich.console import Console
from rich.progress import track
from rich.table import Table

from capdiff.data.decode import (
    IMAGE_EXTENSIONS,
    BadSample,
    CaptionKey,
    decode_captions,
    image_member,
    load_rgb,
)
from capdiff.data.urls import expand_urls

DEFAULT_MAX_PIXELS = 64_000_000


@dataclass
class Source:
    """One image to pack: its file and, from a table, its caption and extra fields."""

    image: Path
    key: str
    caption: str | None = None
    extra: dict = field(default_factory=dict)


def _key_for(relative: Path, taken: set[str]) -> str:
    # webdataset splits a member name at the first dot of its basename: keys must not contain dots.
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", str(relative.with_suffix("")))
    unique, n = key, 1
    while unique in taken:
        unique, n = f"{key}_{n}", n + 1
    taken.add(unique)
    return unique


def _image_ext(path: Path) -> str | None:
    ext = path.suffix.lower().lstrip(".")
    return ext if ext in IMAGE_EXTENSIONS else None


def sources_from_folder(folder: Path) -> Iterator[Source]:
    taken: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and _image_ext(p)):
        yield Source(path, _key_for(path.relative_to(folder), taken))


def sources_from_table(table: Path) -> Iterator[Source]:
    """Rows of a CSV (header with `path` and `caption`) or JSONL (objects with the same fields)."""
    if table.suffix.lower() == ".jsonl":
        rows = (json.loads(line) for line in table.read_text().splitlines() if line.strip())
    else:
        rows = csv.DictReader(table.open(newline=""))
    taken: set[str] = set()
    for number, row in enumerate(rows, start=1):
        if "path" not in row:
            raise ValueError(f"{table}: row {number} has no 'path' field; the table needs path,caption columns.")
        image = Path(row.pop("path"))
        image = image if image.is_absolute() else table.parent / image
        caption = row.pop("caption", None)
        yield Source(image, _key_for(Path(image.name), taken), caption, dict(row))


def pack(source: Source, max_pixels: int) -> dict:
    """Read and validate one source into a tar sample; raises BadSample."""
    ext = _image_ext(source.image)
    try:
        data = source.image.read_bytes()
    except OSError as err:
        raise BadSample("unreadable_file", str(err)) from err
    load_rgb(data, max_pixels)
    sample = {"__key__": source.key, "jpg" if ext == "jpeg" else ext: data}
    sidecar_txt, sidecar_json = source.image.with_suffix(".txt"), source.image.with_suffix(".json")
    caption = source.caption
    if caption is None and sidecar_txt.is_file():
        try:
            caption = sidecar_txt.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadSample("bad_caption", f"{sidecar_txt} is not UTF-8") from err
    if caption is not None:
        sample["txt"] = caption.encode()
        decode_captions(sample, CaptionKey("txt"))
    meta = dict(source.extra)
    if sidecar_json.is_file():
        try:
            meta = json.loads(sidecar_json.read_text()) | meta
        except ValueError as err:
            raise BadSample("bad_caption", f"{sidecar_json} does not parse") from err
    if meta:
        sample["json"] = json.dumps(meta).encode()
    if "txt" not in sample and "json" not in sample:
        raise BadSample("missing_caption", "no caption, .txt or .json sidecar")
    return sample


def write_shards(sources: Iterator[Source], pattern: str, shard_size: int, max_pixels: int, console: Console) -> dict:
    """Write good samples into shards named by `pattern` (`out/shard-%06d.tar`); returns a report."""
    bad: Counter = Counter()
    examples: list[str] = []
    written = 0
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=shard_size, encoder=False, verbose=0) as sink:
        for source in track(list(sources), description="packing", console=console, transient=True):
            try:
                sample = pack(source, max_pixels)
            except BadSample as err:
                bad[err.reason] += 1
                if len(examples) < 20:
                    examples.append(f"{source.image}: {err}")
                continue
            sink.write(sample)
            written += 1
        shards = sink.shard
    return {"written": written, "shards": shards, "bad": dict(bad), "bad_examples": examples}


def inspect_shard(url: str, caption_key: CaptionKey, max_pixels: int, show: int) -> dict:
    members: Counter = Counter()
    bad: Counter = Counter()
    captions: list[str] = []
    samples = 0
    errors: list[str] = []

    def on_error(err: Exception) -> bool:
        bad["shard_error"] += 1
        errors.append(repr(err)[:200])
        return True

    for sample in wds.tarfile_samples([{"url": url}], handler=on_error):
        samples += 1
        members.update(k for k in sample if not k.startswith("__"))
        try:
            found = decode_captions(sample, caption_key)
            load_rgb(sample[image_member(sample)], max_pixels)
        except BadSample as err:
            bad[err.reason] += 1
            continue
        if len(captions) < show:
            captions.append(found[0])
    return {
        "url": url,
        "samples": samples,
        "members": dict(members),
        "bad": dict(bad),
        "captions": captions,
        "errors": errors,
    }


def _cmd_write(args: argparse.Namespace, console: Console) -> int:
    source = Path(args.source)
    if source.is_dir():
        sources = sources_from_folder(source)
    elif source.is_file() and source.suffix.lower() in (".csv", ".jsonl"):
        sources = sources_from_table(source)
    else:
        console.print(f"[red]{source} is neither a folder of images nor a .csv/.jsonl table")
        return 2
    pattern = args.output
    if "%" not in pattern:
        pattern = str(Path(pattern) / "shard-%06d.tar")
    report = write_shards(sources, pattern, args.shard_size, args.max_pixels, console)
    console.print(f"wrote {report['written']} samples to {report['shards']} shards: {pattern}")
    if report["bad"]:
        console.print(f"[yellow]left out {sum(report['bad'].values())} bad files: {report['bad']}")
        for line in report["bad_examples"]:
            console.print(f"  [yellow]{line}")
    if args.json:
        print(json.dumps(report))
    return 0


def _cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    key = CaptionKey.parse(args.caption_key)
    urls = expand_urls(args.shards, "shards")
    reports = [
        inspect_shard(u, key, args.max_pixels, args.show)
        for u in track(urls, description="inspecting", console=console, transient=True)
    ]
    if args.json:
        print(json.dumps(reports))
        return 0
    table = Table("shard", "samples", "members", "bad", "captions")
    for r in reports:
        members = ", ".join(f"{k}:{v}" for k, v in sorted(r["members"].items()))
        bad = ", ".join(f"{k}:{v}" for k, v in sorted(r["bad"].items())) or "0"
        table.add_row(r["url"], str(r["samples"]), members, bad, "\n".join(r["captions"]))
    console.print(table)
    total = sum(r["samples"] for r in reports)
    total_bad = sum(sum(r["bad"].values()) for r in reports)
    console.print(f"{len(reports)} shards, {total} samples, {total_bad} bad with data.caption_key={key.spec}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capdiff.data.shards", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="pack an image folder or a path,caption table into shards")
    write.add_argument("source", help="folder of images with .txt/.json sidecars, or a .csv/.jsonl table")
    write.add_argument("output", help="output folder, or a pattern such as out/shard-%%06d.tar")
    write.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    write.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are left out")
    write.add_argument("--json", action="store_true", help="also print the report as JSON")
    inspect = commands.add_parser("inspect", help="summarize shards: samples, members, captions, bad samples")
    inspect.add_argument("shards", nargs="+", help="shard paths or URLs (brace notation allowed)")
    inspect.add_argument("--caption-key", default="txt", help="as data.caption_key: txt or json.<field>")
    inspect.add_argument("--show", type=int, default=3, help="captions to show per shard")
    inspect.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    console = Console(stderr=args.json)
    return (_cmd_write if args.command == "write" else _cmd_inspect)(args, console)


if __name__ == "__main__":
    sys.exit(main())
