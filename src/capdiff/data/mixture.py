"""Weighted mixtures the training stream draws from: of sources (`data.sources`) and of caption fields
(`data.caption_mix`).

Both are drawn per sample by the generator of the stream's (rank, worker) slot, so a mixture is as
reproducible and as resumable as one source: the same (seed, rank, worker, epoch) makes the same draws.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

from capdiff.data.decode import CaptionKey
from capdiff.data.urls import expand_urls

SOURCE_KEYS = ("urls", "weight", "caption_key", "name")
SOURCES_EXAMPLE = 'data.sources=[{urls:"/a/{000..099}.tar",weight:3},{urls:"/b/{000..009}.tar",weight:1}]'


@dataclass(frozen=True)
class CaptionMix:
    """Which caption key a training sample's caption comes from: drawn per sample with these probabilities."""

    keys: tuple[CaptionKey, ...]
    probabilities: tuple[float, ...]

    @classmethod
    def parse(cls, mix: Mapping, key: str = "data.caption_mix") -> CaptionMix:
        if not isinstance(mix, Mapping) or not mix:
            raise ValueError(
                f"{key}={mix!r} must map caption keys to probabilities, e.g. {key}={{json.caption_syn:0.9,"
                "json.caption:0.1}, or be null (every caption from data.caption_key)."
            )
        keys = tuple(CaptionKey.parse(spec, f"{key} key") for spec in mix)
        probabilities = tuple(_positive(p, f"{key}.{spec}", "a probability") for spec, p in mix.items())
        if abs(sum(probabilities) - 1) > 1e-6:
            raise ValueError(f"{key}: the probabilities {list(probabilities)} sum to {sum(probabilities):g}, not 1.")
        return cls(keys, probabilities)

    @property
    def members(self) -> set[str]:
        return {k.member for k in self.keys}

    def pick(self, rng: random.Random) -> CaptionKey:
        return rng.choices(self.keys, self.probabilities)[0]


@dataclass(frozen=True)
class Source:
    """One source of the training mixture: its shards, its weight and where its captions are. `urls_key` and
    `caption_key_name` are the config keys they came from, for errors."""

    name: str
    urls: list[str]
    weight: float
    caption_key: CaptionKey
    caption_mix: CaptionMix | None
    urls_key: str
    caption_key_name: str


def parse_sources(
    sources: Sequence[Mapping] | None,
    train_urls: str | Sequence[str] | None,
    caption_key: CaptionKey,
    caption_mix: CaptionMix | None,
) -> list[Source]:
    """`data.sources` (or `data.train_urls` as one source) checked key by key, before any shard is read."""
    default_name = "data.caption_mix" if caption_mix is not None else "data.caption_key"
    if sources is not None and train_urls is not None:
        raise ValueError(
            "data.train_urls and data.sources are both set: give the training shards in one of them "
            "(data.sources for a weighted mixture, data.train_urls for one source)."
        )
    if sources is None:
        if train_urls is None:
            return []
        urls = expand_urls(train_urls, "data.train_urls")
        return [Source("source0", urls, 1.0, caption_key, caption_mix, "data.train_urls", default_name)]
    if isinstance(sources, str | Mapping) or not isinstance(sources, Sequence) or not sources:
        raise ValueError(f"data.sources={sources!r} must be a non-empty list of sources, e.g. '{SOURCES_EXAMPLE}'.")
    parsed = []
    for index, source in enumerate(sources):
        key = f"data.sources[{index}]"
        if not isinstance(source, Mapping):
            raise ValueError(f"{key}={source!r} must be a mapping with urls and weight, e.g. '{SOURCES_EXAMPLE}'.")
        unknown = sorted(set(source) - set(SOURCE_KEYS))
        if unknown:
            raise ValueError(f"{key} has unknown keys {unknown}; known: {', '.join(SOURCE_KEYS)}.")
        if source.get("weight") is None:
            raise ValueError(f"{key}.weight is not set: give each source a weight (its share, relative to the rest).")
        weight = _positive(source["weight"], f"{key}.weight", "a weight (its share, relative to the other sources)")
        name = source.get("name")
        name = f"source{index}" if name is None else str(name)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(
                f"{key}.name={name!r}: use letters, digits, '_', '.' or '-' (it names the source's metrics, "
                "data/<name>/skipped_<reason>)."
            )
        if any(s.name == name for s in parsed):
            raise ValueError(f"{key}.name={name!r} is another source's name too: give each source its own.")
        urls = expand_urls(source.get("urls"), f"{key}.urls")
        if source.get("caption_key") is None:
            parsed.append(Source(name, urls, weight, caption_key, caption_mix, f"{key}.urls", default_name))
        else:
            own = CaptionKey.parse(source["caption_key"], f"{key}.caption_key")
            parsed.append(Source(name, urls, weight, own, None, f"{key}.urls", f"{key}.caption_key"))
    return parsed


def mix(streams: Sequence[Iterator[dict]], weights: Sequence[float], rng: random.Random) -> Iterator[dict]:
    """Samples drawn from `streams[i]` with probability `weights[i] / sum(weights)`, each from where that
    stream left off (one stream: its samples, with no draw)."""
    if len(streams) == 1:
        yield from streams[0]
        return
    indices, cumulative = range(len(streams)), list(accumulate(weights))
    while True:
        yield next(streams[rng.choices(indices, cum_weights=cumulative)[0]])


def _positive(value: object, key: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}={value!r} must be a positive number: {what}.")
    return float(value)
