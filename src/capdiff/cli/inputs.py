"""What the `capdiff` verbs check before any work: numbers in range, a checkpoint that loads, images that decode
and an output folder that can be written, each refused as a UsageError that names the argument and the fix."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from capdiff.samplers import check_sampler, usable_samplers

if TYPE_CHECKING:
    from PIL import Image

    from capdiff.pipeline import Pipeline

MAX_PIXELS = 64_000_000  # as capdiff.data.shards: larger inputs are refused before they are decoded
# What reading a file that is no capdiff checkpoint (or export) raises: torch.load, the hyperparameters, the weights.
LOAD_ERRORS = (OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError, TypeError)


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def _number(kind: type, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    value = _number(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def strength(text: str) -> float:
    value = _number(float, text, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]; leave --strength out for DDIM inversion")
    return value


def sampler(text: str) -> str:
    try:
        return check_sampler(text, "--sampler")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--sampler=")) from None


def port(text: str) -> int:
    value = _number(int, text, "an integer")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (1-65535)")
    return value


def checked_checkpoint(path: str, option: str = "--ckpt", folders: bool = True) -> Path:
    """`path` as a Path when it is a checkpoint file (or, with `folders`, an export folder); else a UsageError."""
    found = Path(path)
    from capdiff.checkpoints.portable import is_sharded_checkpoint

    made_by = "train.py (logs/train/runs/<run>/checkpoints/last.ckpt)"
    if is_sharded_checkpoint(found):  # trainer=fsdp's folder of shards
        return found
    if folders and found.is_dir():
        if not (found / "capdiff.json").is_file():
            raise UsageError(
                f"{option} {path}: this folder is not a capdiff export (no capdiff.json); pass a .ckpt written by "
                f"{made_by} or a folder written by `capdiff export`"
            )
        return found
    if not found.is_file():
        what = "no such file" if not found.exists() else "not a file"
        also = " or a folder written by `capdiff export`" if folders else ""
        raise UsageError(f"{option} {path}: {what}; pass a .ckpt written by {made_by}{also}")
    return found


def load_pipeline(
    path: Path, device: str | None, option: str = "--ckpt", ema: bool = True, folders: bool = True
) -> Pipeline:
    """The Pipeline of a checkpoint (its EMA weights with `ema`) or export folder on `device` (None: the
    Pipeline's default)."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from capdiff.checkpoints.portable import is_sharded_checkpoint
    from capdiff.pipeline import Pipeline

    # The libraries' per-file loading bars would interleave with capdiff's own progress on stderr.
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()

    if device is not None:  # None: the Pipeline's own default, a GPU when there is one
        try:
            chosen = torch.device(device)
        except RuntimeError as err:
            raise UsageError(f"--device {device}: {err}; pass cpu, cuda or cuda:N") from err
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no CUDA device here; pass --device cpu")
        if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise UsageError(f"--device {device}: torch sees {count} CUDA device(s); pass cuda:0 to cuda:{count - 1}")
    try:
        if path.is_dir() and not is_sharded_checkpoint(path):
            return Pipeline.from_pretrained(path, device=device)
        return Pipeline.from_checkpoint(path, ema=ema, device=device)
    except LOAD_ERRORS as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        also = " or a folder written by `capdiff export`" if folders else ""
        raise UsageError(
            f"{option} {path}: cannot load it as a capdiff checkpoint ({first}); pass a .ckpt written by train.py{also}"
        ) from err


def read_image(path: str, option: str = "IMG") -> Image.Image:
    """An image file decoded to RGB as training decodes shard images (alpha on white); else a UsageError."""
    from capdiff.data.decode import BadSample, load_rgb

    file = Path(path)
    if not file.is_file():
        raise UsageError(
            f"{option} {path}: {'no such file' if not file.exists() else 'not a file'}; pass an image file"
        )
    try:
        return load_rgb(file.read_bytes(), MAX_PIXELS)
    except BadSample as err:
        why = {
            "empty_image": "the file is empty",
            "truncated_image": "the file is truncated",
            "too_large": err.detail,
        }.get(err.reason, "PIL cannot decode it")
        raise UsageError(f"{option} {path}: cannot read it as an image ({why}); pass a PNG, JPEG or WebP file") from err
    except OSError as err:
        raise UsageError(
            f"{option} {path}: cannot read it ({err.strerror or err}); pass a readable image file"
        ) from err


def out_folder(path: str) -> Path:
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {path}: exists and is not a folder; pass a folder (made if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"--out {path}: cannot make the folder ({err.strerror or err}); pass a writable folder"
        ) from err
    return folder


NEEDS = {
    "caption": ("a captioner", "trained with model.loss.weights.caption=0, or a text_gan model"),
    "generate": ("an image generator", "trained with model.loss.weights.diffusion=0"),
    "edit": ("a latent diffusion UNet", "editing inverts and denoises latents, which a text_gan model has not"),
}


def require_sampler(pipe: Pipeline, name: str | None) -> None:
    """A UsageError when sampler `name` cannot sample this model (one trained with zero terminal SNR)."""
    diffusion = getattr(pipe.model, "diffusion", None)
    if name is not None and diffusion is not None and diffusion.zero_terminal_snr:
        try:
            check_sampler(name, "--sampler", zero_terminal_snr=True)
        except ValueError:
            raise UsageError(
                f"--sampler {name}: cannot sample this model, trained with zero terminal SNR; pass one of "
                f"{', '.join(usable_samplers(True))}"
            ) from None


def require(pipe: Pipeline, verb: str, ckpt: str) -> None:
    """A UsageError when the model cannot do what a verb needs (`caption`, `generate`, `edit`)."""
    model = pipe.model
    able = {"caption": model.can_caption, "generate": model.can_generate}.get(verb)
    if able is None:
        able = getattr(model, "diffusion", None) is not None
    if not able:
        needs, why = NEEDS[verb]
        raise UsageError(f"--ckpt {ckpt}: this model has no {needs} ({why}); pass one that has it")
