"""Cross-modal bootstrapping in one command: train, recaption the training shards with the trained captioner,
filter the captions by the model's own image–text score (BLIP's CapFilt), and train the generator on the result.

    python -m capdiff.bootstrap OUT_DIR [options] [OVERRIDE ...]

Each stage writes a folder of its own under OUT_DIR:

    1-train/      python train.py OVERRIDE ... --first ...            the model on the original captions
    2-recaption/  python -m capdiff.recaption 1-train's last.ckpt      every training image captioned and scored
    3-filter/     python -m capdiff.recaption --filter                  the captions CapFilt's rule keeps
    4-retrain/    python train.py OVERRIDE ... --retrain ...           from 1-train's weights (or afresh), the
                                                                        generator on the kept captions

The OVERRIDEs (Hydra's, as train.py takes them) apply to both training stages; `--first` and `--retrain` to
one. A rerun continues where the last one stopped: a finished training stage (its `metrics.json`) is skipped, a
stopped one resumes from its newest checkpoint, and recaptioning and filtering skip the shards they wrote.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("capdiff.bootstrap")

STAGES = ("1-train", "2-recaption", "3-filter", "4-retrain")
DEFAULT_MIX = "json.caption_filtered=1"


@dataclass
class Plan:
    """What each stage runs with (`python -m capdiff.bootstrap --help` says what each option means)."""

    out_dir: Path
    overrides: list[str] = field(default_factory=list)
    first: list[str] = field(default_factory=list)
    retrain: list[str] = field(default_factory=list)
    recaption: list[str] = field(default_factory=list)  # decoding options of `python -m capdiff.recaption`
    rule: list[str] = field(default_factory=lambda: ["--keep", "both", "--top-fraction", "0.5"])
    mix: dict[str, float] = field(default_factory=lambda: parse_mix(DEFAULT_MIX))
    captioner_key: str | None = None  # None: the original caption (data.caption_key of the first stage)
    from_scratch: bool = False
    stop_after: str = STAGES[-1]

    def folder(self, stage: str) -> Path:
        return self.out_dir / stage


def parse_mix(text: str) -> dict[str, float]:
    """`json.caption_filtered=0.9,txt=0.1` → {key: probability} (data.caption_mix, checked by the data)."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        try:
            mix[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: give KEY=PROBABILITY, e.g. {DEFAULT_MIX}") from None
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"{part!r}: give KEY=PROBABILITY, e.g. {DEFAULT_MIX}")
    if not mix:
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=PROBABILITY pairs, e.g. {DEFAULT_MIX}")
    return mix


def quoted(value: object) -> str:
    """`value` as a Hydra override's quoted string, whatever characters a path holds."""
    return "'" + str(value).replace("'", "\\'") + "'"


def train_script() -> Path:
    """train.py of the capdiff checkout (its configs are beside it): the one this package is installed from, or
    the one in CAPDIFF_ROOT."""
    roots = [
        Path(__file__).resolve().parents[2],
        *([Path(os.environ["CAPDIFF_ROOT"])] if "CAPDIFF_ROOT" in os.environ else []),
    ]
    for root in roots:
        if (root / "train.py").is_file() and (root / "conf").is_dir():
            return root / "train.py"
    raise FileNotFoundError(f"no train.py in {roots[-1]}: run from a capdiff checkout, or set CAPDIFF_ROOT to it")


def run_stage(plan: Plan, name: str, command: list[str]) -> None:
    """Run one stage's command; its command line and wall seconds (over every run of it) go to
    OUT_DIR/bootstrap.json."""
    log.info("stage %s: %s", name, shlex.join(command))
    started = time.monotonic()
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise SystemExit(
            f"stage {name} failed (exit status {done.returncode}; its output is above): fix it and run the same "
            "command again, the finished stages are kept"
        )
    record = plan.out_dir / "bootstrap.json"
    stages = json.loads(record.read_text()) if record.is_file() else {}
    spent = stages.get(name, {}).get("seconds", 0.0) + time.monotonic() - started  # a resumed stage: both runs
    stages[name] = {"command": shlex.join(command), "seconds": round(spent, 1)}
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(stages, indent=1))


def train_stage(plan: Plan, stage: str, overrides: list[str], init_from: Path | None = None) -> Path:
    """Train into OUT_DIR/<stage> unless it finished; returns its last checkpoint."""
    from capdiff.checkpoints.resume import newest_checkpoint

    folder = plan.folder(stage)
    checkpoint = folder / "checkpoints" / "last.ckpt"
    if (folder / "metrics.json").is_file() and checkpoint.is_file():
        log.info("stage %s: finished already (%s)", stage, folder)
        return checkpoint
    start = ["ckpt_path=last"] if newest_checkpoint(folder) is not None else []  # a stopped stage continues
    if not start and init_from is not None:
        start = [f"init_from={quoted(init_from)}"]
    command = [sys.executable, str(train_script()), f"hydra.run.dir={quoted(folder)}", *overrides, *start]
    run_stage(plan, stage, command)
    return checkpoint


def training_shards(run: Path) -> tuple[list[str], str, bool]:
    """The first stage's training shards (one pattern or list), caption key, and whether it is the shapes data,
    from the config.yaml the run wrote."""
    data = OmegaConf.load(run / "config.yaml").data
    if data.get("sources"):
        raise ValueError(
            f"{run}: the first stage trained on a mixture (data.sources); the loop recaptions one set of shards: "
            "give it as data.train_urls"
        )
    given = [data.train_urls] if isinstance(data.train_urls, str) else OmegaConf.to_container(data.train_urls)
    urls = [part.strip() for url in given for part in str(url).split("::") if part.strip()]  # `a::b`: two shards
    return urls, str(data.get("caption_key", "txt")), str(data._target_).endswith("ShapesDataModule")


def moved(urls: list[str], folder: Path) -> str:
    """The same shard names in `folder`, in the notation data.train_urls takes (brace patterns kept)."""
    return "::".join(str(folder / Path(u).name) for u in urls)


def retrain_overrides(plan: Plan, shards: str, shapes: bool) -> list[str]:
    """The fourth stage's data: the filtered shards, their captions drawn by `plan.mix`, the captioner's targets
    the original captions (or `plan.captioner_key`). On the shapes data the shards go in data.sources, so the
    shapes' own split (the generation probe's) stays data.train_urls."""
    data = [f"data.sources=[{{urls:{quoted(shards)},weight:1}}]"] if shapes else [f"data.train_urls={quoted(shards)}"]
    mix = ",".join(f"{key}:{p}" for key, p in plan.mix.items())
    target = plan.captioner_key or "json.caption_orig"  # recaptioning keeps the original caption there
    return [*data, f"data.caption_mix={{{mix}}}", f"data.captioner_caption_key={target}"]


def run_loop(plan: Plan) -> Path:
    """Every stage in turn, up to `plan.stop_after`; returns the last stage's folder."""
    first = train_stage(plan, STAGES[0], [*plan.overrides, *plan.first])
    if plan.stop_after == STAGES[0]:
        return plan.folder(STAGES[0])
    urls, caption_key, shapes = training_shards(plan.folder(STAGES[0]))
    recaptioned, filtered = plan.folder(STAGES[1]), plan.folder(STAGES[2])
    recaption = [sys.executable, "-m", "capdiff.recaption", str(first), "::".join(urls), str(recaptioned)]
    run_stage(plan, STAGES[1], [*recaption, "--caption-key", caption_key, *plan.recaption])
    if plan.stop_after == STAGES[1]:
        return recaptioned
    run_stage(plan, STAGES[2], [sys.executable, "-m", "capdiff.recaption", "--filter", moved(urls, recaptioned),
                                str(filtered), *plan.rule])  # fmt: skip
    if plan.stop_after == STAGES[2]:
        return filtered
    data = retrain_overrides(plan, moved(urls, filtered), shapes)
    train_stage(plan, STAGES[3], [*plan.overrides, *data, *plan.retrain], None if plan.from_scratch else first)
    return plan.folder(STAGES[3])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m capdiff.bootstrap",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="the loop's folder, one subfolder a stage")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="train.py overrides for both stages")
    parser.add_argument("--first", action="append", default=[], metavar="OVERRIDE", help="the first stage's only")
    parser.add_argument("--retrain", action="append", default=[], metavar="OVERRIDE", help="the last stage's only")
    parser.add_argument(
        "--recaption", default="", metavar="OPTIONS",
        help="decoding options of python -m capdiff.recaption, e.g. '--sample --num-candidates 4'",
    )  # fmt: skip
    parser.add_argument("--keep", choices=("orig", "best_syn", "both"), default="both", help="CapFilt's candidates")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--top-fraction", type=float, default=None, metavar="F", help="keep the best share F (0.5)")
    rule.add_argument("--threshold", type=float, default=None, metavar="S", help="keep captions scoring >= S")
    parser.add_argument(
        "--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX), metavar="KEY=P,...",
        help=f"the last stage's data.caption_mix (default {DEFAULT_MIX}: the kept captions; a sample that kept "
        "none is skipped and counted), e.g. json.caption_syn=0.9,json.caption_orig=0.1 (DALL-E 3's)",
    )  # fmt: skip
    parser.add_argument(
        "--captioner-key", default=None, metavar="KEY",
        help="the last stage's data.captioner_caption_key (default: the original caption, json.caption_orig)",
    )  # fmt: skip
    parser.add_argument("--from-scratch", action="store_true", help="the last stage starts afresh, not from 1-train")
    parser.add_argument(
        "--stop-after", choices=STAGES, default=STAGES[-1], help="e.g. 3-filter: read the kept captions first"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
        parser.error(f"--top-fraction {args.top_fraction}: not in (0, 1]")  # before any stage runs
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    if args.threshold is not None:
        rule = ["--keep", args.keep, "--threshold", str(args.threshold)]
    else:
        rule = ["--keep", args.keep, "--top-fraction", str(0.5 if args.top_fraction is None else args.top_fraction)]
    plan = Plan(
        args.out_dir.resolve(), args.overrides, args.first, args.retrain, shlex.split(args.recaption), rule,
        args.mix, args.captioner_key, args.from_scratch, args.stop_after,
    )  # fmt: skip
    try:
        folder = run_loop(plan)
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m capdiff.bootstrap: error: {err}", file=sys.stderr)
        return 2
    print(f"stage {plan.stop_after}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
