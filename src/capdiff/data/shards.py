"""Shard tools: `python -m capdiff.data.shards write|inspect`.

`write` packs an image folder with sidecar captions (the img2dataset layout: `a/0001.jpg` + `a/0001.txt`
and/or `a/0001.json`) or a CSV/JSONL table of `path,caption` rows into plain WebDataset tar shards. A table row's
fields but `path` go to the json member (so its caption is `json.caption`; a JSONL list of captions stays a
list there), and its caption, or the first of a list, to `txt`.
Every image is decoded once to validate it; bad files are reported and left out, never fatal. With
`--val-fraction` a share of the samples goes to `val-` shards beside the training ones, chosen by a hash of
each sample's key alone: a sample's split does not depend on the run or on the other files.

`inspect` reports samples per shard, the members present, a few captions and the bad-sample counts the
training pipeline would see with a given caption key.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
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
_SHARD_NUMBER = re.compile(r"%0?\d*d")  # where an output pattern numbers its shards, as ShardWriter fills it


@dataclass
class Source:
    """One image to pack: its file and, from a table, its caption and extra fields."""

    image: Path
    key: str
    # The key before the `_n` a duplicate gets: what the train/val split hashes, so duplicates share a split.
    stem: str
    caption: str | list[str] | None = None
    extra: dict = field(default_factory=dict)


def _source(image: Path, relative: Path, taken: set[str], **fields) -> Source:
    # webdataset splits a member name at the first dot of its basename: keys must not contain dots.
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", str(relative.with_suffix("")))
    key, n = stem, 1
    while key in taken:
        key, n = f"{stem}_{n}", n + 1
    taken.add(key)
    return Source(image, key, stem, **fields)


def _image_ext(path: Path) -> str | None:
    ext = path.suffix.lower().lstrip(".")
    return ext if ext in IMAGE_EXTENSIONS else None


def sources_from_folder(folder: Path) -> Iterator[Source]:
    taken: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and _image_ext(p)):
        yield _source(path, path.relative_to(folder), taken)


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
        yield _source(image, Path(image.name), taken, caption=caption, extra=dict(row))


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
    meta = dict(source.extra)
    if source.caption is not None:
        # A table's caption is kept whole in the json member (`json.caption`, the img2dataset layout, where a
        # list such as COCO's five captions stays a list) and its first one in `txt` (the default caption key).
        meta["caption"] = source.caption
        caption = source.caption[0] if isinstance(source.caption, list) and source.caption else source.caption
    if caption is not None:
        if not isinstance(caption, str):
            raise BadSample("bad_caption", f"the caption of {source.image.name} is {type(caption).__name__}, not text")
        sample["txt"] = caption.encode()
        decode_captions(sample, CaptionKey("txt"))
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


def val_share(stem: str) -> float:
    """Where a sample falls in [0, 1): below `--val-fraction` it is a validation sample.

    A hash of its key alone (not Python's `hash`, which changes per process), so re-running the tool, or
    adding files, never moves a sample across the split.
    """
    return int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "big") / 2**64


def val_pattern(pattern: str) -> str:
    """The validation shards beside `pattern`'s: `train-%06d.tar` → `val-%06d.tar`, `a-%04d.tar` → `val-a-%04d.tar`."""
    path = Path(pattern)
    name = "val" + path.name[len("train") :] if path.name.startswith("train") else f"val-{path.name}"
    return str(path.with_name(name))


def brace_urls(pattern: str, shards: int) -> str:
    """The `shards` files written at `pattern`, in the brace notation data.train_urls and data.val_urls take."""
    number = _SHARD_NUMBER.search(pattern)
    first, last = number.group() % 0, number.group() % (shards - 1)
    span = first if shards == 1 else f"{{{first}..{last}}}"
    return str(Path(pattern[: number.start()] + span + pattern[number.end() :]).absolute())


def write_shards(
    sources: Iterator[Source],
    pattern: str,
    shard_size: int,
    max_pixels: int,
    console: Console,
    val_fraction: float = 0.0,
) -> dict:
    """Write good samples into shards named by `pattern` (`out/shard-%06d.tar`), those whose key hashes below
    `val_fraction` into `val_pattern(pattern)`; returns a report."""
    patterns = {"train": pattern} | ({"val": val_pattern(pattern)} if val_fraction > 0 else {})
    bad: Counter = Counter()
    examples: list[str] = []
    written: Counter = Counter()
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        sinks = {
            split: stack.enter_context(wds.ShardWriter(p, maxcount=shard_size, encoder=False, verbose=0))
            for split, p in patterns.items()
        }
        for source in track(list(sources), description="packing", console=console, transient=True):
            try:
                sample = pack(source, max_pixels)
            except BadSample as err:
                bad[err.reason] += 1
                if len(examples) < 20:
                    examples.append(f"{source.image}: {err}")
                continue
            split = "val" if val_share(source.stem) < val_fraction else "train"
            sinks[split].write(sample)
            written[split] += 1
        shards = {split: sink.shard for split, sink in sinks.items()}
    splits = {
        split: {"samples": written[split], "shards": shards[split], "pattern": p, "urls": brace_urls(p, shards[split])}
        for split, p in patterns.items()
    }
    return {
        "written": written.total(),
        "shards": sum(shards.values()),
        "splits": splits,
        "bad": dict(bad),
        "bad_examples": examples,
    }


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
        pattern = str(Path(pattern) / ("train-%06d.tar" if args.val_fraction else "shard-%06d.tar"))
    elif not _SHARD_NUMBER.search(pattern):
        console.print(f"[red]{pattern} has no shard number: use a pattern such as out/shard-%06d.tar, or a folder")
        return 2
    report = write_shards(sources, pattern, args.shard_size, args.max_pixels, console, args.val_fraction)
    for split in report["splits"].values():
        console.print(f"wrote {split['samples']} samples to {split['shards']} shards: {split['pattern']}")
    urls = {f"data.{split}_urls": info["urls"] for split, info in report["splits"].items()}
    console.print(" ".join(f"\"{key}='{value}'\"" for key, value in urls.items()), markup=False, soft_wrap=True)
    if report["splits"].get("val", {}).get("samples") == 0:
        console.print(f"[yellow]no sample fell in the validation split: raise --val-fraction={args.val_fraction}")
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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1): the share of samples for validation, e.g. 0.05")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capdiff.data.shards", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="pack an image folder or a path,caption table into shards")
    write.add_argument("source", help="folder of images with .txt/.json sidecars, or a .csv/.jsonl table")
    write.add_argument("output", help="output folder, or a pattern such as out/shard-%%06d.tar")
    write.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    write.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are left out")
    write.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="write this share of the samples (0 <= F < 1) to val- shards beside the training ones, chosen by a "
        "hash of each sample's key: re-running, or adding files, never moves a sample between train and val, "
        "and a key listed twice lands in one split",
    )
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
