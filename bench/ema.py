"""EMA update: capdiff's `EMA` callback (one in-place `_foreach_lerp_`) vs diffusers' `EMAModel` (foreach and
per-tensor), on tensors of the SD-1.5 UNet's shapes (860 M parameters, fp32): time per update and the memory an
update and a checkpoint load add on top of the weights and the shadow.

Each variant runs in its own process (so its peak resident memory is its own), in alternating rounds.
Goals: capdiff's update ≤ 1.0× diffusers' time and no extra memory (diffusers' foreach update allocates a
whole second shadow; its `load_state_dict` deep-copies the state).

    python bench/ema.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from common import median, parser, ratio_line, show
from shapes import sd_unet_config

VARIANTS = ("capdiff", "diffusers foreach", "diffusers per tensor")


def unet_shapes(quick: bool) -> list[tuple[int, ...]]:
    from diffusers import UNet2DConditionModel

    config = sd_unet_config(32)
    if quick:
        config |= {"block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8, "cross_attention_dim": 64}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return [tuple(p.shape) for p in unet.parameters()]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def run_variant(name: str, phase: str, quick: bool, updates: int) -> dict:
    """In this process: parameters and their shadow, then `updates` updates, or one load of the EMA state
    (`phase`); the seconds per update and the peak memory the phase added."""
    from diffusers.training_utils import EMAModel

    from capdiff.training.ema import EMA

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in unet_shapes(quick)]
    named = {f"p{i}": p for i, p in enumerate(params)}
    if name == "capdiff":
        ema = EMA(decay=0.999)
        ema.shadow = {n: p.detach().clone() for n, p in named.items()}
        ema._seen_step = 0
        module = type("Module", (), {"ema_parameters": lambda self: named})()
        trainer = type("Trainer", (), {"global_step": 0, "callbacks": []})()

        def update() -> None:
            trainer.global_step += 1  # an optimizer step happened
            ema.on_train_batch_end(trainer, module)

        def shadow() -> list[torch.Tensor]:
            return list(ema.shadow.values())
    else:
        ema = EMAModel(params, decay=0.999, foreach=name == "diffusers foreach")

        def update() -> None:
            ema.step(params)

        def shadow() -> list[torch.Tensor]:
            return ema.shadow_params

    base, times = peak_gb(), []
    if phase == "load":
        ema.load_state_dict(ema.state_dict())
    for _ in range(updates if phase == "update" else 0):
        for p in params:  # the optimizer moved the weights
            p.data.add_(1e-3)
        before = shadow()[0].clone()
        start = time.perf_counter()
        update()
        times.append(time.perf_counter() - start)
        assert not torch.equal(shadow()[0], before), f"{name}: the update did not move the average"
    return {
        "seconds": median(times[1:] or times) if times else float("nan"),
        "extra_gb": peak_gb() - base,
        "weights_gb": sum(p.numel() for p in params) * 4 / 2**30,
    }


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    p.add_argument("--phase", choices=("update", "load"), default="update", help=argparse.SUPPRESS)
    p.add_argument("--updates", type=int, default=5)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.phase, args.quick, args.updates)))
        return
    rounds = 1 if args.quick else args.rounds

    def measure(name: str, phase: str) -> dict:
        command = [sys.executable, __file__, "--variant", name, "--phase", phase]
        command += ["--updates", str(2 if args.quick else args.updates)] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    updates: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(rounds):  # alternating order, each variant in a fresh process
        for name in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
            updates[name].append(measure(name, "update"))
    loads = {name: measure(name, "load") for name in VARIANTS}  # memory only: the same in every round
    summary = {name: {k: median([run[k] for run in runs]) for k in runs[0]} for name, runs in updates.items()}
    rows = [
        [name, f"{s['seconds'] * 1e3:.0f}", f"{s['extra_gb']:.2f}", f"{loads[name]['extra_gb']:.2f}"]
        for name, s in summary.items()
    ]
    show(
        f"EMA of {summary['capdiff']['weights_gb']:.2f} GiB of fp32 parameters (SD-1.5 UNet shapes"
        f"{', reduced' if args.quick else ''}), medians of {rounds} round(s)",
        ["variant", "ms per update", "GiB added by updates", "GiB added by a load"],
        rows,
    )
    ours, foreach = summary["capdiff"], summary["diffusers foreach"]
    fastest = min(summary["diffusers foreach"]["seconds"], summary["diffusers per tensor"]["seconds"])
    ratio_line("capdiff / fastest diffusers update time", ours["seconds"] / fastest, 1.0, higher_is_better=False)
    ratio_line(
        "capdiff / diffusers-foreach memory added per update",
        ours["extra_gb"] / max(foreach["extra_gb"], 1e-9),
        0.1,
        higher_is_better=False,
    )


if __name__ == "__main__":
    main()
