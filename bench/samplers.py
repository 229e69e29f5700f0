"""Which sampler, how many steps: every sampler that can sample the model, at 5 to 50 steps, against DDIM at 50.

    python bench/samplers.py                       # trains the default recipe first (make train's run), then measures
    python bench/samplers.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt --out docs
    python bench/samplers.py --random              # the tiny preset's random weights: speed only

On `--prompts` validation prompts of the built-in shapes (image i from seed i, guidance 4, EMA weights), for each
sampler and step count: the shapes probe's attribute accuracy against the prompts, the Fréchet distance to the
validation images in the probe's 128-d feature space (FD), a diversity figure, and images/s (text encoding,
sampling and decoding; every setting timed in this one run). Diversity: `--diversity` prompts, `--copies` seeds
each; the mean distance between a prompt's samples in the probe's feature space, over the mean distance between
as many real renders of the same attributes (1: as varied as the data; near 0: one image per prompt).

DDIM at 50 steps is the reference; the same setting again with other seeds gives the noise of the figures. A
setting is "within noise of DDIM-50" when its probe accuracy is within 0.02 and its FD within 5% of DDIM-50's
(or within the reseeded reference's own distance, if that is larger). The fastest such setting is printed; the ratio
line is the default setting's (always measured) images/s over DDIM-50's, goal ≥ 2.5, and 0 when the default is
not within noise.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, build_tiny, compose, parser, ratio_line, show
from rich.progress import track

from capdiff.data.shapes import TEMPLATES, render
from capdiff.data.transforms import unit_to_uint8
from capdiff.evaluation.images import ImageDistances
from capdiff.evaluation.shapes import ATTRIBUTES, attribute_accuracy, load_probe, probe_folder, read_split
from capdiff.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, STOCHASTIC, usable_samplers

STEPS = (5, 10, 15, 20, 25, 50)
REFERENCE = ("ddim", 50)


def load_model(args):
    """The model to sample, the config of the data it was trained on (the default shapes) and that data."""
    from capdiff.train import build_datamodule

    if args.random:
        cfg, datamodule, module = build_tiny(args)
        return module.model.eval(), cfg, datamodule
    from capdiff.checkpoints.portable import load_checkpoint

    ckpt = args.ckpt or train_default(args)
    model, _ = load_checkpoint(ckpt, ema=True)
    cfg = compose([], args.data_dir)
    return model.eval(), cfg, build_datamodule(cfg)


def train_default(args) -> Path:
    """The built-in default run (`python train.py`, what `make train` runs), trained once into the work folder."""
    run = args.work / "train"
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        data = [f"paths.data_dir={args.data_dir}"] if args.data_dir else []
        command = [sys.executable, "train.py", f"hydra.run.dir={run}", "extras.print_config=false", *data]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True)
    return ckpt


def real_renders(attributes: list[dict], copies: int, size: int) -> torch.Tensor:
    """`copies` renders of each attribute set (prompt-major): what the data's own variety looks like."""
    rows = []
    for k, a in enumerate(attributes):
        for j in range(copies):
            image = render(a, size, random.Random(1_000_003 * k + j))
            rows.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(rows)


def spread_of(features: torch.Tensor, copies: int) -> float:
    """Mean pairwise distance between the `copies` rows of each group (prompt-major), over the groups."""
    groups = features.view(-1, copies, features.shape[-1])
    distances = torch.cdist(groups, groups)
    pairs = copies * (copies - 1)
    return float((distances.sum((1, 2)) / pairs).mean())


def generate(model, prompts: list[str], seeds: list[int], sampler: str, steps: int, batch: int) -> torch.Tensor:
    out = []
    for start in range(0, len(prompts), batch):
        pixels = model.generate(
            prompts[start : start + batch], steps=steps, guidance_scale=4.0, seeds=seeds[start : start + batch],
            sampler=sampler,
        )  # fmt: skip
        out.append(unit_to_uint8(pixels))
    return torch.cat(out)


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, default=None, help="a checkpoint of the default recipe (default: train one)")
    p.add_argument("--random", action="store_true", help="the tiny preset's random weights (speed only)")
    p.add_argument("--samplers", nargs="+", default=None, help="default: every one that can sample the model")
    p.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    p.add_argument("--prompts", type=int, default=256, help="validation prompts scored, one image each")
    p.add_argument("--diversity", type=int, default=16, help="prompts sampled several times for the diversity")
    p.add_argument("--copies", type=int, default=8, help="samples of each diversity prompt")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--work", type=Path, default=REPO / "logs" / "bench-samplers")
    p.add_argument("--out", type=Path, default=None, help="the plot into <out>/images/samplers/ (docs)")
    args = p.parse_args()
    if args.quick:
        args.random, args.prompts, args.diversity, args.copies, args.batch = True, 8, 2, 2, 8
        args.samplers, args.steps = args.samplers or ["ddim", "dpmpp_2m", "euler_a"], [2, 3]
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model, cfg, datamodule = load_model(args)
    probe, _ = load_probe(datamodule.train_urls, datamodule.val_urls, probe_folder(cfg.paths.data_dir, datamodule))
    probe.eval()
    _, real, attributes = read_split(datamodule.val_urls)
    prompts = [TEMPLATES[i % len(TEMPLATES)].format(**a) for i, a in enumerate(attributes)][: args.prompts]
    truth = attributes[: args.prompts]
    side = real.shape[-1]
    real_features = probe.features(real).double()
    varied = attributes[: args.diversity]
    real_spread = spread_of(probe.features(real_renders(varied, args.copies, side)), args.copies)
    repeat = [TEMPLATES[k % len(TEMPLATES)].format(**a) for k, a in enumerate(varied) for _ in range(args.copies)]
    repeat_seeds = [100_000 + i for i in range(len(repeat))]

    def measure(sampler: str, steps: int, offset: int = 0) -> dict:
        seeds = [offset + i for i in range(len(prompts))]
        start = time.perf_counter()
        images = generate(model, prompts, seeds, sampler, steps, args.batch)
        seconds = time.perf_counter() - start
        distances = ImageDistances("probe", 128, kid_subset_size=min(len(prompts), 100))
        distances.update(real_features, real=True)
        distances.update(probe.features(images).double(), real=False)
        fd = distances.compute()["fd_probe"]
        copies = generate(model, repeat, repeat_seeds, sampler, steps, args.batch)
        diversity = spread_of(probe.features(copies), args.copies) / real_spread
        scores = attribute_accuracy(probe.predict(images), truth)
        return {"sampler": sampler, "steps": steps, "images_per_s": len(prompts) / seconds, "fd": fd,
                "probe": scores["mean"], "all5": scores["all"], "diversity": diversity,
                **{f"probe_{a}": scores[a] for a in ATTRIBUTES}}  # fmt: skip

    names = args.samplers or usable_samplers(model.diffusion.zero_terminal_snr)
    settings = [(s, n) for s in names for n in args.steps if (s, n) != REFERENCE]
    default = (DEFAULT_SAMPLER, DEFAULT_STEPS)
    settings += [default] if default not in settings else []
    reference = measure(*REFERENCE)
    reseeded = measure(*REFERENCE, offset=len(prompts)) | {"sampler": "ddim (other seeds)"}
    rows = [reference, reseeded]
    for sampler, steps in track(settings, description="samplers × steps"):
        rows.append(measure(sampler, steps))

    noise_fd = abs(reseeded["fd"] - reference["fd"]) / reference["fd"]
    noise_acc = abs(reseeded["probe"] - reference["probe"])
    fd_band, acc_band = max(0.05, noise_fd), max(0.02, noise_acc)
    for row in rows:
        row["speedup"] = row["images_per_s"] / reference["images_per_s"]
        row["within"] = row["probe"] >= reference["probe"] - acc_band and row["fd"] <= reference["fd"] * (1 + fd_band)
    candidates = [r for r in rows[2:] if r["within"]]
    best = max(candidates, key=lambda r: r["images_per_s"]) if candidates else None

    title = (f"{'random weights' if args.random else 'checkpoint'}: {len(prompts)} prompts, guidance 4; diversity "
             f"{args.diversity}×{args.copies}; within noise: probe ≥ DDIM-50 − {acc_band:.3f}, FD ≤ DDIM-50 × "
             f"{1 + fd_band:.3f}")  # fmt: skip
    columns = ["sampler", "steps", "images/s", "× DDIM-50", "probe acc", "all 5", "FD (probe)", "diversity", "within"]
    table = [[r["sampler"] + (" *" if r["sampler"] in STOCHASTIC else ""), str(r["steps"]), f"{r['images_per_s']:.1f}",
              f"{r['speedup']:.2f}", f"{r['probe']:.3f}", f"{r['all5']:.3f}", f"{r['fd']:.2f}", f"{r['diversity']:.2f}",
              "yes" if r["within"] else ""] for r in rows]  # fmt: skip
    show(title, columns, table)
    print("\n| " + " | ".join(columns) + " |\n|---|" + "---:|" * (len(columns) - 1))
    for line in table:
        print("| " + " | ".join(line) + " |")
    print("(* stochastic)")
    (args.work / "samplers.json").write_text(json.dumps({"title": title, "rows": rows}, indent=1))
    if args.out:
        plot(rows, args.out / "images" / "samplers" / "samplers.png", title)
    if best is None:
        print("no setting is within noise of DDIM-50")
    else:
        print(f"fastest within noise of DDIM-50: {best['sampler']} at {best['steps']} steps, {best['speedup']:.2f}×")
    mine = next(r for r in rows[2:] if (r["sampler"], r["steps"]) == default)
    print(f"the default, {DEFAULT_SAMPLER} at {DEFAULT_STEPS} steps: {'' if mine['within'] else 'NOT '}within noise")
    ratio_line("default sampler images/s over DDIM-50", mine["speedup"] if mine["within"] else 0.0, 2.5)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    reference = rows[0]
    for name in dict.fromkeys(r["sampler"] for r in rows[2:]):
        mine = sorted((r for r in rows[2:] if r["sampler"] == name), key=lambda r: r["steps"])
        if name == "ddim":
            mine = sorted([*mine, reference], key=lambda r: r["steps"])
        ms = [1e3 / r["images_per_s"] for r in mine]
        style = "--" if name in STOCHASTIC else "-"
        for ax, key in zip(axes, ("probe", "fd", "diversity"), strict=True):
            ax.plot(ms, [r[key] for r in mine], style, marker="o", label=name)
    for ax, key, label in zip(axes, ("probe", "fd", "diversity"), ("probe attribute accuracy", "FD in the probe's "
                              "features (lower is better)", "diversity (real renders = 1)"), strict=True):  # fmt: skip
        ax.axhline(reference[key], color="gray", lw=0.8, ls=":")
        ax.set(xlabel="ms per image (2 CPU cores)", ylabel=label, xscale="log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
