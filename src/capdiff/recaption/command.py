"""The recaption command's options and what runs them (`capdiff recaption`, `python -m capdiff.recaption`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capdiff.cli.inputs import UsageError, checked_checkpoint, load_pipeline, positive_int

DESCRIPTION = (
    "Caption every image of the shards URLS with CKPT's captioner, score the original and each synthetic caption "
    "against the image with CKPT's contrastive heads, and write the shards to OUT_DIR with every member kept and "
    "the captions and scores added to each sample's .json. Under torchrun each rank writes its share of the "
    "shards; a rerun skips the shards already in OUT_DIR. With --filter (and no CKPT), a second pass over "
    "recaptioned shards writes the captions a filter rule keeps (caption_filtered). Prints each shard written."
)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        nargs="?",
        metavar="CKPT",
        help="a .ckpt written by train.py or a `capdiff export` folder (left out with --filter)",
    )
    parser.add_argument("urls", metavar="URLS", help="shards, as data.train_urls takes them: 'dir/{000..099}.tar'")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where the new shards go (made if missing)")
    parser.add_argument(
        "--caption-key", default="txt", metavar="KEY", help="the original caption, as data.caption_key (default txt)"
    )
    decoding = parser.add_argument_group("captioning")
    decoding.add_argument("--num-beams", type=positive_int, default=1, metavar="N", help="beam width (default 1)")
    decoding.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy/beam search")
    decoding.add_argument("--top-p", type=fraction, default=0.9, metavar="P", help="with --sample (default 0.9)")
    decoding.add_argument("--temperature", type=float, default=1.0, metavar="T", help="with --sample (default 1)")
    decoding.add_argument(
        "--num-candidates",
        type=positive_int,
        default=1,
        metavar="N",
        help="synthetic captions per image (default 1; more need --sample or --num-beams N)",
    )
    decoding.add_argument(
        "--max-new-tokens", type=positive_int, default=None, metavar="N", help="caption length limit (the model's)"
    )
    decoding.add_argument(
        "--batch-size", type=positive_int, default=32, metavar="N", help="images per forward pass (default 32)"
    )
    decoding.add_argument(
        "--seed", type=int, default=0, metavar="N", help="sampling seed; shard i uses seed + i (default 0)"
    )
    decoding.add_argument(
        "--device", default=None, metavar="DEVICE", help="torch device (default: cuda:LOCAL_RANK when there is one)"
    )
    rule = parser.add_argument_group("filter (CapFilt)")
    rule.add_argument("--filter", action="store_true", help="filter recaptioned shards (URLS) instead; no CKPT")
    rule.add_argument(
        "--keep",
        choices=("orig", "best_syn", "both"),
        default=None,
        help="the captions the rule considers (default both); writes caption_filtered",
    )
    rule.add_argument("--threshold", type=float, default=None, metavar="S", help="keep a caption scoring >= S")
    rule.add_argument(
        "--top-fraction",
        type=fraction,
        default=None,
        metavar="F",
        help="keep the best-scored share F of all candidates (ties at the cut kept); with --filter",
    )


def run(args: argparse.Namespace) -> int:
    """Run the pass the arguments ask for; 1 when a shard could not be read (the others are written)."""
    from capdiff.data.urls import check_local_shards, expand_urls
    from capdiff.recaption.captioning import Decoding, Recaptioner
    from capdiff.recaption.filtering import FilterRule
    from capdiff.recaption.run import filter_shards, launcher_rank, recaption

    try:
        rank, world_size, local_rank = launcher_rank()
        urls = expand_urls(args.urls, "URLS")
        check_local_shards(urls, "URLS")
        given = args.keep is not None or args.threshold is not None or args.top_fraction is not None
        rule = FilterRule(args.keep or "both", args.threshold, args.top_fraction) if given else None
        if args.filter:
            if args.checkpoint is not None:
                raise UsageError(f"CKPT {args.checkpoint}: --filter reads the scores in the shards; leave CKPT out")
            if rule is None:
                raise UsageError("--filter needs a rule: --threshold S or --top-fraction F (and --keep)")
            summary = filter_shards(urls, Path(args.out_dir), rule, rank, world_size)
        else:
            if args.checkpoint is None:
                raise UsageError("CKPT is missing: pass the checkpoint to caption with (or --filter)")
            if args.top_fraction is not None:
                raise UsageError(
                    f"--top-fraction {args.top_fraction}: it ranks the scores of the whole data set, which exist once "
                    "every shard is recaptioned; recaption first (or use --threshold), then run --filter over OUT_DIR"
                )
            decoding = Decoding(
                args.num_beams, args.num_candidates, args.sample, args.top_p, args.temperature, args.max_new_tokens
            )
            pipe = load_pipeline(checked_checkpoint(args.checkpoint, option="CKPT"), _device(args, local_rank), "CKPT")
            try:
                recaptioner = Recaptioner(pipe.model, decoding)
            except ValueError as err:
                raise UsageError(f"CKPT {args.checkpoint}: {err}; pass one that has it") from err
            summary = recaption(
                recaptioner, urls, Path(args.out_dir), args.caption_key, rule, args.batch_size,
                seed=args.seed, rank=rank, world_size=world_size,
            )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    out_dir = Path(args.out_dir)
    for name in summary.written:
        print(out_dir / name, flush=True)
    print(summary.line(rank, world_size), file=sys.stderr)
    if summary.failed:
        print(f"unreadable shards (rerun to retry them): {', '.join(summary.failed)}", file=sys.stderr)
    return 1 if summary.failed else 0


def _device(args: argparse.Namespace, local_rank: int) -> str | None:
    if args.device is not None:
        return args.device
    import torch

    return f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
