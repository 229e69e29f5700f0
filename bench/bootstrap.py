"""Does recaptioning help where the captions are poor? The default recipe on shapes whose training captions are
half vague, trained on those captions, against the bootstrapping loop (`python -m capdiff.bootstrap`) given the
same total time: train, recaption, filter, retrain the generator on the kept captions (docs/bootstrap.md).

    python bench/bootstrap.py                          # 16 minutes an arm, the loop's first stage 8 of them
    python bench/bootstrap.py --minutes 30 --first 12 --vague 0.5 --out docs

Both arms start from the same data, tokenizer and first-stage autoencoder (built before either clock starts).
The loop's budget is `--minutes` in all: its first training stage gets `--first` minutes, recaptioning and
filtering take what they take (measured), and the retraining stage gets what is left. Both checkpoints are
then scored by `python evaluate.py` with the same settings. Also reported: the share of candidate captions
CapFilt's rule kept, and the attribute accuracy, against the true attributes in each sample's json, of the
original training captions, of the best synthetic caption of every image, and of the kept synthetic captions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from common import FAST_AUTOENCODER, REPO, max_time
from rich.console import Console

from capdiff.checkpoints.portable import read_checkpoint
from capdiff.evaluation.shapes import ATTRIBUTES, attribute_accuracy, parse_caption
from capdiff.recaption.members import read_json_records

COLUMNS = {"probe_attr/mean": "generations (probe)", "probe_attr/all": "generations, all 5",
           "caption_attr/mean": "captions"}  # fmt: skip
EPOCHS_PER_MINUTE = 5 / 6  # the default recipe's schedule: 5 epochs in its 6 minutes
console = Console(width=120)


def clock(minutes: float) -> list[str]:
    """A training budget: its time, and the epochs the learning-rate schedule decays over in that time."""
    return [f"trainer.max_time={max_time(minutes)}", f"trainer.max_epochs={max(1, round(minutes * EPOCHS_PER_MINUTE))}"]


def run(command: list[str]) -> None:
    console.print(f"[dim]$ {' '.join(command)}[/dim]")
    subprocess.run(command, cwd=REPO, check=True)


def caption_accuracy(records: list[dict], pick) -> tuple[float, int]:
    """Mean attribute accuracy of the caption `pick(record)` (None: left out) against each record's truth."""
    pairs = [(text, {a: r[a] for a in ATTRIBUTES}) for r in records if (text := pick(r)) is not None]
    if not pairs:
        return float("nan"), 0
    return attribute_accuracy([parse_caption(t) for t, _ in pairs], [t for _, t in pairs])["mean"], len(pairs)


def filter_report(folder: Path) -> dict[str, float]:
    """What CapFilt kept of the recaptioned training set, and how true each kind of caption is."""
    records = [r for shard in sorted(folder.glob("*.tar")) for r in read_json_records(str(shard))]
    candidates = sum(1 + bool(r["caption_syn"]) for r in records)  # --keep both: the original and the best
    kept = [c for r in records for c in r["caption_filtered"]]
    syn_kept = [(r, c) for r in records for c in r["caption_filtered"] if c != r["caption_orig"]]
    original, _ = caption_accuracy(records, lambda r: r["caption_orig"])
    best, _ = caption_accuracy(records, lambda r: r["caption_syn"][0] if r["caption_syn"] else None)
    kept_syn, n_syn = caption_accuracy([dict(r, kept=c) for r, c in syn_kept], lambda r: r["kept"])
    kept_orig, n_orig = caption_accuracy(records, lambda r: r["caption_orig"] if r["caption_orig"] in
                                         r["caption_filtered"] else None)  # fmt: skip
    return {
        "samples": len(records),
        "kept fraction (of candidates)": len(kept) / max(candidates, 1),
        "samples with a kept caption": sum(bool(r["caption_filtered"]) for r in records) / max(len(records), 1),
        "kept synthetic captions": n_syn,
        "kept original captions": n_orig,
        "accuracy: original captions": original,
        "accuracy: best synthetic captions": best,
        "accuracy: kept synthetic captions": kept_syn,
        "accuracy: kept original captions": kept_orig,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=16.0, help="each arm's total time")
    p.add_argument("--first", type=float, default=8.0, help="the loop's first training stage, minutes")
    p.add_argument("--vague", type=float, default=0.5, help="data.shapes.vague_fraction of the training captions")
    p.add_argument("--recaption", default="--sample --num-candidates 4", help="the loop's decoding options")
    p.add_argument("--top-fraction", type=float, default=0.5, help="CapFilt's rule: the best share kept")
    p.add_argument("--samples", type=int, default=512, help="eval.num_samples of both evaluations")
    p.add_argument("--work", type=Path, default=REPO / "logs" / "bench-bootstrap", help="run and evaluation folders")
    p.add_argument("--out", type=Path, default=None, help="copy the sample grids under <out>/images/bootstrap (docs)")
    p.add_argument("--quick", action="store_true", help="a few steps each: checks the benchmark runs")
    p.add_argument("--data-dir", type=Path, default=None, help="where shapes data and derived models are cached")
    args = p.parse_args()

    data = [f"data.shapes.vague_fraction={args.vague}", "extras.print_config=false"]
    data += [f"paths.data_dir={args.data_dir}"] if args.data_dir else []
    first, total = clock(args.first), clock(args.minutes)
    if args.quick:
        data += ["data.shapes.num_train=256", "data.shapes.num_val=64", "callbacks.periodic_eval=null"]
        data += FAST_AUTOENCODER
        args.work = args.data_dir / "bench-bootstrap" if args.data_dir else args.work  # the real runs' folder kept
        first = total = ["trainer.max_steps=4", "trainer.max_epochs=1"]
    shutil.rmtree(args.work, ignore_errors=True)
    train = [sys.executable, "train.py"]
    # the data, tokenizer and first-stage autoencoder, built here before either clock starts
    run([*train, f"hydra.run.dir={args.work / 'warmup'}", *data, "trainer.max_steps=1", "callbacks.sample_grid=null",
         "callbacks.periodic_eval=null"])  # fmt: skip
    run([*train, f"hydra.run.dir={args.work / 'original'}", *data, *total])

    loop = args.work / "loop"
    bootstrap = [sys.executable, "-m", "capdiff.bootstrap", str(loop), *data, f"--recaption={args.recaption}",
                 "--top-fraction", str(args.top_fraction)]  # fmt: skip
    run([*bootstrap, *(f"--first={o}" for o in first), "--stop-after", "3-filter"])
    stages = json.loads((loop / "bootstrap.json").read_text())
    between = (stages["2-recaption"]["seconds"] + stages["3-filter"]["seconds"]) / 60
    left = args.minutes - args.first - between
    if left <= 0 and not args.quick:
        sys.exit(f"recaptioning and filtering took {between:.1f} minutes: nothing left of --minutes for retraining")
    retrain = ["trainer.max_steps=4", "trainer.max_epochs=1"] if args.quick else clock(left)
    run([*bootstrap, *(f"--retrain={o}" for o in retrain)])

    evaluation = [f"eval.num_samples={8 if args.quick else args.samples}", "eval.batch_size=64",
                  "extras.print_config=false"]  # fmt: skip
    arms = {"original captions": args.work / "original", "bootstrapped": loop / "4-retrain"}
    results = {}
    for name, run_folder in arms.items():
        folder = args.work / f"eval-{name.split()[0]}"
        checkpoint = run_folder / "checkpoints" / "last.ckpt"
        run([sys.executable, "evaluate.py", f"hydra.run.dir={folder}", f"ckpt_path={checkpoint}", *evaluation])
        metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        results[name] = (metrics, read_checkpoint(checkpoint)["global_step"], folder / "grid_g4.png")
    steps_first = read_checkpoint(loop / "1-train" / "checkpoints" / "last.ckpt")["global_step"]

    budget = (f"{args.minutes:g} minutes an arm: the loop {args.first:g} training + {between:.1f} recaptioning and "
              f"filtering + {max(left, 0):.1f} retraining")  # fmt: skip
    budget = "quick: 4 batches a training stage" if args.quick else budget
    print(f"\n{budget}; {args.vague:g} of the training captions vague\n")
    head = ("training captions", "batches", *COLUMNS.values())
    print("| " + " | ".join(head) + " |\n|---|" + "---:|" * (len(head) - 1))
    for name, (metrics, steps, _) in results.items():
        batches = f"{steps_first} + {steps}" if name == "bootstrapped" else str(steps)
        cells = [f"{metrics[k]:.3f}" if k in metrics else "n/a" for k in COLUMNS]
        print(f"| {name} | {batches} | " + " | ".join(cells) + " |")
    print("\n| the filter (recaptioned training set) | |\n|---|---:|")
    for key, value in filter_report(loop / "3-filter").items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    ratio = results["bootstrapped"][0].get("probe_attr/mean", 0.0) / max(
        results["original captions"][0].get("probe_attr/mean", 0.0), 1e-9
    )
    print(f"RATIO bootstrapped / original probe attribute accuracy = {ratio:.3f} (target ≥ 1) "
          f"{'met' if ratio >= 1 else 'missed'}")  # fmt: skip
    if args.out:
        images = args.out / "images" / "bootstrap"
        images.mkdir(parents=True, exist_ok=True)
        for name, (_, _, grid) in results.items():
            if grid.is_file():
                shutil.copy(grid, images / f"{name.split()[0]}.png")
        console.print(f"grids written under {images}")


if __name__ == "__main__":
    main()
