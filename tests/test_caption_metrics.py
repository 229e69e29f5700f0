"""BLEU-4, ROUGE-L and CIDEr-D equal pycocoevalcap's, the code behind the COCO caption results, on the same
tokenized captions. Its PTB tokenizer needs Java, so both sides get capdiff's tokens joined by spaces."""

from __future__ import annotations

import pytest

from capdiff.evaluation.text import caption_scores, cider_d, tokenize
from tests.helpers import skip_or_fail

# Several references per image, hypotheses shorter and longer than them, repeated n-grams, one with no word
# in common, one-word ones, punctuation and capitals in the references.
COCO_LIKE = [
    (
        "a man riding a wave on a surfboard",
        [
            "A man riding a wave on top of a surfboard.",
            "A surfer rides a large wave in the ocean.",
            "A man on a surfboard riding a wave!",
            "Surfer in a wet suit riding a wave.",
            "A person surfing on a big, blue wave.",
        ],
    ),
    (
        "a dog a dog a dog a dog on the grass",
        ["Two dogs play with a red ball in the grass.", "Two brown dogs running on the grass.", "A pair of dogs."],
    ),
    ("a red circle in the top left", ["A red circle in the top left."]),
    (
        "Zebras grazing near tall trees.",
        [
            "A cat sitting on a laptop keyboard.",
            "The cat is lying on the keyboard of a laptop.",
            "A grey cat on a computer.",
            "Cat sleeping on an open laptop.",
        ],
    ),
    (
        "a red bus driving down a busy city street next to many tall buildings and people walking",
        ["A bus driving down a city street.", "A red double-decker bus on the street."],
    ),
    ("kitchen", ["A kitchen with a stove and a sink.", "The kitchen has wooden cabinets.", "It's a small kitchen."]),
    ("A small dog on grass.", ["The small dog sits on grass.", "A dog on grass."]),
    ("a green green triangle triangle at at the bottom", ["A green triangle at the bottom."]),
]

# Captions shorter than their references, so the brevity penalty applies (against the shorter of two equally
# close reference lengths: 4 and 6 for a 5-word caption), and no 4-gram in common: what an early checkpoint writes.
SHORT = [
    ("a red square", ["a red circle at the top"]),
    ("blue circle in a corner", ["A blue circle in the middle.", "The circle is blue."]),
    ("green", ["a small green triangle"]),
    ("a circle", ["A yellow circle on a gray background.", "Yellow circle, gray background."]),
    ("purple triangle at the left", ["a purple triangle on the left", "The triangle is on the left side."]),
    ("square", ["a big orange square"]),
]


@pytest.fixture(scope="module")
def coco_scores():
    """pycocoevalcap's corpus BLEU-4, ROUGE-L, CIDEr-D and per-image CIDEr-D of tokenized captions."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as error:
        skip_or_fail(f"pycocoevalcap is not installed ({error}): make install (EXTRAS with dev)")

    def scores(gts: dict, res: dict) -> tuple[dict[str, float], list[float]]:
        cider, per_image = Cider().compute_score(gts, res)
        corpus = {
            "bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
            "rougeL": Rouge().compute_score(gts, res)[0],
            "cider_d": cider,
        }
        return corpus, list(per_image)

    return scores


@pytest.mark.parametrize("cases", [COCO_LIKE, SHORT], ids=["coco_like", "short"])
def test_caption_metrics_equal_pycocoevalcap(coco_scores, cases) -> None:
    generated, references = [g for g, _ in cases], [refs for _, refs in cases]
    res = {i: [" ".join(tokenize(g))] for i, g in enumerate(generated)}
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    expected, expected_per_image = coco_scores(gts, res)
    assert caption_scores(generated, references) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert cider_d(generated, references)[1] == pytest.approx(expected_per_image, rel=1e-9, abs=1e-12)
