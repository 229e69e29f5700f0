"""README recipes 2 and 3 run as written, scaled down only in sizes: their own command lines, read from the
README, with the reduced offline hub behind `$MODELS`, a few dozen images behind `/raw/`, 2 CPU ranks instead of
8 GPUs; recipe 3's sweeps on the one-node Slurm cluster of tests/slurm_cluster.py.

What changes from the README's words: the folders (`/raw`, `$MODELS`, `$DATA`, the run folder and the Optuna
database point into the test's temporary folder, and recipe 3's `conf/local/default.yaml` is written there and
found through `hydra.searchpath` instead of into the checkout), the device counts (`trainer.devices=8` → 2 on
`trainer.accelerator=cpu`), the shard ranges (what `shards write` printed for the small data, as the README says
to use yours) and sizes (shard size, image size, batch, steps, trials, the reduced hub's widths). Every other
override is the README's.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

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
ON_TWO_CPU_RANKS = {"trainer.devices=8": ["trainer.devices=2", "trainer.accelerator=cpu"]}


def find(*texts: str) -> Command:
    return next(c for c in COMMANDS if all(any(t in w for w in c.words) for t in texts))


def scaled(words: list[str], values: dict[str, list[str]]) -> list[str]:
    """`words` with each word that `values` names replaced by its words (a size, a device count)."""
    return [new for word in words for new in values.get(word, [word])]


class Recipe:
    def __init__(self, root: Path, hub: Path, env: dict[str, str] | None = None) -> None:
        self.root, self.hub, self.env = root, hub, env or {}
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
        env = os.environ | self.env
        env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(self.hub), "CAPDIFF_ROOT": str(self.root)}
        done = subprocess.run([sys.executable, *words], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
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


def recipe_2_steps_1_and_2(recipe: Recipe) -> None:
    """The weights where `hf download --local-dir` puts them, and the shards `shards write` makes of the raw data."""
    raw_data(recipe.root / "raw")
    for folder, repo in model_folders(COMMANDS, VALUES["MODELS"]).items():  # what `hf download --local-dir` gives
        local = Path(folder.replace(VALUES["MODELS"], str(recipe.root / "models")))
        local.parent.mkdir(parents=True, exist_ok=True)
        local.symlink_to(repo_folder(recipe.hub, repo) / "snapshots" / revision(repo, "reduced"))
    for source in ("/raw/cc3m/", "/raw/coco/captions.jsonl"):
        words = recipe.words(find("shards", "write", source))
        words[words.index("--shard-size") + 1] = "6"  # a size: 2 000 images a shard, scaled down
        recipe.run(words)
    for name in ("cc3m", "coco"):
        recipe.note_written(recipe.root / "data" / name)


@pytest.mark.slow
def test_recipe_2_runs_as_written_on_two_ranks(reduced_hub: Path, tmp_path: Path) -> None:
    recipe = Recipe(tmp_path, reduced_hub)
    # 1.–2. the weights, the shards from the image folder and from the JSONL table, and a look at what training
    # will read
    recipe_2_steps_1_and_2(recipe)
    shown = recipe.run([*recipe.words(find("inspect", "--caption-key", "json.caption")), "--json"])
    assert all(shard["bad"] == {} and shard["samples"] for shard in json.loads(shown.stdout))

    # 4. training on the weighted mixture, each source with its caption key, accumulation, bf16-mixed
    train = recipe.words(find("train.py", "trainer.accumulate_grad_batches=4"))
    assert "trainer.devices=8" in train
    train = scaled(train, ON_TWO_CPU_RANKS)
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


def set_words(words: list[str], values: dict[str, str]) -> list[str]:
    """`words` with the value of each `key=` that `values` names replaced (a size, a folder)."""
    assert all(any(w.startswith(f"{key}=") for w in words) for key in values), (values, words)
    return [f"{w.split('=')[0]}={values[w.split('=')[0]]}" if w.split("=")[0] in values else w for w in words]


def local_settings(root: Path) -> Path:
    """README recipe 3's "once per cluster": conf/local/example.yaml copied to local/default.yaml and its slurm
    block filled in, here for the local cluster (one partition, 2 CPUs), in a config folder of the test's own."""
    settings = yaml.safe_load((REPO / "conf" / "local" / "example.yaml").read_text())
    settings["paths"]["data_dir"] = str(root / "shared")
    activate = Path(sys.executable).parent / "activate"
    settings["slurm"] |= {"partition": "debug", "cpus_per_task": 1, "setup": [f"source {activate}"]}
    local = root / "conf" / "local" / "default.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("# @package _global_\n" + yaml.safe_dump(settings))
    return root / "conf"


@pytest.mark.slurm
def test_recipe_3_sweeps_run_as_written_on_a_slurm_cluster(slurm, reduced_hub: Path, tmp_path: Path) -> None:
    """The Optuna search (2 trials, 2 at a time, the study in a database) and the grid (4 points), each point a
    Slurm job of 2 tasks, W&B offline as on compute nodes without network."""
    import optuna

    recipe = Recipe(tmp_path, reduced_hub, env=slurm.env)
    recipe_2_steps_1_and_2(recipe)
    conf = local_settings(tmp_path)
    sizes = [w for w in SIZES if not w.startswith("trainer.max_steps=")]
    common = [f"hydra.searchpath=[file://{conf}]", *sizes]
    logs = tmp_path / "logs" / "joint_ddim" / "multiruns"  # the README's logs/joint_ddim/multiruns/<date>_<time>

    search = recipe.words(find("train.py", "hparams_search=joint_optuna"))
    search = set_words(scaled(search, ON_TWO_CPU_RANKS), {
        "trainer.max_steps": "2", "hydra.sweeper.n_trials": "2", "hydra.sweeper.n_jobs": "2",
        "hydra.sweeper.storage": f"sqlite:///{tmp_path / 'optuna.db'}"})  # fmt: skip
    recipe.run([*search, *common])
    (sweep,) = logs.iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.optim.lr", "model.optim.groups.unet.lr_scale",
                                        "model.loss.weights.contrastive", "model.caption_dropout"}  # fmt: skip
    assert math.isfinite(best["best_value"])
    study = optuna.load_study(study_name="joint", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert best["best_value"] == min(t.value for t in study.trials)  # val/loss, each trial's returned metric
    # one Slurm job per trial (the 2 trials Optuna asks for at a time go as one job array: <array>_<index>), each
    # of 2 tasks (ranks) with its stdout and stderr in .submitit/<job id>/
    jobs = [p for p in (sweep / ".submitit").iterdir() if list(p.glob("*_log.out"))]
    assert len(jobs) == 2
    for job in jobs:
        assert all((job / f"{job.name}_{rank}_log.{out}").is_file() for rank in (0, 1) for out in ("out", "err"))
    for trial in ("0", "1"):
        saved = torch.load(sweep / trial / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert saved["global_step"] == 2 and len(saved["ImageTextDataModule"]["train_stream"]["positions"]) == 2
        assert list((sweep / trial / "wandb").glob("offline-run-*"))  # for `wandb sync` from a machine with network
        assert list((sweep / trial / "csv").glob("version_*/metrics.csv"))

    grid = recipe.words(find("train.py", "model.optim.lr=1e-4,3e-4"))
    recipe.run([*scaled(grid, ON_TWO_CPU_RANKS), *common, "trainer.max_steps=2"])
    (grid_sweep,) = [p for p in logs.iterdir() if p != sweep]
    points = [p for p in grid_sweep.iterdir() if p.name.isdigit()]
    swept = set()
    for point in points:
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(point / ".hydra" / "overrides.yaml"))
        swept.add((float(overrides["model.optim.lr"]), float(overrides["model.loss.weights.contrastive"])))
        saved = torch.load(point / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert saved["global_step"] == 2
    assert swept == {(1e-4, 0.05), (1e-4, 0.1), (3e-4, 0.05), (3e-4, 0.1)}  # one job per point
