"""Caption metrics as the COCO caption server computes them: BLEU-4, ROUGE-L and CIDEr-D.

Each follows pycocoevalcap (the code behind the COCO caption results), and tests/test_caption_metrics.py
holds them equal to it on the same tokenized captions. They are written here rather than imported because
pycocoevalcap carries 100 MB of Java and data (PTB tokenizer, METEOR, SPICE), and torchmetrics' versions
are other metrics under the same names: its BLEU is 0 whenever one n-gram order has no match and breaks
ties between reference lengths differently, and its ROUGE-L is the β = 1 F-measure of the best reference.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

Words = Sequence[str]


def tokenize(text: str) -> list[str]:
    """Lower case, punctuation dropped (what the COCO PTB tokenizer leaves of these captions)."""
    return _TOKEN.findall(text.lower())


def _ngrams(words: Words, n_max: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def _bleu(generated: Sequence[Words], references: Sequence[Sequence[Words]], n_max: int = 4) -> float:
    """Corpus BLEU (Papineni et al., 2002) as pycocoevalcap's `Bleu`: clipped n-gram counts summed over the
    corpus, the brevity penalty against the reference length closest to each caption's (the shorter on a
    tie), and its constants 1e-15 and 1e-9 that keep an n-gram order without a match from zeroing the score."""
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n_max, [0] * n_max
    hyp_length = ref_length = 0
    for hyp, refs in zip(generated, references, strict=True):
        ref_counts: Counter = Counter()
        for ref in refs:
            ref_counts |= _ngrams(ref, n_max)
        for gram, count in _ngrams(hyp, n_max).items():
            correct[len(gram) - 1] += min(count, ref_counts[gram])
        for n in range(n_max):
            guess[n] += max(0, len(hyp) - n)
        hyp_length += len(hyp)
        ref_length += min((abs(len(ref) - len(hyp)), len(ref)) for ref in refs)[1]
    score = 1.0
    for n in range(n_max):
        score *= (correct[n] + tiny) / (guess[n] + small)
    score **= 1.0 / n_max
    ratio = (hyp_length + tiny) / (ref_length + small)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def _lcs(a: Words, b: Words) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], (diagonal + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def _rouge_l(generated: Sequence[Words], references: Sequence[Sequence[Words]], beta: float = 1.2) -> float:
    """ROUGE-L (Lin, 2004) as pycocoevalcap's `Rouge`: the longest common subsequence with each reference
    gives a precision and a recall; the best precision and the best recall (from whichever references) make
    the F-measure with β = 1.2, and the corpus score is the mean over images."""
    scores = []
    for hyp, refs in zip(generated, references, strict=True):
        lcs = [_lcs(hyp, ref) for ref in refs]
        precision = max(lcs) / max(len(hyp), 1)
        recall = max(common / max(len(ref), 1) for common, ref in zip(lcs, refs, strict=True))
        f = (1 + beta**2) * precision * recall / (recall + beta**2 * precision) if precision and recall else 0.0
        scores.append(f)
    return float(np.mean(scores))


class _TfIdf:
    def __init__(self, references: Sequence[Sequence[Words]], n_max: int) -> None:
        self.n_max = n_max
        self.doc_freq: Counter = Counter()
        for refs in references:
            self.doc_freq.update(set().union(*(_ngrams(r, n_max) for r in refs)))
        self.log_docs = math.log(float(len(references)))

    def vector(self, words: Words) -> tuple[list[dict], np.ndarray, int]:
        vec: list[dict] = [{} for _ in range(self.n_max)]
        norm = np.zeros(self.n_max)
        length = 0
        for gram, tf in _ngrams(words, self.n_max).items():
            n = len(gram) - 1
            weight = tf * (self.log_docs - math.log(max(1.0, self.doc_freq[gram])))
            vec[n][gram] = weight
            norm[n] += weight**2
            if n == 1:  # the reference implementation measures length in bigrams
                length += tf
        return vec, np.sqrt(norm), length


def _cider_d(
    generated: Sequence[Words], references: Sequence[Sequence[Words]], n_max: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al., 2015) as pycocoevalcap's `Cider`: TF-IDF weighted n-grams (n = 1..4) with
    document frequencies over the references of the evaluated set, the caption's weights clipped to the
    reference's, a Gaussian length penalty (σ = 6), the mean over references and the ×10 scale."""
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


def _tokenized(
    generated: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[list[str]], list[list[list[str]]]]:
    if len(generated) != len(references) or not generated:
        raise ValueError(
            f"caption metrics need one generated caption per reference set: {len(generated)} vs {len(references)}"
        )
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"caption metrics need a reference caption for every image; images {empty} have none")
    return [tokenize(g) for g in generated], [[tokenize(r) for r in refs] for refs in references]


def cider_d(generated: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and the per-caption scores; `references[i]` are the reference captions of image i."""
    return _cider_d(*_tokenized(generated, references))


def caption_scores(generated: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """`bleu4`, `rougeL` and `cider_d` of generated captions; `references[i]` are those of image i."""
    words, ref_words = _tokenized(generated, references)
    return {
        "bleu4": _bleu(words, ref_words),
        "rougeL": _rouge_l(words, ref_words),
        "cider_d": _cider_d(words, ref_words)[0],
    }
