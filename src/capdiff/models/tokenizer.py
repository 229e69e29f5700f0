"""Tokenizers: any Hugging Face tokenizer by name or folder, or a small byte-level BPE built for the tiny preset.

The tiny preset trains a byte-level BPE on the run's own training captions (a few seconds) and saves it as
a standard tokenizer folder, so it is loaded through the same `AutoTokenizer.from_pretrained` path as GPT-2's.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from capdiff.distributed import partial_path
from capdiff.models.hub import TOKENIZER, load_pretrained

log = logging.getLogger(__name__)

END = "<|endoftext|>"
PAD = "<|pad|>"


def build_byte_bpe(captions: Iterable[str], folder: str | Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on `captions` and save it to `folder` (written whole, then renamed)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END, eos_token=END, pad_token=PAD)
    folder = Path(folder)
    partial = partial_path(folder)
    shutil.rmtree(partial, ignore_errors=True)
    fast.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    log.info("built a %d-token byte-level BPE tokenizer in %s", len(fast), folder)
    return folder


def load_tokenizer(name_or_path: str, key: str = "model.llm.tokenizer") -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token and right padding, as the captioner expects."""
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_path, key, markers=TOKENIZER)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
