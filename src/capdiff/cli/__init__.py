"""The `capdiff` command: caption images, generate or edit them, export a checkpoint, serve the demo page.

    capdiff caption  --ckpt CKPT IMG...                 one line per image: PATH<TAB>CAPTION
    capdiff generate --ckpt CKPT PROMPT... [-n N] --out DIR   writes PNGs, prints their paths
    capdiff edit     --ckpt CKPT IMG PROMPT [--strength S] --out DIR   writes one PNG, prints its path
    capdiff export   CKPT DIR                           the folder `Pipeline.from_pretrained` loads
    capdiff demo     CKPT [--port N]                    a Gradio page on 127.0.0.1 (needs the `demo` extra)
    capdiff recaption CKPT 'URLS' OUT_DIR [options]     shards with synthetic captions and their scores

CKPT is a `.ckpt` written by train.py or, except for `export`, a folder written by `capdiff export`. Results go
to stdout, progress bars and messages to stderr. Bad input (a missing checkpoint, an unreadable image, a
value out of range) ends with one line naming the argument and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from capdiff.cli.commands import (
    progress,
    run_caption,
    run_demo,
    run_edit,
    run_export,
    run_generate,
    run_recaption,
    slug,
)
from capdiff.cli.inputs import (
    LOAD_ERRORS,
    MAX_PIXELS,
    UsageError,
    checked_checkpoint,
    load_pipeline,
    out_folder,
    port,
    positive_int,
    read_image,
    require,
    sampler,
    strength,
)
from capdiff.recaption.command import DESCRIPTION as RECAPTION_DESCRIPTION
from capdiff.recaption.command import add_arguments as add_recaption_arguments
from capdiff.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS

# Everything capdiff.cli offered when it was one module, so that imports of it keep working.
__all__ = [
    "LOAD_ERRORS",
    "MAX_PIXELS",
    "USAGE_ERROR",
    "UsageError",
    "build_parser",
    "checked_checkpoint",
    "load_pipeline",
    "main",
    "out_folder",
    "progress",
    "read_image",
    "require",
    "run_caption",
    "run_demo",
    "run_edit",
    "run_export",
    "run_generate",
    "slug",
]

USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except UsageError as err:
        print(f"capdiff {args.verb}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130
    return status or 0  # recaption: 1 when a shard could not be read


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
        "--num-beams", metavar="N", type=positive_int, default=1, help="beam search width (default 1: greedy)"
    )
    caption.add_argument(
        "--max-new-tokens",
        metavar="N",
        type=positive_int,
        default=None,
        help="caption length limit (default: the model's)",
    )
    caption.add_argument(
        "--batch-size", metavar="N", type=positive_int, default=16, help="images per forward pass (default 16)"
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
        "-n", "--num-images", metavar="N", type=positive_int, default=1, help="images per prompt (default 1)"
    )
    _out_option(generate)
    _sampling_options(generate, DEFAULT_STEPS, DEFAULT_SAMPLER, f"the sampler (default {DEFAULT_SAMPLER})")
    generate.add_argument(
        "--batch-size", metavar="N", type=positive_int, default=8, help="images per sampling batch (default 8)"
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
        type=strength,
        default=None,
        help="SDEdit strength in (0, 1] (default: DDIM inversion)",
    )
    edit.add_argument(
        "--source-prompt", metavar="TEXT", default=None, help="what the image shows (default: the model's caption)"
    )
    _out_option(edit)
    _sampling_options(edit, 50, None, "SDEdit's sampler (default: the default sampler); inversion is DDIM")
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
        "until interrupted. Needs the `demo` extra (make install, which includes it); works "
        "offline and sends no analytics.",
    )
    demo.add_argument("checkpoint", metavar="CKPT", help="a .ckpt written by train.py, or a `capdiff export` folder")
    demo.add_argument("--port", metavar="N", type=port, default=7860, help="the port on 127.0.0.1 (default 7860)")
    _sampling_options(demo, DEFAULT_STEPS, DEFAULT_SAMPLER, "the page's initial sampler", guidance=False)
    _device_option(demo)
    demo.set_defaults(run=run_demo)

    recaption = verbs.add_parser(
        "recaption", help="recaption shards, score and filter the captions", description=RECAPTION_DESCRIPTION
    )
    add_recaption_arguments(recaption)
    recaption.set_defaults(run=run_recaption)
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


def _sampling_options(
    parser: argparse.ArgumentParser, steps: int, default: str | None, about: str, guidance: bool = True
) -> None:
    parser.add_argument(
        "--sampler", metavar="NAME", type=sampler, default=default,
        help=f"{about}: ddim, dpmpp_2m, unipc, euler, euler_a, ... or a diffusers scheduler class name",
    )  # fmt: skip
    parser.add_argument(
        "--steps", metavar="N", type=positive_int, default=steps, help=f"sampler steps (default {steps})"
    )
    if not guidance:
        return
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
