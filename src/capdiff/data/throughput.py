"""Stream a datamodule without a model: checks the shards end to end and measures the pipeline's rate."""

from __future__ import annotations

import time
from collections import Counter

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from capdiff.data.datamodule import ImageTextDataModule


def stream(datamodule: ImageTextDataModule, console: Console | None = None) -> dict[str, float]:
    """One training epoch and one validation pass; returns counts and samples per second."""
    console = console or Console()
    results: dict[str, float] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    loaders = {"train": datamodule.train_dataloader(), "val": datamodule.val_dataloader()}
    with Progress(*columns, console=console) as progress:
        for split, loader in loaders.items():
            total = len(loader) if hasattr(loader, "__len__") and split == "train" else None
            task = progress.add_task(split, total=total, rate="")
            samples, skipped_before = 0, Counter(datamodule.skipped)
            start = time.perf_counter()
            for batch in loader:
                samples += batch["pixels"].shape[0]
                rate = samples / (time.perf_counter() - start)
                progress.update(task, advance=1, rate=f"{rate:,.0f} samples/s")
            seconds = time.perf_counter() - start
            results[f"{split}/samples"] = samples
            results[f"{split}/samples_per_s"] = samples / seconds if seconds > 0 else 0.0
            results[f"{split}/skipped"] = sum((datamodule.skipped - skipped_before).values())
    return results
