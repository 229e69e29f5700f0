"""Shard lists: brace expansion, start-up checks (local files, caption keys) and sample counting, with errors
that name the config key."""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

import braceexpand
import webdataset as wds

from capdiff.data.decode import IMAGE_EXTENSIONS, CaptionKey

# Schemes webdataset's gopen opens itself; anything else with "://" is passed to it too, but is not a local file.
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://", "hf://", "htgs://")


def expand_urls(urls: str | Sequence[str] | None, key: str) -> list[str]:
    """Expand brace notation (`shard-{000..009}.tar`), `::`-joined lists and YAML lists into shard URLs."""
    if urls is None:
        raise ValueError(f"{key} is not set: give shard paths or URLs, e.g. \"{key}='/data/shard-{{000..099}}.tar'\".")
    items = [urls] if isinstance(urls, str) else list(urls)
    expanded: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            part = part.strip()
            if part:
                expanded.extend(braceexpand.braceexpand(os.path.expandvars(os.path.expanduser(part))))
    if not expanded:
        raise ValueError(f"{key} is empty: give at least one shard, e.g. \"{key}='/data/shard-{{000..099}}.tar'\".")
    return expanded


def local_path(url: str) -> Path | None:
    """The file behind a URL when it is a local one (plain path or file:), else None."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    if url.startswith("file:"):
        return Path(url[len("file:") :])
    if url.startswith(_REMOTE_PREFIXES) or "://" in url:
        return None
    return Path(url)


def check_local_shards(urls: list[str], key: str) -> None:
    """Fail before any work starts if a local shard is missing; remote and `pipe:` URLs are opened lazily."""
    missing = [u for u in urls if (p := local_path(u)) is not None and not p.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{key}: {len(missing)} of {len(urls)} shards do not exist ({shown}). Check the path and the brace "
            f"range, e.g. \"{key}='/data/shard-{{000000..000099}}.tar'\"."
        )


_NUMBERED = re.compile(r"^(.*?)(\d+)(\.[^/]*)$")


def unlisted_shards(urls: list[str]) -> dict[str, int]:
    """Local numbered shards beside the listed ones, with the same name but for the number, that the list leaves
    out: `{"<folder>/train-*.tar": how many}`. A brace range written for a smaller set (`{000000..000063}` of
    1 600 shards) trains on a share of the data without any error; start-up warns with this."""
    listed: dict[tuple[Path, str, str], set[str]] = {}
    for url in urls:
        path = local_path(url)
        match = _NUMBERED.match(path.name) if path is not None else None
        if match:
            listed.setdefault((path.parent, match[1], match[3]), set()).add(path.name)
    out = {}
    for (folder, prefix, suffix), names in listed.items():
        present = {p.name for p in folder.glob(f"{glob_escape(prefix)}*{glob_escape(suffix)}")
                   if (m := _NUMBERED.match(p.name)) and (m[1], m[3]) == (prefix, suffix)}  # fmt: skip
        if missing := len(present - names):
            out[str(folder / f"{prefix}*{suffix}")] = missing
    return out


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def count_samples(path: Path, images_only: bool = True) -> int:
    """Samples (distinct keys with an image member; with `images_only=False`, any member) in a local tar shard,
    reading headers only."""
    keys = set()
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            name = member.name
            base = name.rsplit("/", 1)[-1]
            stem, dot, ext = base.partition(".")
            if dot and (not images_only or ext.lower() in IMAGE_EXTENSIONS):
                keys.add(name[: len(name) - len(base)] + stem)
    return len(keys)


def first_n_cutoff(urls: list[str], n: int) -> tuple[int, int] | None:
    """The place `(shard index, position)` of the split's n-th sample, in shard order: samples whose place comes
    before it are the split's first n, however many ranks and workers read them. None: the split has no more
    than n samples, or a shard is not a local file (it cannot be counted)."""
    seen = 0
    for index, url in enumerate(urls):
        path = local_path(url)
        if path is None:
            return None
        count = count_samples(path, images_only=False)
        if seen + count >= n:
            return (index, n - seen)
        seen += count
    return None


def check_caption_key(url: str, caption_key: CaptionKey, key: str, max_samples: int = 16) -> None:
    """Fail at start-up when none of the first samples of the shard `url` has the caption key (`key`: the
    config key it came from)."""
    errors: list[Exception] = []

    def keep_going(err: Exception) -> bool:
        errors.append(err)
        return True

    seen = []
    for sample in wds.tarfile_samples([{"url": url}], handler=keep_going):
        seen.append(sample)
        if caption_key.present_in(sample) or len(seen) >= max_samples:
            break
    if not seen or any(caption_key.present_in(s) for s in seen):
        return
    members = sorted({k for s in seen for k in s if not k.startswith("__")})
    raise ValueError(
        f"{key}={caption_key.spec!r} is in none of the first {len(seen)} samples of {url}; they have members "
        f"{members}. Set {key} to one of them (e.g. 'txt') or to a field of the json member (e.g. 'json.caption')."
    )
