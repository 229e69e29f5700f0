"""The built-in default recipe trained for longer: caption and generation attribute accuracy against training
minutes (docs/default-run.md).

    python bench/learning_curve.py                      # 40 minutes of training, then the plot and the table
    python bench/learning_curve.py --minutes 20 --out docs

It runs `python train.py` exactly as `make train` does, with two changes: `trainer.max_time` is the budget and
`trainer.max_epochs` the number of epochs that fits it (`--epochs`; the learning-rate schedule decays over
those epochs, as the default's 5 epochs fill its 6 minutes), and the periodic evaluation scores
`--samples` fixed validation images and prompts (the default: 32) so each point of the curve is less noisy. Its
x axis is the evaluation's `peval/train_minutes` (the `trainer.max_time` clock, evaluations included). The
data, tokenizer and first-stage autoencoder are built before the clock starts (cached under data/ as for
`make train`).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

from common import FAST_AUTOENCODER, REPO, max_time

CURVES = {"peval/caption_attr/mean": "captions", "peval/probe_attr/mean": "generations"}
THRESHOLDS = (0.9, 0.95)


def read_curve(run: Path) -> list[dict[str, float]]:
    """The periodic evaluations of a run, in step order: `step`, `peval/train_minutes` and the CURVES."""
    rows: dict[int, dict[str, float]] = {}
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if k.startswith("peval/") and v not in ("", None)}
                if values:
                    rows.setdefault(int(row["step"]), {"step": float(row["step"])}).update(values)
    return [rows[s] for s in sorted(rows) if "peval/train_minutes" in rows[s]]


def first_reaching(curve: list[dict[str, float]], key: str, threshold: float) -> float | None:
    """The minute of the first evaluation at or above `threshold`, and None when none reaches it."""
    return next((p["peval/train_minutes"] for p in curve if p.get(key, 0.0) >= threshold), None)


def plot(curve: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    minutes = [p["peval/train_minutes"] for p in curve]
    for key, label in CURVES.items():
        ax.plot(minutes, [p.get(key, float("nan")) for p in curve], marker=".", label=label)
    for threshold in THRESHOLDS:
        ax.axhline(threshold, color="grey", linewidth=0.6, linestyle="--")
    ax.set(xlabel="training minutes (2 CPU cores)", ylabel="attribute accuracy (mean of 5)", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=40.0, help="training time (trainer.max_time)")
    p.add_argument("--epochs", type=int, default=30, help="trainer.max_epochs: what fits the minutes")
    p.add_argument("--samples", type=int, default=64, help="callbacks.periodic_eval.num_samples")
    p.add_argument("--every", type=int, default=250, help="callbacks.periodic_eval.every_n_steps")
    p.add_argument("--work", type=Path, default=REPO / "logs" / "bench-learning-curve", help="the run folder")
    p.add_argument("--out", type=Path, default=None, help="write the plot to <out>/images/default-run/ (docs)")
    p.add_argument("--quick", action="store_true", help="a few steps: checks the benchmark runs")
    p.add_argument("--data-dir", type=Path, default=None, help="where shapes data and derived models are cached")
    args = p.parse_args()

    overrides = [f"trainer.max_time={max_time(args.minutes)}", f"trainer.max_epochs={args.epochs}",
                 f"callbacks.periodic_eval.num_samples={args.samples}",
                 f"callbacks.periodic_eval.every_n_steps={args.every}"]  # fmt: skip
    if args.quick:
        overrides = ["trainer.max_steps=6", "trainer.max_epochs=1", "data.samples_per_epoch=96",
                     "callbacks.periodic_eval.num_samples=4", "callbacks.periodic_eval.every_n_steps=3",
                     "callbacks.periodic_eval.steps=2", "callbacks.sample_grid=null"]  # fmt: skip
    if args.quick and args.data_dir:
        args.work = args.data_dir / "bench-learning-curve"  # the real runs' folder kept
    common = ["extras.print_config=false"] + ([f"paths.data_dir={args.data_dir}"] if args.data_dir else [])
    if args.quick:
        common += FAST_AUTOENCODER  # it checks the benchmark runs: a short first stage will do
    shutil.rmtree(args.work, ignore_errors=True)
    warmup = [f"hydra.run.dir={args.work / 'warmup'}", "trainer.max_steps=1", "callbacks.sample_grid=null",
              "callbacks.periodic_eval=null"]  # fmt: skip
    for run_overrides in (warmup, [f"hydra.run.dir={args.work / 'run'}", *overrides]):
        command = [sys.executable, "train.py", *common, *run_overrides]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True)

    curve = read_curve(args.work / "run")
    if not curve:
        sys.exit(f"no periodic evaluation in {args.work / 'run'}/csv: nothing to plot")
    print("| minute | step | captions | generations |\n|---:|---:|---:|---:|")
    for point in curve:
        cells = [f"{point.get(k, float('nan')):.3f}" for k in CURVES]
        print(f"| {point['peval/train_minutes']:.1f} | {int(point['step'])} | " + " | ".join(cells) + " |")
    for key, label in CURVES.items():
        reached = {t: first_reaching(curve, key, t) for t in THRESHOLDS}
        said = ", ".join(f"{t}: " + (f"minute {m:.1f}" if m is not None else "not reached") for t, m in reached.items())
        print(f"{label} reach {said}; last {curve[-1].get(key, float('nan')):.3f}")
    final = curve[-1].get("peval/caption_attr/mean", 0.0)
    verdict = "met" if final >= THRESHOLDS[0] else "missed"
    print(f"RATIO caption attribute accuracy at the end / 0.9 = {final / THRESHOLDS[0]:.3f} (target ≥ 1) {verdict}")
    target = (args.out / "images" / "default-run") if args.out else args.work
    target.mkdir(parents=True, exist_ok=True)
    plot(curve, target / "learning_curve.png", f"the default recipe, {args.minutes:g} minutes of training")
    with (target / "learning_curve.csv").open("w", newline="") as f:  # the plot's figures, to quote and re-plot
        writer = csv.writer(f)
        writer.writerow(["minute", "step", *CURVES.values()])
        for point in curve:
            writer.writerow([f"{point['peval/train_minutes']:.2f}", int(point["step"]),
                             *(f"{point.get(k, float('nan')):.4f}" for k in CURVES)])  # fmt: skip
    print(f"plot: {target / 'learning_curve.png'} (figures: learning_curve.csv)")


if __name__ == "__main__":
    main()
