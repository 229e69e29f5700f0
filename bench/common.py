"""What every benchmark shares: building the tiny preset from the real configs, interleaved timing, and the
printed table and ratio line.

Machines here are noisy, so every benchmark measures the things it compares in the same run, in alternating
rounds, and reports medians and their ratio — never an absolute time against a fixed threshold.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
console = Console(width=110)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per variant (medians are reported)")
    p.add_argument("--quick", action="store_true", help="a few iterations on less data: checks the benchmark runs")
    p.add_argument("--data-dir", type=Path, default=None, help="where shapes data and derived models are cached")
    return p


def compose(overrides: list[str], data_dir: Path | None = None):
    """The real `train` config with overrides; data (shapes, tokenizer, autoencoder) cached under data/."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    base = [f"paths.data_dir={data_dir or REPO / 'data'}", "extras.print_config=false"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=base + overrides)


def max_time(minutes: float) -> str:
    """`trainer.max_time`'s DD:HH:MM:SS for a training budget in minutes (the longer studies train by time)."""
    seconds = max(1, round(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# The first-stage autoencoder only has to exist for speed measurements: a short one is cached separately.
FAST_AUTOENCODER = ["model.vae.first_stage.max_steps=20"]


QUICK_DATA = ["data.shapes.num_train=512", "data.shapes.num_val=64", "data.samples_per_epoch=512"]


def build_tiny(args: argparse.Namespace, overrides: list[str] = ()):
    """The default (tiny) JointModule (the LightningModule) and its data module, built as train.py builds them."""
    from capdiff.train import build_datamodule, build_model

    cfg = compose([*FAST_AUTOENCODER, *(QUICK_DATA if args.quick else []), *overrides], args.data_dir)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule)
    return cfg, datamodule, model


def batches(datamodule, count: int) -> list[dict]:
    """`count` training batches held in memory, so data loading is not part of a model benchmark."""
    loader = iter(datamodule.train_dataloader())
    return [next(loader) for _ in range(count)]


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict:
    """Run each variant once per round, in rotating order, after `warmup` untimed rounds.

    A variant that returns a number has measured itself (seconds per step, samples/s); any other return
    value is ignored and the whole call is timed.
    Returns {name: [value per round]}.
    """
    names = list(variants)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            value = variants[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                results[name].append(float(value) if isinstance(value, int | float) else elapsed)
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """Median and the range across rounds, in ms."""
    return f"{median(values) * 1e3:.1f} ({min(values) * 1e3:.1f}–{max(values) * 1e3:.1f})"


def show(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(*columns, title=title, caption=machine())
    for row in rows:
        table.add_row(*row)
    console.print(table)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, python "
        f"{sys.version.split()[0]}, torch {torch.__version__}"
    )


def ratio_line(name: str, value: float, goal: float, higher_is_better: bool = True) -> bool:
    """The last line every benchmark prints: `RATIO <name> = <value> (goal ≥|≤ <goal>): met|missed`."""
    met = value >= goal if higher_is_better else value <= goal
    sign = "≥" if higher_is_better else "≤"
    console.print(f"RATIO {name} = {value:.3f} (goal {sign} {goal}): {'met' if met else 'missed'}")
    return met
