"""Recaptioning: new captions for a data set's images from a trained checkpoint, scored and filtered as in
CapFilt (Li et al. 2022, BLIP, §3.3), written as new shards.

    python -m capdiff.recaption CKPT 'URLS' OUT_DIR [--num-beams N | --sample] [--num-candidates N]
                                [--keep orig|best_syn|both --threshold S]
    python -m capdiff.recaption --filter 'RECAPTIONED_URLS' OUT_DIR --top-fraction F [--keep ...]
    torchrun --nproc-per-node 8 -m capdiff.recaption ...     each rank its share of the shards

(the same as `capdiff recaption ...`). Every member of every sample is copied with its name and bytes; the
`.json` member (made when a sample has none) keeps its fields and gains:

    caption_orig      the caption read with --caption-key (its first one, as validation reads it)
    score_orig        its image–text score: 100 × the cosine of the contrastive embeddings, at least 0
    caption_syn       the synthetic captions, best-scored first
    score_syn         their scores, in the same order
    caption_filtered  with a filter rule: the captions it keeps, original first (possibly none)

so training reads them with `data.caption_key=json.caption_syn` or `json.caption_filtered`. A sample that
training would skip (an undecodable image, no caption) is copied unchanged and counted by the same reason.
OUT_DIR/recaption.json records the settings; adding shards written otherwise to the same folder is refused.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capdiff.recaption.captioning import Decoding, Recaptioner
    from capdiff.recaption.filtering import FilterRule, filter_captions
    from capdiff.recaption.run import Summary, filter_shards, recaption

# Loaded on first use (PEP 562): the capdiff command imports the options (capdiff.recaption.command) to build
# its parser, and every verb would otherwise pay for torch and the model libraries.
_HOMES = {
    "Decoding": "capdiff.recaption.captioning",
    "Recaptioner": "capdiff.recaption.captioning",
    "FilterRule": "capdiff.recaption.filtering",
    "filter_captions": "capdiff.recaption.filtering",
    "Summary": "capdiff.recaption.run",
    "filter_shards": "capdiff.recaption.run",
    "recaption": "capdiff.recaption.run",
}
__all__ = ["Decoding", "FilterRule", "Recaptioner", "Summary", "filter_captions", "filter_shards", "main", "recaption"]


def main(argv: list[str] | None = None) -> int:
    """`python -m capdiff.recaption ARGS`: the same as `capdiff recaption ARGS`."""
    import sys

    from capdiff.cli import main as capdiff_main

    return capdiff_main(["recaption", *(sys.argv[1:] if argv is None else argv)])


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
