"""Data pipeline: samples/s of capdiff's training stream vs raw tarfile + PIL decode + resize.

Writes realistic JPEG shards first (photo-like content, 256–512 px sides, quality 90), then measures:
- raw: one process reading the tars with `tarfile`, decoding with PIL, resizing the shorter side and cropping;
- capdiff: the real training stream (`ImageTextDataModule.train_dataloader()`: shard resampling, shuffle
  buffer, decode, resize, crop, caption choice, collate to uint8 tensors) with 1 and 2 dataloader workers,
  timed in the main process as the trainer sees it, after the first two batches of every worker (start-up
  excluded).
Goals: capdiff with 1 worker ≥ 0.95× raw; 2 workers ≥ 1.8× one.

    python bench/data_pipeline.py [--rounds 3] [--image-size 256] [--samples 1600]
"""

from __future__ import annotations

import io
import random
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from common import console, interleaved, median, parser, ratio_line, show
from PIL import Image, ImageDraw, ImageFilter

from capdiff.data import ImageTextDataModule


def photo_like(rng: random.Random, width: int, height: int) -> Image.Image:
    """Smooth gradients, shapes and sensor-like noise: compresses like a photo, unlike flat colour or pure noise."""
    gradient = np.linspace(0, 1, width)[None, :, None] * np.linspace(0.3, 1, height)[:, None, None]
    base = (gradient * np.array([rng.randint(60, 255) for _ in range(3)])).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(base, (height, width, 3)).copy())
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randint(10, max(11, width // 4))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def write_shards(folder: Path, samples: int, per_shard: int = 200) -> list[str]:
    rng = random.Random(0)
    urls = []
    for shard in range((samples + per_shard - 1) // per_shard):
        path = folder / f"bench-{shard:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(min(per_shard, samples - shard * per_shard)):
                key = f"{shard:04d}{i:05d}"
                buffer = io.BytesIO()
                photo_like(rng, rng.randint(256, 512), rng.randint(256, 512)).save(buffer, "JPEG", quality=90)
                caption = f"photo {key} of shapes over a gradient".encode()
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def raw_rate(urls: list[str], size: int, limit: int) -> float:
    """Samples/s of the plainest loop: tarfile + PIL decode + shorter-side resize + centre crop."""
    done, start = 0, time.perf_counter()
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                scale = size / min(image.size)
                w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
                image = image.resize((w, h), Image.Resampling.BICUBIC)
                left, top = (w - size) // 2, (h - size) // 2
                np.asarray(image.crop((left, top, left + size, top + size)))
                done += 1
                if done == limit:
                    return done / (time.perf_counter() - start)
    return done / (time.perf_counter() - start)


def capdiff_rate(urls: list[str], size: int, workers: int, batch_size: int, batches: int) -> float:
    data = ImageTextDataModule(
        urls,
        None,
        image_size=size,
        batch_size=batch_size,
        num_workers=workers,
        samples_per_epoch=batch_size * (batches + 4 * max(1, workers)),
        persistent_workers=False,
    )
    loader = iter(data.train_dataloader())
    # Worker start-up, the shuffle buffer's first fill and the batches the workers made meanwhile are not
    # throughput: the clock starts once every worker has handed over two batches.
    for _ in range(2 * max(1, workers)):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * batch_size / (time.perf_counter() - start)
    del loader
    return rate


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--samples", type=int, default=1600, help="samples written (and read by the raw loop)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    samples, rounds = (200, 1) if args.quick else (args.samples, args.rounds)
    with tempfile.TemporaryDirectory() as folder:
        console.print(f"writing {samples} JPEG samples (256–512 px) ...")
        urls = write_shards(Path(folder), samples, per_shard=max(25, samples // 8))
        batches = max(2, samples // args.batch_size // 2)  # each (rank, worker) slot resamples its shards
        results = interleaved(
            {
                "raw tarfile + PIL (1 process)": lambda: raw_rate(urls, args.image_size, samples),
                "capdiff, 1 worker": lambda: capdiff_rate(urls, args.image_size, 1, args.batch_size, batches),
                "capdiff, 2 workers": lambda: capdiff_rate(urls, args.image_size, 2, args.batch_size, batches),
            },
            rounds=rounds,
            warmup=0,
        )
    rates = {name: median(values) for name, values in results.items()}
    raw, one, two = rates.values()
    show(
        f"Decode → {args.image_size}² crop → batch, JPEG 256–512 px, {rounds} rounds",
        ["pipeline", "samples/s (median)", "range", "vs raw"],
        [[n, f"{r:.0f}", f"{min(results[n]):.0f}–{max(results[n]):.0f}", f"{r / raw:.2f}×"] for n, r in rates.items()],
    )
    ratio_line("capdiff 1 worker / raw", one / raw, 0.95)
    ratio_line("capdiff 2 workers / 1 worker", two / one, 1.8)


if __name__ == "__main__":
    main()
