"""Precomputed VAE latents: `python -m capdiff.data.cache_latents`.

Reads image–text shards, encodes every image with the run's VAE (centre crop at `data.image_size`, as
validation decodes it) and writes new shards with the same names: every member of the sample kept as it was,
plus `latents.npy`, the posterior's mean and std stacked as 2×C×h×w float32. Training with `data.latents=true`
draws `mean + std·ε` per step (the same draw the VAE would make), so sampling stays stochastic and the VAE
never runs at train time. The image stays in the sample because the captioner and the contrastive loss see it.

Only the image and the caption are decoded: every other member (`.pyd`, `.pickle`, `.pth`, an object `.npy`)
is copied as the bytes it was, and an input's own `latents.npy` is replaced unread, so a payload hidden in a
shard never runs here, and `latents.npy` is read back without pickle (`latent_format.decode_latents`).

`capdiff_latents.json` beside the shards records the VAE (a fingerprint of its encoder weights), the image
size and the latent shape; `train.py` refuses a cache made with another VAE or size.

Under torchrun each rank encodes its share of the shards (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`). A shard is
written to a temporary name and renamed when complete, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import webdataset as wds
from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import Progress

from capdiff.data.decode import BadSample, CaptionKey
from capdiff.data.latent_format import LATENTS, encode_latents
from capdiff.data.streams import DecodeSpec, collate, decode_sample
from capdiff.data.transforms import as_unit
from capdiff.data.urls import count_samples, expand_urls, local_path

log = logging.getLogger(__name__)

MANIFEST = "capdiff_latents.json"


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short hash of the encoder's config and weights: what decides the latents."""
    # Without the bookkeeping keys (`_name_or_path` and the like): the same VAE moved to another folder, or
    # rebuilt from a checkpoint, encodes the same latents.
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def read_manifest(urls: list[str]) -> dict | None:
    path = local_path(urls[0])
    manifest = path.parent / MANIFEST if path is not None else None
    return json.loads(manifest.read_text()) if manifest is not None and manifest.is_file() else None


def check_cache(urls: list[str], key: str, image_size: int, fingerprint: str) -> None:
    """Fail before training when the cached latents were made with another VAE or image size."""
    manifest = read_manifest(urls)
    if manifest is None:
        log.warning("%s: no %s beside the shards, so the latents cannot be checked against the VAE", key, MANIFEST)
        return
    fix = (
        f"re-cache them: python -m capdiff.data.cache_latents --vae <the run's model.vae.name_or_path> "
        f"--image-size {image_size} --urls <the original shards> --out <folder>"
    )
    if manifest["image_size"] != image_size:
        raise ValueError(
            f"{key}: the latents were cached at image size {manifest['image_size']} but data.image_size="
            f"{image_size}: set data.image_size={manifest['image_size']}, or {fix}."
        )
    if manifest["vae_fingerprint"] != fingerprint:
        raise ValueError(f"{key}: the latents were cached with another VAE ({manifest['vae']}); {fix}.")


def shards_for_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    return urls[rank::world_size]


@torch.no_grad()
def cache_shard(
    url: str, target: Path, vae, spec: DecodeSpec, batch_size: int, device: torch.device, progress=None, task=None
) -> Counter:
    """Encode one shard into `target` (written as `<target>.tmp`, then renamed). Returns counts."""
    counts: Counter = Counter()
    temporary = target.with_name(target.name + ".tmp")
    pending: list[tuple[dict, dict]] = []

    def flush(writer: wds.TarWriter) -> None:
        batch = collate([decoded for _, decoded in pending])
        posterior = vae.encode(as_unit(batch["pixels"].to(device)).to(vae.dtype)).latent_dist
        stacked = torch.stack([posterior.mean, posterior.std], dim=1).float().cpu().numpy()
        for (raw, _), latents in zip(pending, stacked, strict=True):
            kept = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
            writer.write(kept | {LATENTS: encode_latents(latents)})
        counts["written"] += len(pending)
        if progress is not None:
            progress.advance(task, len(pending))
        pending.clear()

    def on_error(err: Exception) -> bool:
        counts["shard_error"] += 1
        log.warning("%s: %r", url, err)
        return True

    # encoder=False: members are written as the bytes they are; the default encoder pickles a value that is
    # not bytes under a .pyd or .pickle name.
    with wds.TarWriter(str(temporary), encoder=False) as writer:
        for raw in wds.tarfile_samples([{"url": url}], handler=on_error):
            try:
                decoded = decode_sample(raw, spec, rng=None)
            except BadSample as bad:
                counts[bad.reason] += 1
                continue
            pending.append((raw, decoded))
            if len(pending) == batch_size:
                flush(writer)
        if pending:
            flush(writer)
    temporary.rename(target)
    return counts


def cache_latents(
    urls: list[str],
    out: Path,
    vae,
    vae_name: str,
    image_size: int,
    caption_key: str = "txt",
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    console: Console | None = None,
    fingerprint: str | None = None,
) -> Counter:
    """Encode this rank's share of `urls` into `out` with `vae` (an AutoencoderKL on its device)."""
    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    spec = DecodeSpec(image_size, CaptionKey.parse(caption_key))
    targets = cached_urls(urls, out)
    if rank == 0:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        manifest = {
            "vae": vae_name,
            "vae_fingerprint": fingerprint or vae_fingerprint(vae),
            "scaling_factor": float(vae.config.scaling_factor),
            "image_size": image_size,
            "latent_shape": [int(vae.config.latent_channels), image_size // factor, image_size // factor],
            "caption_key": caption_key,
            "member": LATENTS,
            "layout": "2×C×h×w float32: posterior mean, posterior std (unscaled)",
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    counts: Counter = Counter()
    share = shards_for_rank(list(zip(urls, targets, strict=True)), rank, world_size)
    todo = [(url, Path(target)) for url, target in share if not Path(target).is_file()]
    if len(share) > len(todo):
        console.print(f"rank {rank}: {len(share) - len(todo)} shards already cached in {out}, kept")
    device = next(vae.parameters()).device
    paths = [local_path(url) for url, _ in todo]
    total = sum(count_samples(p) for p in paths) if all(p is not None for p in paths) else None
    with Progress(console=console) as progress:
        task = progress.add_task(f"caching latents (rank {rank})", total=total)
        for url, target in todo:
            counts += cache_shard(url, target, vae, spec, batch_size, device, progress, task)
    return counts


def cached_urls(urls: list[str], folder: Path) -> list[str]:
    """Where the cached copy of each shard lives: `folder/<shard name>`."""
    names = [u.rsplit("/", 1)[-1] for u in urls]
    if len(set(names)) < len(names):
        raise ValueError("two shards share a file name: cache them into separate folders.")
    return [str(Path(folder) / name) for name in names]


def is_complete(urls: list[str], folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file() and all(Path(u).is_file() for u in cached_urls(urls, folder))


def _from_config(path: Path) -> dict:
    """Defaults from a run's resolved `config.yaml` (train.py writes it into the run folder)."""
    if path.is_dir():
        path = path / "config.yaml"
    cfg = OmegaConf.load(path)
    source_urls = [source.get("urls") for source in cfg.data.get("sources") or []]  # a mixture's shards
    return {
        "vae": cfg.model.vae.get("name_or_path"),
        "image_size": int(cfg.data.image_size),
        "caption_key": str(cfg.data.get("caption_key", "txt")),
        "urls": [u for u in (cfg.data.get("train_urls"), *source_urls, cfg.data.get("val_urls")) if u],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capdiff.data.cache_latents", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", type=Path, help="a run folder or its config.yaml: VAE, image size, caption key, shards"
    )
    parser.add_argument("--vae", help="VAE folder or hub name (a run's model.vae.name_or_path)")
    parser.add_argument(
        "--urls", nargs="+", help="input shards (brace notation allowed); default: the run's train and val"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (shard names are kept)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--caption-key", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK when there is a GPU, else cpu")
    args = parser.parse_args(argv)
    defaults = _from_config(args.config) if args.config else {}
    vae, image_size = args.vae or defaults.get("vae"), args.image_size or defaults.get("image_size")
    if not vae or not image_size:
        parser.error("give --vae and --image-size, or --config <run folder> to read them from a run")
    urls = [u for spec in (args.urls or defaults.get("urls") or []) for u in expand_urls(spec, "--urls")]
    if not urls:
        parser.error("give --urls, or --config <run folder> to cache the run's train and val shards")
    from capdiff.models.diffusion import build_vae  # the models package is heavy; keep --help fast

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    counts = cache_latents(
        urls,
        args.out,
        build_vae(vae).to(device).eval(),
        vae,
        image_size,
        caption_key=args.caption_key or defaults.get("caption_key", "txt"),
        batch_size=args.batch_size,
        rank=rank,
        world_size=world_size,
    )
    skipped = {k: v for k, v in counts.items() if k != "written"}
    print(f"rank {rank}: {counts['written']} samples cached in {args.out}; skipped: {skipped or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
