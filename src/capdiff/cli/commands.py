"""The `capdiff` verbs themselves, each given the parsed arguments: results on stdout, progress on stderr."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from capdiff.cli.inputs import (
    UsageError,
    checked_checkpoint,
    load_pipeline,
    out_folder,
    read_image,
    require,
    require_sampler,
)
from capdiff.samplers import is_ddim


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


def run_caption(args: argparse.Namespace) -> None:
    ckpt = checked_checkpoint(args.ckpt)
    images = [read_image(path) for path in args.images]
    pipe = load_pipeline(ckpt, args.device)
    require(pipe, "caption", args.ckpt)
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
    require(pipe, "generate", args.ckpt)
    require_sampler(pipe, args.sampler)
    prompts = [prompt for prompt in args.prompts for _ in range(args.num_images)]
    with progress("generating", len(prompts)) as advance:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            # Image i of the run starts from the noise of seed + i, whatever the batch size.
            images = pipe.generate(
                chunk,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                seed=args.seed + start,
                sampler=args.sampler,
            )
            for i, (prompt, image) in enumerate(zip(chunk, images, strict=True)):
                path = folder / f"{slug(prompt)}-{args.seed + start + i}.png"
                image.save(path)
                print(path, flush=True)
            advance(len(chunk))


def run_edit(args: argparse.Namespace) -> None:
    if args.strength is None and args.sampler is not None and not is_ddim(args.sampler):
        raise UsageError(f"--sampler {args.sampler}: inversion editing regenerates by DDIM; pass --strength for "
                         "SDEdit with another sampler, or leave --sampler out")  # fmt: skip
    ckpt = checked_checkpoint(args.ckpt)
    image = read_image(args.image)
    folder = out_folder(args.out)
    pipe = load_pipeline(ckpt, args.device)
    require(pipe, "edit", args.ckpt)
    require_sampler(pipe, args.sampler)
    if args.strength is None and args.source_prompt is None:
        require(pipe, "caption", args.ckpt)  # inversion under the model's own caption of the image
    edited = pipe.edit(
        image,
        args.prompt,
        source_prompt=args.source_prompt,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        strength=args.strength,
        seed=args.seed,
        sampler=args.sampler,
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
    from capdiff.joint.model import JointModel

    if not isinstance(model, JointModel):
        raise UsageError(f"CKPT {args.checkpoint}: a text_gan model has no standard sub-folders to export; use the "
                         "checkpoint as it is (capdiff generate --ckpt)")  # fmt: skip
    print(export(model, target))


def run_demo(args: argparse.Namespace) -> None:
    ckpt = checked_checkpoint(args.checkpoint, option="CKPT")
    try:
        from capdiff import demo
    except ImportError as err:
        raise UsageError(
            f"the demo needs gradio ({err}); install the `demo` extra into the project's venv: `make install` "
            "(its default EXTRAS include demo)"
        ) from err
    pipe = load_pipeline(ckpt, args.device, option="CKPT")
    require_sampler(pipe, args.sampler)
    try:
        demo.launch(pipe, port=args.port, steps=args.steps, sampler=args.sampler)
    except OSError as err:
        reason = str(err).split(". ")[0]
        raise UsageError(f"--port {args.port}: cannot serve on it ({reason}); pass a free port") from err


def run_recaption(args: argparse.Namespace) -> int:
    from capdiff.recaption.command import run

    return run(args)
