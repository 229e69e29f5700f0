"""What the tiny preset's first-stage autoencoder keeps: the shapes probe read on its reconstructions.

The UNet generates latents and the first stage decodes them, so an attribute the autoencoder does not
reconstruct is one no generation can show, whatever the text condition. This benchmark trains the first stage
(`model.vae.first_stage`: the preset's architecture, learning rate and KL weight) for each `--steps` and
`--seeds`, on the default shapes data, into its own folder (the cached first stage under data/ is not touched),
then encodes and decodes the 512 validation images (the posterior's mode) and reads them with the shapes probe
(docs/default-run.md).

    python bench/first_stage.py                            # 800 and 1600 steps, seeds 0 1 2
    python bench/first_stage.py --steps 1600 --seeds 0 1 2 3 --lr 0.001

The ratio line is the worst seed's colour accuracy at the preset's `max_steps` (or the most steps measured),
against 0.95: the first stage the default run trains should reconstruct the object's colour whatever the seed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import QUICK_DATA, REPO, compose, console, parser, ratio_line, show
from omegaconf import OmegaConf


def reconstruct(folder, images: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, float]:
    """uint8 images through the autoencoder at `folder` (encode, the posterior's mode, decode): the uint8
    reconstructions and the reconstruction loss (L1 + MSE on [-1, 1], as the first stage trains)."""
    from diffusers import AutoencoderKL

    from capdiff.data.transforms import as_unit, unit_to_uint8

    vae = AutoencoderKL.from_pretrained(folder).eval()
    x = as_unit(images)
    with torch.no_grad():
        out = torch.cat(
            [vae.decode(vae.encode(x[i : i + batch]).latent_dist.mode()).sample for i in range(0, len(x), batch)]
        )
    loss = float(torch.nn.functional.l1_loss(out, x) + torch.nn.functional.mse_loss(out, x))
    return unit_to_uint8(out), loss


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, nargs="+", default=[800, 1600], help="first-stage training steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first stage's torch seeds")
    p.add_argument("--lr", type=float, default=None, help="the learning rate (default: the preset's)")
    p.add_argument("--work", type=str, default=None, help="where the trained first stages go")
    args = p.parse_args()
    if args.quick:
        args.steps, args.seeds = [4], [0]

    from capdiff.artifacts.autoencoder import train_autoencoder
    from capdiff.evaluation.shapes import ATTRIBUTES, attribute_accuracy, load_probe, probe_folder, read_split
    from capdiff.train import build_datamodule

    cfg = compose(QUICK_DATA if args.quick else [], args.data_dir)
    stage = OmegaConf.to_container(cfg.model.vae.first_stage, resolve=True)
    lr = args.lr or float(stage["lr"])
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    probe, _ = load_probe(datamodule.train_urls, datamodule.val_urls, probe_folder(cfg.paths.data_dir, datamodule))
    _, images, attributes = read_split(datamodule.val_urls)
    work = Path(args.work) if args.work else (args.data_dir or REPO / "logs") / "bench-first-stage"

    rows, colour = [], {}
    real = attribute_accuracy(probe.predict(images), attributes)
    rows.append(["validation images", "", "", "", "", *(f"{real[a]:.3f}" for a in (*ATTRIBUTES, "mean"))])
    for steps in args.steps:
        for seed in args.seeds:
            folder = work / f"steps{steps}-lr{lr:g}-seed{seed}"
            start = time.perf_counter()
            train_autoencoder(datamodule, folder=folder, config=stage["config"], max_steps=steps, lr=lr,
                              kl_weight=float(stage["kl_weight"]), seed=seed)  # fmt: skip
            seconds = time.perf_counter() - start
            reconstructions, loss = reconstruct(folder, images)
            scores = attribute_accuracy(probe.predict(reconstructions), attributes)
            colour.setdefault(steps, []).append(scores["color"])
            rows.append([f"first stage, {steps} steps", f"{lr:g}", str(seed), f"{seconds:.0f}", f"{loss:.4f}",
                         *(f"{scores[a]:.3f}" for a in (*ATTRIBUTES, "mean"))])  # fmt: skip
            console.print(" | ".join(rows[-1]))
    show(
        f"the shapes probe on {len(images)} validation images and on their reconstructions",
        ["images", "lr", "seed", "train s", "rec loss", *ATTRIBUTES, "mean"],
        rows,
    )
    measured = int(stage["max_steps"]) if int(stage["max_steps"]) in colour else max(colour)
    console.print(f"the ratio reads {measured} steps (the preset's max_steps, or the most measured)")
    ratio_line("worst seed's reconstructed colour / 0.95", min(colour[measured]) / 0.95, 1.0)


if __name__ == "__main__":
    main()
