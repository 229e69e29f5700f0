"""README recipe 2 run as written, scaled down only in sizes: its own command lines, read from the README, with
the reduced offline hub behind `$MODELS`, a few dozen images behind `/raw/`, 2 CPU ranks instead of 8 GPUs.

What changes from the README's words: the folders (`/raw`, `$MODELS`, `$DATA` and the run folder point into the
test's temporary folder), the device counts (`trainer.devices=8` → 2 on `trainer.accelerator=cpu`), the
shard ranges (what `shards write` printed for the small data, as the README says to use yours) and sizes (shard
size, image size, batch, steps, the reduced hub's widths). Every other override is the README's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capdiff.testing.hub import repo_folder, revision
from tests.doc_commands import REPO, Command, document_commands, model_folders
from tests.helpers import image_bytes

VALUES = {"MODELS": "/@models", "DATA": "/@data"}
WORDS = {"<run>": "RUN", "<date>": "2026-01-01", "<time>": "00-00-00", "<prompts.jsonl>": "/@p", "CKPT": "x.ckpt"}
COMMANDS = document_commands(REPO / "README.md", VALUES, WORDS)
RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
# sizes only: the reduced hub's widths, small images, a few steps, quick sample grids
SIZES = [
    "data.image_size=64", "data.batch_size=2", "data.num_workers=1", "data.val_batch_size=2",
    "model.vision.resampler.width=64", "model.conditioner.width=64", "model.contrastive.embed_dim=32",
    "callbacks.sample_grid.steps=2", "callbacks.sample_grid.num_prompts=2",
    "callbacks.periodic_eval.every_n_steps=2", "callbacks.periodic_eval.num_samples=2",
    "callbacks.periodic_eval.steps=2",
    "trainer.max_steps=2", "trainer.log_every_n_steps=1", "extras.print_config=false",
]  # fmt: skip


def find(*texts: str) -> Command:
    return next(c for c in COMMANDS if all(any(t in w for w in c.words) for t in texts))


class Recipe:
    def __init__(self, root: Path, hub: Path) -> None:
        self.root, self.hub = root, hub
        self.places = {"/raw/": f"{root}/raw/", VALUES["MODELS"]: f"{root}/models", VALUES["DATA"]: f"{root}/data"}
        self.ranges: dict[str, str] = {}  # a README brace range → the one written here, per shard folder

    def words(self, command: Command) -> list[str]:
        out = []
        start = next(i for i, w in enumerate(command.words) if w in ("python", "python3")) + 1  # after `[VAR=…] python`
        for word in command.words[start:]:
            for stand_in, path in self.places.items():
                word = word.replace(stand_in, path)
            for prefix, written in self.ranges.items():
                word = re.sub(re.escape(prefix) + r"\{\d+\.\.\d+\}", prefix.replace("\\", "") + written, word)
            out.append(word)
        return out

    def run(self, words: list[str]) -> subprocess.CompletedProcess:
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(self.hub), "CAPDIFF_ROOT": str(self.root)}
        done = subprocess.run([sys.executable, *words], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(words)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done

    def note_written(self, folder: Path) -> None:
        for split in ("train", "val"):
            numbers = sorted(int(p.stem.split("-")[1]) for p in folder.glob(f"{split}-*.tar"))
            assert numbers == list(range(len(numbers))) and numbers
            self.ranges[f"{folder}/{split}-"] = f"{{{0:06d}..{numbers[-1]:06d}}}"


def raw_data(raw: Path) -> None:
    """An image folder with .txt sidecars (the img2dataset layout) and a JSONL table with COCO-style caption lists."""
    (raw / "cc3m").mkdir(parents=True)
    (raw / "coco" / "images").mkdir(parents=True)
    colours = ["red", "green", "blue", "white"]
    for i in range(48):
        colour = colours[i % 4]
        (raw / "cc3m" / f"{i:04d}.png").write_bytes(image_bytes(size=(80, 72), color=colour))
        (raw / "cc3m" / f"{i:04d}.txt").write_text(f"a {colour} picture, number {i}")
    rows = []
    for i in range(40):
        colour = colours[i % 4]
        (raw / "coco" / "images" / f"{i:04d}.png").write_bytes(image_bytes(size=(64, 64), color=colour))
        rows.append({"path": f"images/{i:04d}.png", "caption": [f"a {colour} square", f"{colour} all over, {i}"]})
    (raw / "coco" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_recipe_2_runs_as_written_on_two_ranks(reduced_hub: Path, tmp_path: Path) -> None:
    recipe = Recipe(tmp_path, reduced_hub)
    raw_data(tmp_path / "raw")
    for folder, repo in model_folders(COMMANDS, VALUES["MODELS"]).items():  # what `hf download --local-dir` gives
        local = Path(folder.replace(VALUES["MODELS"], str(tmp_path / "models")))
        local.parent.mkdir(parents=True, exist_ok=True)
        local.symlink_to(repo_folder(reduced_hub, repo) / "snapshots" / revision(repo, "reduced"))

    # 2. the shards, from the image folder and from the JSONL table, and a look at what training will read
    for source in ("/raw/cc3m/", "/raw/coco/captions.jsonl"):
        words = recipe.words(find("shards", "write", source))
        words[words.index("--shard-size") + 1] = "6"  # a size: 2 000 images a shard, scaled down
        recipe.run(words)
    for name in ("cc3m", "coco"):
        recipe.note_written(tmp_path / "data" / name)
    shown = recipe.run([*recipe.words(find("inspect", "--caption-key", "json.caption")), "--json"])
    assert all(shard["bad"] == {} and shard["samples"] for shard in json.loads(shown.stdout))

    # 4. training on the weighted mixture, each source with its caption key, accumulation, bf16-mixed
    train = recipe.words(find("train.py", "trainer.accumulate_grad_batches=4"))
    assert "trainer.devices=8" in train
    train = [w for w in train if w != "trainer.devices=8"] + ["trainer.devices=2", "trainer.accelerator=cpu"]
    run = tmp_path / "run"
    recipe.run([*train, *SIZES, f"hydra.run.dir={run}"])
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    assert saved["global_step"] == 2
    stream = saved["ImageTextDataModule"]["train_stream"]
    assert len(stream["positions"]) == 2  # both ranks' places in the stream
    assert list(saved["ImageTextDataModule"]["skipped"]) == ["cc3m", "coco"]
    assert (run / "samples").is_dir() and any((run / "samples").glob("generated_*.png"))

    # ... resumed as the README says: ckpt_path=last hydra.run.dir=<its run folder>, the same overrides
    recipe.run([*train, *SIZES, "trainer.max_steps=3", f"hydra.run.dir={run}", "ckpt_path=last"])
    assert torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"] == 3

    # 5. evaluation on the run's validation shards, FID in CLIP's feature space from the local CLIP folder
    evaluate = recipe.words(find("evaluate.py", "eval.fid.feature=clip"))
    evaluate = [w.replace("logs/joint_ddim/runs/RUN", str(run)) for w in evaluate if w != "trainer.devices=8"]
    out = tmp_path / "eval"
    sizes = ["eval.num_samples=4", "eval.steps=2", "eval.batch_size=2", "data.num_workers=0"]
    recipe.run([*evaluate, "trainer.devices=2", "trainer.accelerator=cpu", *sizes, f"hydra.run.dir={out}"])
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["num_validation"] == 4 and metrics["fd_clip"] > 0  # Fréchet distance in CLIP space
