"""The real-scale path at the published sizes, offline: `python train.py experiment=joint_ddim` with GPT-2,
CLIP ViT-B/16, the SD VAE and SD-1.5's UNet by their hub ids, resolved from an offline hub of random-weight
models (`capdiff.testing.hub --size full`). On this machine (CPU): batch 1 at 256², gradient checkpointing,
a few optimizer steps, a checkpoint, a resume, `evaluate.py` on 2 samples, export, and the exported `unet/`,
`vae/`, `llm/` loaded by diffusers' and transformers' own `from_pretrained`.

It prints the step time, the peak resident memory of each phase, and the ratio of the training phases' peak
to the bytes of weights + gradients + optimizer state + EMA shadow (goal ≤ 1.3×: a whole-checkpoint buffer in
memory, as Lightning's default saver makes, would alone push it past 1.7×).

    python bench/fullsize.py [--work data/fullsize] [--steps 3] [--keep]      (also: make bench-fullsize)
    python bench/fullsize.py --quick      the same path on the reduced hub at 64² (a minute; the tests run it)

Needs about 24 GB of disk (the hub, two checkpoints while one replaces the other, the export) and 20 GB of
memory; the hub is written once (minutes) and reused; checkpoints and the export are deleted afterwards
unless `--keep`. On a CUDA machine it trains in bf16 on the GPU instead (`--device cuda`).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import REPO, console, parser, ratio_line, show

from capdiff.testing.hub import GPT2, SD15, write_hub

# --quick: the reduced hub's widths need narrower capdiff heads than the preset's
QUICK = ["model.vision.resampler.width=64", "model.conditioner.width=64", "model.contrastive.embed_dim=32"]


def run(name: str, command: list[str], env: dict, log: Path) -> dict:
    """Run one phase as its own process; its wall time and peak resident memory (from wait4's rusage)."""
    console.print(f"[bold]{name}[/bold]: {' '.join(command[:3])} … (log: {log})")
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        console.print(log.read_text()[-6000:])
        raise SystemExit(f"{name} failed (exit {process.returncode}); its log is {log}")
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    console.print(f"  done in {seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB")
    return {"seconds": seconds, "peak_rss": peak}


def shards(folder: Path, steps: int, image_size: int) -> tuple[str, str]:
    from capdiff.data.shapes import write_split

    write_split([folder / "train-0.tar"], "train", steps, seed=0, image_size=image_size)
    write_split([folder / "val-0.tar"], "val", 2, seed=0, image_size=image_size)
    return str(folder / "train-0.tar"), str(folder / "val-0.tar")


def state_bytes(checkpoint: Path) -> dict[str, int]:
    """Bytes of what training holds: every weight, a gradient and an EMA entry per trained one, AdamW state."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    ema = next(v for k, v in state["callbacks"].items() if k.startswith("EMA"))
    optimizer = [t for s in state["optimizer_states"][0]["state"].values() for t in s.values()]
    trained = size(ema["shadow"].values())
    return {"weights": size(state["state_dict"].values()), "gradients": trained, "optimizer": size(optimizer),
            "ema": trained}  # fmt: skip


def step_times(run_dir: Path) -> list[float]:
    """Seconds per optimizer step, from the ThroughputMonitor's running `train/time` in the CSV log."""
    files = sorted(run_dir.glob("csv/**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    times = []
    for file in files:
        with file.open() as rows:
            times += [float(r["train/time"]) for r in csv.DictReader(rows) if r.get("train/time")]
    return [b - a for a, b in itertools.pairwise(times) if b > a]


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None, help="hub, shards, run, export (default: data/fullsize)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per epoch (2 epochs: train, resume)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and the export")
    args = p.parse_args()
    size, image_size = ("reduced", 64) if args.quick else ("full", 256)
    work = (args.work or args.data_dir or REPO / "data" / "fullsize").resolve()
    hub, done = work / f"hub-{size}", work / f"hub-{size}" / ".capdiff-hub-complete"
    if not done.is_file():
        console.print(f"writing the {size} offline hub into {hub} (once)")
        write_hub(hub, size)
        done.write_text("complete\n")
    train_urls, val_urls = shards(work / "shards", args.steps, image_size)
    run_dir, eval_dir, export = work / "run", work / "eval", work / "export"
    for folder in (run_dir, eval_dir, export):
        shutil.rmtree(folder, ignore_errors=True)
    env = os.environ | {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "CAPDIFF_ROOT": str(work)}
    gpu = args.device == "cuda"
    data = [f"data.train_urls={train_urls}", f"data.val_urls={val_urls}", f"data.image_size={image_size}"]
    data += ["data.num_workers=0"]
    training = [
        sys.executable, "train.py", "experiment=joint_ddim", f"hydra.run.dir={run_dir}", "extras.print_config=false",
        *data, *(QUICK if args.quick else []), "data.batch_size=1", f"data.samples_per_epoch={args.steps}",
        "trainer.devices=1",
        f"trainer.accelerator={'gpu' if gpu else 'cpu'}", f"trainer.precision={'bf16-mixed' if gpu else '32-true'}",
        "trainer.log_every_n_steps=1", "+trainer.limit_val_batches=1", "callbacks.sample_grid=null",
        "callbacks.periodic_eval=null", "callbacks.model_checkpoint.save_top_k=0",
        "callbacks.model_checkpoint.monitor=null", "logger=csv",
        "+callbacks.throughput._target_=pytorch_lightning.callbacks.ThroughputMonitor",
        "+callbacks.throughput.batch_size_fn._target_=capdiff.data.datamodule.batch_size",
        "+callbacks.throughput.batch_size_fn._partial_=true",
    ]  # fmt: skip
    phases = {"train": run("train", [*training, "trainer.max_epochs=1"], env, work / "train.log")}
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    sizes = state_bytes(checkpoint)
    resume = [*training, "trainer.max_epochs=2", "ckpt_path=last"]
    phases["resume"] = run("resume", resume, env, work / "resume.log")
    evaluate = [
        sys.executable, "evaluate.py", f"ckpt_path={checkpoint}", f"hydra.run.dir={eval_dir}", "data=webdataset",
        *data, "data.batch_size=1", "eval.num_samples=2", "eval.steps=2", "eval.batch_size=2",
        "eval.fid.feature=null", "eval.probe=false", f"trainer.accelerator={'gpu' if gpu else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if gpu else '32-true'}", "extras.print_config=false",
    ]  # fmt: skip
    phases["evaluate"] = run("evaluate", evaluate, env, work / "evaluate.log")
    exporting = [sys.executable, "-m", "capdiff.export", str(checkpoint), str(export)]
    phases["export"] = run("export", exporting, env, work / "export.log")
    load = (
        "import sys, json; from diffusers import UNet2DConditionModel, AutoencoderKL; "
        "from transformers import AutoModelForCausalLM, AutoTokenizer; f = sys.argv[1]; "
        "u = UNet2DConditionModel.from_pretrained(f + '/unet'); v = AutoencoderKL.from_pretrained(f + '/vae'); "
        "m = AutoModelForCausalLM.from_pretrained(f + '/llm'); t = AutoTokenizer.from_pretrained(f + '/llm'); "
        "print(json.dumps({k: sum(p.numel() for p in x.parameters()) for k, x in "
        "(('unet', u), ('vae', v), ('llm', m))} | {'tokens': len(t)}))"
    )
    loaded_log = work / "load.log"
    phases["from_pretrained"] = run("from_pretrained", [sys.executable, "-c", load, str(export)], env, loaded_log)
    counts = json.loads(loaded_log.read_text().strip().splitlines()[-1])
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    times = step_times(run_dir)

    held = sum(sizes.values())
    rows = [[name, f"{p['seconds']:.0f}", f"{p['peak_rss'] / 2**30:.2f}"] for name, p in phases.items()]
    show(f"experiment=joint_ddim at {size} size ({GPT2}, CLIP ViT-B/16, {SD15}), batch 1 at {image_size}², "
         f"{args.device}",
         ["phase", "wall s", "peak RSS GiB"], rows)  # fmt: skip
    console.print(
        "held in training: "
        + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sizes.items())
        + f" = {held / 2**30:.2f} GiB; exported parameters: {counts}; evaluation: {len(metrics)} metrics "
        f"({metrics.get('num_validation')} validation samples)"
    )
    steady = times[1:] if len(times) > 1 else times
    console.print(f"seconds per optimizer step (first is warm-up): {[round(t, 1) for t in times]}")
    if steady:
        console.print(f"STEP median {sorted(steady)[len(steady) // 2]:.1f} s at batch 1")
    for name in ("train", "resume"):
        ratio_line(f"{name} peak RSS / (weights + grads + AdamW + EMA)", phases[name]["peak_rss"] / held, 1.3,
                   higher_is_better=False)  # fmt: skip
    if not args.keep:
        for folder in (run_dir / "checkpoints", export):
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
