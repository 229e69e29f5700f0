"""Which captions of a recaptioned sample to train on: CapFilt's filter (Li et al. 2022, BLIP, §3.3), with the
checkpoint's own image–text score as the judge.

BLIP's filter drops the web text and the synthetic text of an image each on its own when the image–text
matching head finds them unmatched. Here each candidate (the original caption, the best synthetic one, or
both) is kept when its score reaches a threshold, or when it is among the top fraction of every candidate's
score in the data set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KEEP = ("orig", "best_syn", "both")


@dataclass(frozen=True)
class FilterRule:
    """`keep`: which candidates are considered; `threshold` (a score, 100 × cosine) or `top_fraction` (in
    (0, 1]) decides which of them stay; with neither, every considered candidate stays."""

    keep: str = "both"
    threshold: float | None = None
    top_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.keep not in KEEP:
            raise ValueError(f"--keep {self.keep}: not one of {', '.join(KEEP)}")
        if self.threshold is not None and self.top_fraction is not None:
            raise ValueError("--threshold and --top-fraction are two rules; give one of them")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"--top-fraction {self.top_fraction}: not in (0, 1]")

    def candidates(self, record: dict) -> list[tuple[str, float]]:
        """(caption, score) pairs of a recaptioned json record that the rule considers, original first."""
        found = []
        if self.keep in ("orig", "both") and record.get("caption_orig"):
            found.append((record["caption_orig"], float(record["score_orig"])))
        syn = [(c, float(s)) for c, s in zip(record.get("caption_syn", []), record.get("score_syn", []), strict=True)]
        syn = [pair for pair in syn if pair[0]]
        if self.keep in ("best_syn", "both") and syn:
            best = max(syn, key=lambda pair: pair[1])  # the first of equal scores
            if not found or best[0] != found[0][0]:
                found.append(best)
        return found

    def cutoff(self, records: Iterable[dict]) -> float:
        """The lowest score that stays. With `top_fraction`, the score of the ⌈fraction × n⌉-th best of the n
        candidates of `records`: ties at the cut all stay, so the result does not depend on sample order."""
        if self.threshold is not None:
            return float(self.threshold)
        if self.top_fraction is None:
            return -math.inf
        scores = sorted((s for record in records for _, s in self.candidates(record)), reverse=True)
        if not scores:
            return -math.inf
        return scores[math.ceil(self.top_fraction * len(scores)) - 1]

    def kept(self, record: dict, cutoff: float) -> list[str]:
        return [caption for caption, score in self.candidates(record) if score >= cutoff]


def filter_captions(records: Sequence[dict], rule: FilterRule) -> list[list[str]]:
    """The captions each record keeps under `rule`, the cut taken over all of `records`."""
    cutoff = rule.cutoff(records)
    return [rule.kept(record, cutoff) for record in records]
