"""The passes over shards: recaptioning and filtering, each rank its share, shard by shard and resumable.

Rank r of W takes the shards r, r + W, r + 2W, ... of the expanded URL list (torchrun's RANK and WORLD_SIZE),
so no two ranks write the same shard and no collective is needed. A shard already in OUT_DIR is done: it is
never rewritten, so a restarted run (any number of ranks) continues where the last one stopped. Sampled
captions are seeded by the shard's place in the list, so they do not depend on the number of ranks either.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from capdiff.data.decode import BadSample, CaptionKey
from capdiff.data.skips import SkipCounter, SkipLog
from capdiff.data.streams import DecodeSpec, decode_sample
from capdiff.data.urls import local_path
from capdiff.recaption.captioning import Recaptioner
from capdiff.recaption.filtering import FilterRule
from capdiff.recaption.members import Sample, read_json_records, read_samples, shard_writer, write_sample

log = logging.getLogger(__name__)

SETTINGS = "recaption.json"  # in OUT_DIR: what its shards were written with, checked on resume
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError)


@dataclass
class Summary:
    """One rank's pass: shard names written, found already done and failed; samples and skips by reason."""

    written: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)

    def line(self, rank: int, world_size: int) -> str:
        skips = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items())) or "none"
        return (
            f"rank {rank} of {world_size}: {len(self.written)} shards written, {len(self.present)} already done, "
            f"{len(self.failed)} failed; {self.samples} samples, skipped (copied unchanged) {skips}"
        )


def shard_names(urls: Sequence[str], out_dir: Path) -> list[str]:
    """Each shard's file name in OUT_DIR (its own base name); a ValueError when two shards share one, or when
    OUT_DIR is where the shards are (every one of them would count as done)."""
    names = [(local_path(u) or Path(u.split("?")[0])).name for u in urls]
    seen: dict[str, str] = {}
    for url, name in zip(urls, names, strict=True):
        path = local_path(url)
        if path is not None and path.resolve() == (out_dir / name).resolve():
            raise ValueError(f"OUT_DIR {out_dir} is the folder of the shards it would write; pass another folder")
        if name in seen:
            raise ValueError(
                f"URLS: {seen[name]} and {url} would both be written as OUT_DIR/{name}; recaption one folder of "
                "shards at a time (one OUT_DIR each)"
            )
        seen[name] = url
    return names


def recaption(
    recaptioner: Recaptioner,
    urls: Sequence[str],
    out_dir: Path,
    caption_key: str = "txt",
    rule: FilterRule | None = None,
    batch_size: int = 32,
    max_pixels: int = 64_000_000,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> Summary:
    """Write this rank's shards of `urls` to `out_dir` with synthetic captions and scores in each `.json`
    (with `rule`, also `caption_filtered`; a top-fraction rule needs every score first: `filter_shards`)."""
    if rule is not None and rule.top_fraction is not None:
        raise ValueError("--top-fraction ranks the scores of the whole data set: recaption first, then filter")
    spec = DecodeSpec(recaptioner.model.image_size, CaptionKey.parse(caption_key), max_pixels)
    settings = {
        "pass": "recaption",
        "caption_key": spec.caption_key.spec,
        "image_size": spec.image_size,
        "decoding": recaptioner.decoding.describe(),
        "filter": None if rule is None else asdict(rule),
        "seed": seed,
    }

    cutoff = None if rule is None else rule.cutoff(())

    def shard(index: int, url: str, tar: tarfile.TarFile, summary: Summary, skips: SkipLog) -> None:
        torch.manual_seed(seed + index)
        for batch in _batches(read_samples(url), batch_size):
            good = []
            for sample in batch:
                if sample.key is None:  # a member outside any sample: copied, nothing to caption
                    continue
                summary.samples += 1
                try:
                    good.append((sample, decode_sample(sample.decodable(), spec, rng=None), sample.json_record()))
                except BadSample as bad:
                    skips.skip(bad.reason, f"{url}:{sample.key}", bad.detail)
            if good:
                pixels = torch.stack([d["pixels"] for _, d, _ in good]).permute(0, 3, 1, 2)
                records = recaptioner(pixels, [d["caption"] for _, d, _ in good])
                for (sample, _, record), new in zip(good, records, strict=True):
                    if rule is not None:
                        new["caption_filtered"] = rule.kept(new, cutoff)
                    sample.set_json(record | new)
            for sample in batch:
                write_sample(tar, sample)

    return _each_shard(urls, out_dir, settings, shard, rank, world_size, progress, "recaptioning")


def filter_shards(
    urls: Sequence[str], out_dir: Path, rule: FilterRule, rank: int = 0, world_size: int = 1, progress: bool = True
) -> Summary:
    """Write this rank's shards of already recaptioned `urls` to `out_dir` with `caption_filtered` in each
    `.json`. A top-fraction cut is taken over the scores of every shard (each rank reads them all)."""
    cutoff = rule.cutoff(record for url in urls for record in read_json_records(url))
    settings = {"pass": "filter", "filter": asdict(rule)}

    def shard(index: int, url: str, tar: tarfile.TarFile, summary: Summary, skips: SkipLog) -> None:
        for sample in read_samples(url):
            if sample.key is not None:
                try:
                    record = sample.json_record()
                except BadSample as bad:
                    record = {}
                    skips.skip(bad.reason, f"{url}:{sample.key}", bad.detail)
                summary.samples += 1
                if "score_syn" in record:
                    sample.set_json(record | {"caption_filtered": rule.kept(record, cutoff)})
                else:
                    summary.skipped["not_recaptioned"] += 1
            write_sample(tar, sample)

    return _each_shard(urls, out_dir, settings, shard, rank, world_size, progress, "filtering")


ShardPass = Callable[[int, str, tarfile.TarFile, Summary, SkipLog], None]


def _each_shard(
    urls: Sequence[str],
    out_dir: Path,
    settings: dict,
    shard: ShardPass,
    rank: int,
    world_size: int,
    progress: bool,
    what: str,
) -> Summary:
    names = shard_names(urls, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(out_dir, settings, rank)
    mine = list(range(rank, len(urls), world_size))
    if not mine:
        log.warning("rank %d has no shard: %d shards over %d ranks", rank, len(urls), world_size)
    summary, skips = Summary(), SkipLog(counter=SkipCounter())
    with _progress(f"{what} (rank {rank} of {world_size})", len(mine), progress and rank == 0) as advance:
        for index in mine:
            url, target = urls[index], out_dir / names[index]
            for leftover in out_dir.glob(f"{names[index]}.tmp-*"):  # of a rank that was stopped mid-shard
                leftover.unlink(missing_ok=True)
            if target.exists():
                summary.present.append(target.name)
            else:
                try:
                    with shard_writer(target, rank) as tar:
                        shard(index, url, tar, summary, skips)
                    summary.written.append(target.name)
                except SHARD_ERRORS as err:
                    # As training does with an unreadable shard: counted, and the others go on; no output is
                    # written for it, so a rerun tries it again.
                    skips.skip("shard_error", url, repr(err)[:300])
                    summary.failed.append(url)
            advance(summary.samples)
    summary.skipped.update(skips.counts)
    return summary


def _check_settings(out_dir: Path, settings: dict, rank: int) -> None:
    """Record the pass's settings in OUT_DIR, or refuse to add shards written otherwise to those already there."""
    path = out_dir / SETTINGS
    if path.is_file():
        found = json.loads(path.read_text())
        if found != settings:
            differ = sorted(k for k in settings.keys() | found.keys() if settings.get(k) != found.get(k))
            raise ValueError(
                f"OUT_DIR {out_dir} holds shards written with other settings ({', '.join(differ)} differ, see "
                f"{path}): pass another OUT_DIR, or the settings they were written with"
            )
        return
    temp = path.with_name(f"{path.name}.tmp-{rank}")
    temp.write_text(json.dumps(settings, indent=1))
    temp.replace(path)  # every rank writes the same settings: whichever lands last, they agree


def _batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextmanager
def _progress(description: str, total: int, show: bool) -> Iterator[Callable[[int], None]]:
    """A rich bar of shards on stderr (on rank 0 only: the ranks' bars would overwrite one another), with the
    samples done so far; yields `advance(samples so far)`."""
    if not show:
        yield lambda samples: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("shards, {task.fields[samples]} samples"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, samples=0)
        yield lambda samples: bar.update(task, advance=1, samples=samples)


def launcher_rank() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from torchrun's environment; (0, 1, 0) without it."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size}: a rank is in 0 .. WORLD_SIZE - 1")
    return rank, world_size, int(os.environ.get("LOCAL_RANK", str(rank)))
