"""The `capdiff` command: caption images, generate or edit them, export a checkpoint, serve the demo page.

    capdiff caption  --ckpt CKPT IMG...                 one line per image: PATH<TAB>CAPTION
    capdiff generate --ckpt CKPT PROMPT... [-n N] --out DIR   writes PNGs, prints their paths
    capdiff edit     --ckpt CKPT IMG PROMPT [--strength S] --out DIR   writes one PNG, prints its path
    capdiff export   CKPT DIR                           the folder `Pipeline.from_pretrained` loads
    capdiff demo     CKPT [--port N]                    a Gradio page on 127.0.0.1 (needs the `demo` extra)

CKPT is a `.ckpt` written by train.py or, except for `export`, a folder written by `capdiff export`. Results go
to stdout, progress bars and messages to stderr. Bad input (a missing checkpoint, an unreadable image, a
value out of range) ends with one line naming the argument and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from capdiff.pipeline import Pipeline

USAGE_ERROR = 2
MAX_PIXELS = 64_000_000  # as capdiff.data.shards: larger inputs are refused before they are decoded
# What reading a file that is no capdiff checkpoint (or export) raises: torch.load, the hyperparameters, the weights.
LOAD_ERRORS = (OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError, TypeError)


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UsageError as err:
        print(f"capdiff {args.verb}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capdiff",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[2].strip() + "\n\nRun `capdiff VERB --help` for a verb's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    caption = verbs.add_parser(
        "caption",
        help="caption images",
        description="Caption images. Prints one line per image, in the order given: the path as given, a tab, "
        "the caption (whitespace inside a caption is a single space, so `cut -f2` reads the captions).",
    )
    _ckpt_option(caption)
    caption.add_argument("images", nargs="+", metavar="IMG", help="image files (PNG, JPEG, WebP, ...; any size)")
    caption.add_argument(
        "--num-beams", metavar="N", type=_positive_int, default=1, help="beam search width (default 1: greedy)"
    )
    caption.add_argument(
        "--max-new-tokens",
        metavar="N",
        type=_positive_int,
        default=None,
        help="caption length limit (default: the model's)",
    )
    caption.add_argument(
        "--batch-size", metavar="N", type=_positive_int, default=16, help="images per forward pass (default 16)"
    )
    _device_option(caption)
    caption.set_defaults(run=run_caption)

    generate = verbs.add_parser(
        "generate",
        help="generate images from prompts",
        description="Generate images from text prompts. Writes N PNGs per prompt to --out and prints each "
        "written path on its own line. Image i of the run (prompts in order, N copies each) starts from the "
        "noise of seed + i, so the same command writes the same images.",
    )
    _ckpt_option(generate)
    generate.add_argument("prompts", nargs="+", metavar="PROMPT", help="text prompts (quote each one)")
    generate.add_argument(
        "-n", "--num-images", metavar="N", type=_positive_int, default=1, help="images per prompt (default 1)"
    )
    _out_option(generate)
    _sampling_options(generate)
    generate.add_argument(
        "--batch-size", metavar="N", type=_positive_int, default=8, help="images per sampling batch (default 8)"
    )
    _device_option(generate)
    generate.set_defaults(run=run_generate)

    edit = verbs.add_parser(
        "edit",
        help="edit an image to match a prompt",
        description="Edit an image to match a prompt. Writes OUT/<image name>-edit.png and prints its path. "
        "Without --strength: DDIM-invert the image under --source-prompt (default: the model's own caption of "
        "it) and regenerate under PROMPT. With --strength S in (0, 1]: SDEdit, noising the image to that share "
        "of the schedule and denoising under PROMPT (lower keeps more of the image).",
    )
    _ckpt_option(edit)
    edit.add_argument("image", metavar="IMG", help="the image file to edit")
    edit.add_argument("prompt", metavar="PROMPT", help="what the image should show")
    edit.add_argument(
        "--strength",
        metavar="S",
        type=_strength,
        default=None,
        help="SDEdit strength in (0, 1] (default: DDIM inversion)",
    )
    edit.add_argument(
        "--source-prompt", metavar="TEXT", default=None, help="what the image shows (default: the model's caption)"
    )
    _out_option(edit)
    _sampling_options(edit)
    _device_option(edit)
    edit.set_defaults(run=run_edit)

    export = verbs.add_parser(
        "export",
        help="export a checkpoint to standard sub-folders",
        description="Export a training checkpoint to a folder of diffusers/transformers sub-folders plus "
        "capdiff's heads (as `python -m capdiff.export`); `Pipeline.from_pretrained(DIR)` and the other "
        "verbs' --ckpt load it. Prints the folder.",
    )
    export.add_argument("checkpoint", metavar="CKPT", help="a .ckpt written by train.py")
    export.add_argument("folder", metavar="DIR", help="where to write the export")
    export.add_argument("--no-ema", action="store_true", help="export the live weights, not the EMA average")
    export.set_defaults(run=run_export)

    demo = verbs.add_parser(
        "demo",
        help="serve the caption / generate / edit page on localhost",
        description="Serve a Gradio page with three tabs (caption, generate, edit) on http://127.0.0.1:PORT "
        "until interrupted. Needs the `demo` extra (pip install -c constraints.txt -e '.[demo]'); works "
        "offline and sends no analytics.",
    )
    demo.add_argument("checkpoint", metavar="CKPT", help="a .ckpt written by train.py, or a `capdiff export` folder")
    demo.add_argument("--port", metavar="N", type=_port, default=7860, help="the port on 127.0.0.1 (default 7860)")
    demo.add_argument(
        "--steps", metavar="N", type=_positive_int, default=50, help="the page's initial DDIM steps (default 50)"
    )
    _device_option(demo)
    demo.set_defaults(run=run_demo)
    return parser


def _ckpt_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt",
        required=True,
        metavar="CKPT",
        help="a .ckpt written by train.py (logs/train/runs/<run>/checkpoints/last.ckpt) or a `capdiff export` folder",
    )


def _out_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default=".", metavar="DIR", help="the folder for the PNGs (made if missing; default .)"
    )


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", metavar="N", type=_positive_int, default=50, help="DDIM steps (default 50)")
    parser.add_argument(
        "--guidance-scale",
        metavar="G",
        type=float,
        default=4.0,
        help="classifier-free guidance scale (default 4; 1: none)",
    )
    parser.add_argument("--seed", metavar="N", type=int, default=0, help="the noise seed (default 0)")


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        metavar="DEVICE",
        default=None,
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)",
    )


def _number(kind: type, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _positive_int(text: str) -> int:
    value = _number(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _strength(text: str) -> float:
    value = _number(float, text, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]; leave --strength out for DDIM inversion")
    return value


def _port(text: str) -> int:
    value = _number(int, text, "an integer")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (1-65535)")
    return value


# --- loading --------------------------------------------------------------------------------------------------


def checked_checkpoint(path: str, option: str = "--ckpt", folders: bool = True) -> Path:
    """`path` as a Path when it is a checkpoint file (or, with `folders`, an export folder); else a UsageError."""
    found = Path(path)
    made_by = "train.py (logs/train/runs/<run>/checkpoints/last.ckpt)"
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
        if path.is_dir():
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


def require(pipe: Pipeline, part: str, ckpt: str) -> None:
    """A UsageError when the model lacks the part a verb needs (`vision`: the captioner, `diffusion`: the UNet)."""
    if getattr(pipe.model, part) is None:
        trained = {"vision": "model.loss.weights.caption=0", "diffusion": "model.loss.weights.diffusion=0"}[part]
        needs = {"vision": "a captioner", "diffusion": "a UNet"}[part]
        raise UsageError(f"--ckpt {ckpt}: this model was trained without {needs} ({trained}); pass one that has it")


@contextmanager
def progress(description: str, total: int) -> Iterator:
    """A rich progress bar on stderr (stdout stays the command's result); yields `advance(n)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "prompt"


# --- the verbs ------------------------------------------------------------------------------------------------


def run_caption(args: argparse.Namespace) -> None:
    ckpt = checked_checkpoint(args.ckpt)
    images = [read_image(path) for path in args.images]
    pipe = load_pipeline(ckpt, args.device)
    require(pipe, "vision", args.ckpt)
    options = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    with progress("captioning", len(images)) as advance:
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            paths = args.images[start : start + args.batch_size]
            for path, text in zip(paths, pipe.caption(chunk, **options), strict=True):
                print(f"{path}\t{text}", flush=True)
            advance(len(chunk))


def run_generate(args: argparse.Namespace) -> None:
    ckpt = checked_checkpoint(args.ckpt)
    folder = out_folder(args.out)
    pipe = load_pipeline(ckpt, args.device)
    require(pipe, "diffusion", args.ckpt)
    prompts = [prompt for prompt in args.prompts for _ in range(args.num_images)]
    with progress("generating", len(prompts)) as advance:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            # Image i of the run starts from the noise of seed + i, whatever the batch size.
            images = pipe.generate(chunk, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed + start)
            for i, (prompt, image) in enumerate(zip(chunk, images, strict=True)):
                path = folder / f"{slug(prompt)}-{args.seed + start + i}.png"
                image.save(path)
                print(path, flush=True)
            advance(len(chunk))


def run_edit(args: argparse.Namespace) -> None:
    ckpt = checked_checkpoint(args.ckpt)
    image = read_image(args.image)
    folder = out_folder(args.out)
    pipe = load_pipeline(ckpt, args.device)
    require(pipe, "diffusion", args.ckpt)
    if args.strength is None and args.source_prompt is None:
        require(pipe, "vision", args.ckpt)  # inversion under the model's own caption of the image
    edited = pipe.edit(
        image,
        args.prompt,
        source_prompt=args.source_prompt,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        strength=args.strength,
        seed=args.seed,
    )
    path = folder / f"{Path(args.image).stem}-edit.png"
    edited.save(path)
    print(path)


def run_export(args: argparse.Namespace) -> None:
    ckpt = checked_checkpoint(args.checkpoint, option="CKPT", folders=False)
    target = Path(args.folder)
    if target.exists() and not target.is_dir():
        raise UsageError(f"DIR {args.folder}: exists and is not a folder; pass a folder to write the export to")
    model = load_pipeline(ckpt, "cpu", option="CKPT", ema=not args.no_ema, folders=False).model
    from capdiff.export import export

    print(export(model, target))


def run_demo(args: argparse.Namespace) -> None:
    ckpt = checked_checkpoint(args.checkpoint, option="CKPT")
    try:
        from capdiff import demo
    except ImportError as err:
        raise UsageError(
            f"the demo needs gradio ({err}); install the `demo` extra: pip install -c constraints.txt -e '.[demo]'"
        ) from err
    pipe = load_pipeline(ckpt, args.device, option="CKPT")
    try:
        demo.launch(pipe, port=args.port, steps=args.steps)
    except OSError as err:
        reason = str(err).split(". ")[0]
        raise UsageError(f"--port {args.port}: cannot serve on it ({reason}); pass a free port") from err


if __name__ == "__main__":
    sys.exit(main())
