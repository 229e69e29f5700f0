"""What a training run prints about itself: the model summary when it starts (without Lightning's FLOPs column
when there is nothing to count), and a short summary when it ends: where the run folder, the checkpoints and the
sample grids are, the last validation and periodic-evaluation figures, and the commands to use next."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint, RichModelSummary
from pytorch_lightning.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count

from capdiff.evaluation.callback import PeriodicEval
from capdiff.training.samples import SampleGrid

EXAMPLE_PROMPT = "a large red circle in the center on a white background"


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary, less the FLOPs column and its `Total FLOPs: 0` line when FLOPs were not
    counted: Lightning counts them only for a module with an `example_input_array`, which capdiff's modules have not
    (its inputs depend on the parts a run trains)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            RichModelSummary.summarize(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops,
                **summarize_kwargs,
            )
            return
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            justify = "right" if name.startswith(("Params", "In sizes", "Out sizes")) else "left"
            table.add_column(name, justify=justify, style="dim" if name == " " else None, no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        rows = [
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ]
        for label, value in rows:
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)


def _callback(trainer: pl.Trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def checkpoints(trainer: pl.Trainer, run: Path) -> tuple[str | None, str | None]:
    """(best, last) checkpoint paths of a finished fit: the ModelCheckpoint's, else the run folder's newest."""
    callback = _callback(trainer, ModelCheckpoint)
    best = (callback.best_model_path or None) if callback else None
    last = (callback.last_model_path or None) if callback else None
    if best is None and last is None:
        found = list((run / "checkpoints").glob("*.ckpt"))
        last = str(max(found, key=lambda p: p.stat().st_mtime_ns)) if found else None
    return best, last


def sample_grids(trainer: pl.Trainer) -> tuple[Path | None, list[Path]]:
    """The SampleGrid callback's folder and its grids, newest first."""
    callback = _callback(trainer, SampleGrid)
    if callback is None:
        return None, []
    folder = Path(trainer.default_root_dir) / callback.folder
    grids = sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime_ns, reverse=True) if folder.is_dir() else []
    return folder, grids


def example_prompt(trainer: pl.Trainer, folder: Path | None) -> str:
    """A prompt for the `capdiff generate` line: the sample grids' own first prompt or validation caption."""
    callback = _callback(trainer, SampleGrid)
    if callback is not None and callback.prompts:
        return callback.prompts[0]
    captions = sorted(folder.glob("captions_*.jsonl"), key=lambda p: p.stat().st_mtime_ns) if folder else []
    if captions:
        first = captions[-1].read_text().splitlines()[:1]
        if first:
            return json.loads(first[0])["reference"]
    return EXAMPLE_PROMPT


def _figures(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))


def run_summary(cfg, trainer: pl.Trainer, metrics: dict[str, float]) -> str:
    """The end-of-run summary as plain text (see the module docstring)."""
    run = Path(cfg.paths.output_dir)
    lines = [
        f"run folder      {run}",
        f"trained         {trainer.global_step} steps over {trainer.current_epoch} epoch(s)",
    ]
    best, last = checkpoints(trainer, run)
    if best:
        lines.append(f"best checkpoint {best}")
    if last and last != best:
        lines.append(f"last checkpoint {last}")
    if not (best or last):
        lines.append("checkpoints     none written")
    folder, grids = sample_grids(trainer)
    if grids:
        tag = grids[0].stem.rsplit("_", 1)[-1]  # generated_<tag>.png, captions_<tag>.png
        newest = [g.name for g in grids if g.stem.endswith(f"_{tag}")]
        lines.append(f"sample grids    {folder}: {', '.join(sorted(newest))} ({len(grids)} grids in all)")
    validation = {k: v for k, v in metrics.items() if k.startswith("val/")}
    if validation:
        lines.append(f"validation      {_figures(validation)}")
    peval = _callback(trainer, PeriodicEval)
    periodic = {k: v for k, v in metrics.items() if k.startswith("peval/")} | (peval.last_metrics if peval else {})
    # per-attribute accuracies stay in the logs; their mean and all-correct share stand for them here
    periodic = {k: v for k, v in periodic.items() if "_attr/" not in k or k.endswith(("/mean", "/all"))}
    if periodic:
        lines.append(f"periodic eval   {_figures(periodic)}")
    ckpt = best or last
    if ckpt:
        quoted = shlex.quote(ckpt)
        lines += [
            "next:",
            f"  python evaluate.py ckpt_path={quoted}",
            f"  capdiff caption --ckpt {quoted} IMG",
            f"  capdiff generate --ckpt {quoted} {shlex.quote(example_prompt(trainer, folder))} -n 4 "
            f"--out {shlex.quote(str(run / 'generated'))}",
            f"  capdiff demo {quoted}",
        ]
    return "\n".join(lines)


def print_run_summary(cfg, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """`run_summary` on the console, once (global rank 0); lines are not wrapped, so commands copy whole."""
    if not trainer.is_global_zero:
        return
    from rich.console import Console
    from rich.rule import Rule
    from rich.text import Text

    console = Console()
    console.print(Rule("capdiff: run finished"))
    console.print(Text(run_summary(cfg, trainer, metrics)), soft_wrap=True)
