"""The two recipes side by side: the joint model (the built-in default) and the GAN baseline (experiment=text_gan),
each trained for the same time on the same data and evaluated by the same evaluate.py settings, with and without
post-processing (docs/recipes.md).

    python bench/recipes.py                       # the shapes data, 6 minutes each
    python bench/recipes.py --minutes 20 --shards 'TRAIN_URLS' 'VAL_URLS'   # any shards

The runs train one after the other (never at once, so each has the machine to itself) with
trainer.max_time=<minutes>; the first-stage autoencoder and tokenizer are built before the clock starts and are
shared. Both are then scored by `python evaluate.py` with the same samples, seeds and settings, and with the joint
checkpoint as the judge of image–text agreement (eval.judge), so one scorer rates both rows. It prints the
table in markdown too; `--out docs` copies the sample grids for docs/recipes.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from common import max_time
from rich.console import Console
from rich.table import Table

from capdiff.checkpoints.portable import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
COLUMNS = {
    "probe_attr/mean": "probe attr. (mean)",
    "probe_attr/all": "probe attr. (all 5)",
    "fd_probe": "FD (probe)",
    "capdiff_image_text_score": "image–text (judge)",
    "caption_attr/mean": "caption attr.",
}
console = Console(width=120)


def run(script: str, folder: Path, *overrides: str) -> None:
    command = [sys.executable, script, f"hydra.run.dir={folder}", "extras.print_config=false", *overrides]
    console.print(f"[dim]$ {' '.join(command)}[/dim]")
    subprocess.run(command, cwd=REPO, check=True)


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=6.0, help="training time of each recipe")
    p.add_argument("--shards", nargs=2, metavar=("TRAIN_URLS", "VAL_URLS"), help="train on these shards instead")
    p.add_argument("--samples", type=int, default=256, help="validation prompts generated per evaluation")
    p.add_argument("--postprocess", default="[median]", help="eval.postprocess: the chain scored besides the raw")
    p.add_argument("--work", type=Path, default=REPO / "logs" / "bench-recipes", help="run and evaluation folders")
    p.add_argument("--out", type=Path, default=None, help="copy the sample grids under <out>/images/recipes (docs)")
    p.add_argument("--quick", action="store_true", help="a few steps each: checks the benchmark runs")
    p.add_argument("--data-dir", type=Path, default=None, help="where shapes data and derived models are cached")
    args = p.parse_args()

    clock = f"trainer.max_time={max_time(args.minutes)}"
    if args.quick:
        clock = "trainer.max_steps=4"
    data = ["trainer.max_epochs=1000", "callbacks.periodic_eval=null"]
    if args.data_dir:
        data.append(f"paths.data_dir={args.data_dir}")
    if args.shards:
        data += ["data=webdataset", f"data.train_urls='{args.shards[0]}'", f"data.val_urls='{args.shards[1]}'"]
    recipes = {"joint": [], "text_gan": ["experiment=text_gan"]}
    if args.quick:
        recipes = {k: [*v, "data.samples_per_epoch=64"] for k, v in recipes.items()}
    shutil.rmtree(args.work, ignore_errors=True)
    # the derived parts (tokenizer, first-stage autoencoder) are built here, before either clock starts
    run("train.py", args.work / "warmup", *data, "trainer.max_steps=1", "callbacks.sample_grid=null")
    for name, overrides in recipes.items():
        run("train.py", args.work / name, *data, *overrides, clock)
    judge = args.work / "joint" / "checkpoints" / "last.ckpt"
    evaluation = [f"eval.num_samples={4 if args.quick else args.samples}", f"eval.judge={judge}",
                  f"eval.postprocess={args.postprocess}", "eval.batch_size=64"]  # fmt: skip
    rows = []
    for name in recipes:
        folder = args.work / f"eval-{name}"
        checkpoint = args.work / name / "checkpoints" / "last.ckpt"
        run("evaluate.py", folder, f"ckpt_path={checkpoint}", *evaluation, *data[2:])
        report = json.loads((folder / "metrics.json").read_text())
        steps = read_checkpoint(checkpoint)["global_step"] // (2 if name == "text_gan" else 1)  # G + D per batch
        chain = report["settings"]["postprocess"]  # the chain's name, or None
        rows.append((name, "none", report["metrics"], folder / "grid_g4.png", steps))
        if chain:
            shown = {k.removeprefix(f"{chain}/"): v for k, v in report["metrics"].items() if k.startswith(chain)}
            rows.append((name, chain, report["metrics"] | shown, folder / f"grid_g4_{chain}.png", steps))

    table = Table(title=f"the two recipes, {clock.split('=')[1]} of training each")
    head = ("recipe", "post-processing", "batches", *COLUMNS.values())
    for column in head:
        table.add_column(column, justify="left" if column in head[:2] else "right")
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, chain, metrics, _, steps in rows:
        cells = [str(steps), *(f"{metrics[k]:.3g}" if k in metrics else "n/a" for k in COLUMNS)]
        table.add_row(name, chain, *cells)
        lines.append(f"| {name} | {chain} | " + " | ".join(cells) + " |")
    console.print(table)
    accuracy = {(n, c): m.get("probe_attr/mean", 0.0) for n, c, m, _, _ in rows}
    # the targets: the joint model is the recipe to beat the baseline, and post-processing should help a GAN
    versus = accuracy[("joint", "none")] / max(accuracy[("text_gan", "none")], 1e-9)
    print(f"RATIO joint / text_gan probe attribute accuracy = {versus:.3f} (target ≥ 1) {_verdict(versus >= 1)}")
    for (name, chain), value in accuracy.items():
        if name == "text_gan" and chain != "none":
            gain = value / max(accuracy[(name, "none")], 1e-9)
            print(f"RATIO text_gan with / without {chain} = {gain:.3f} (target ≥ 1) {_verdict(gain >= 1)}")
    if args.out:
        images = args.out / "images" / "recipes"
        images.mkdir(parents=True, exist_ok=True)
        for name, chain, _, grid, _ in rows:
            if grid.is_file():
                shutil.copy(grid, images / f"{name}-{chain}.png")
        console.print(f"grids written under {images}")
    print("\n".join(lines))  # the table as docs/recipes.md shows it


if __name__ == "__main__":
    main()
