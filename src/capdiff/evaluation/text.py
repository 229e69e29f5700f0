"""Caption metrics: BLEU-4 and ROUGE-L through torchmetrics, and CIDEr-D.

CIDEr-D is written here because torchmetrics has no CIDEr and the reference implementation (pycocoevalcap)
needs Java for its tokenizer. This follows that implementation exactly (Vedantam et al., 2015, the "-D"
variant used by the COCO caption server): TF-IDF weighted n-grams (n = 1..4) with document frequencies over
the references of the evaluated set, clipped counts, a Gaussian length penalty (σ = 6) and the ×10 scale.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
from torchmetrics.text import BLEUScore, ROUGEScore

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower case, punctuation dropped (what the COCO PTB tokenizer leaves of these captions)."""
    return _TOKEN.findall(text.lower())


def _ngrams(words: list[str], n_max: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


class _TfIdf:
    def __init__(self, references: Sequence[Sequence[str]], n_max: int) -> None:
        self.n_max = n_max
        self.doc_freq: Counter = Counter()
        for refs in references:
            self.doc_freq.update(set().union(*(_ngrams(tokenize(r), n_max) for r in refs)))
        self.log_docs = math.log(float(len(references)))

    def vector(self, text: str) -> tuple[list[dict], np.ndarray, int]:
        counts = _ngrams(tokenize(text), self.n_max)
        vec: list[dict] = [{} for _ in range(self.n_max)]
        norm = np.zeros(self.n_max)
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = tf * (self.log_docs - math.log(max(1.0, self.doc_freq[gram])))
            vec[n][gram] = weight
            norm[n] += weight**2
            if n == 1:  # the reference implementation measures length in bigrams
                length += tf
        return vec, np.sqrt(norm), length


def cider_d(
    generated: Sequence[str], references: Sequence[Sequence[str]], n_max: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and the per-caption scores; `references[i]` are the reference captions of image i."""
    if len(generated) != len(references) or not generated:
        raise ValueError(
            f"cider_d needs one generated caption per reference set: {len(generated)} vs {len(references)}"
        )
    tfidf = _TfIdf(references, n_max)
    scores = []
    for hyp, refs in zip(generated, references, strict=True):
        vec, norm, length = tfidf.vector(hyp)
        total = np.zeros(n_max)
        for ref in refs:
            ref_vec, ref_norm, ref_length = tfidf.vector(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for n in range(n_max):
                overlap = sum(min(w, ref_vec[n][g]) * ref_vec[n][g] for g, w in vec[n].items() if g in ref_vec[n])
                if norm[n] and ref_norm[n]:
                    total[n] += overlap / (norm[n] * ref_norm[n]) * penalty
        scores.append(float(total.mean() / len(refs) * 10.0))
    return float(np.mean(scores)), scores


def caption_scores(generated: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """`bleu4`, `rougeL` (F-measure, best reference) and `cider_d` of generated captions."""
    bleu = BLEUScore(n_gram=4)
    rouge = ROUGEScore(rouge_keys="rougeL", accumulate="best")
    plain = [" ".join(tokenize(g)) for g in generated]
    refs = [[" ".join(tokenize(r)) for r in rs] for rs in references]
    return {
        "bleu4": float(bleu(plain, refs)),
        "rougeL": float(rouge(plain, refs)["rougeL_fmeasure"]),
        "cider_d": cider_d(generated, references)[0],
    }
