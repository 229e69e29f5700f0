"""Library notices that every capdiff run would print although nothing is wrong, silenced in one place by
their exact message (never a whole category, so any other warning of the same kind still shows).

`quiet_known_warnings()` is called by train.py and evaluate.py; each entry says why its notice does not apply.
The model summary's empty FLOPs count is fixed where it arises instead (`capdiff.summary.ModelSummary`).
"""

from __future__ import annotations

import logging
import warnings

# (message regex, matched from the message's start; category), each with why it is benign for capdiff
KNOWN_WARNINGS: list[tuple[str, type[Warning]]] = [
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        # Lightning's CombinedLoader builds a torch pytree LeafSpec for every loader, a class torch deprecated;
        # nothing in capdiff uses it.
    ),
    (
        r"Your `IterableDataset` has `__len__` defined\. In combination with multi-process data loading",
        UserWarning,
        # capdiff's training stream resamples shards in every (rank, worker) and cuts a fixed number of
        # batches per worker (capdiff.data.streams), so `__len__` is right with any num_workers.
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        UserWarning,
        # The frozen parts (VAE, a frozen CLIP tower or LLM) are in eval mode on purpose (JointModel.train).
    ),
    (
        r"Metric `Kernel Inception Distance` will save all extracted features in buffer",
        UserWarning,
        # evaluate.py keeps eval.num_samples features per side (512 by default) by design: KID needs them all.
    ),
]

# Info lines of Lightning's that every Trainer logs: adverts for its cloud products, and that it adds no default
# model summary where the callbacks config has capdiff's own (conf/callbacks/default.yaml).
KNOWN_LOG_LINES: tuple[str, ...] = (
    "💡 Tip: For seamless cloud logging and experiment tracking",
    "💡 Tip: For seamless cloud uploads and versioning",
    "Trainer already configured with model summary callbacks",
)
LIGHTNING_INFO_LOGGER = "pytorch_lightning.utilities.rank_zero"
# transformers' notice when a generated token equals the pad token and the model got no attention mask. Caption
# generation has no padding (every row's prefix has the same length), so its mask is all ones, which generate()
# drops before the forward pass; the notice then fires the first time the model samples its pad token.
TRANSFORMERS_LOGGER = "transformers.modeling_utils"
KNOWN_TRANSFORMERS_LINES: tuple[str, ...] = ("We strongly recommend passing in an `attention_mask`",)


class _DropKnownLines(logging.Filter):
    def __init__(self, lines: tuple[str, ...]) -> None:
        super().__init__()
        self.lines = lines

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.lines)


def quiet_known_warnings() -> None:
    """Install the filters for this process (idempotent: warnings.filterwarnings replaces an equal filter)."""
    for pattern, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, lines in ((LIGHTNING_INFO_LOGGER, KNOWN_LOG_LINES), (TRANSFORMERS_LOGGER, KNOWN_TRANSFORMERS_LINES)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownLines) for f in logger.filters):
            logger.addFilter(_DropKnownLines(lines))
