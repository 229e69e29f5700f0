"""A run on a user's own shards, used as a researcher would: evaluate it with only its checkpoint or only other
validation shards, move the run folder and delete the data caches, then load it, evaluate it and resume it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capdiff import Pipeline, cli
from capdiff.checkpoints.portable import PARTS_KEY, RUN_KEY, read_checkpoint
from capdiff.evaluate import evaluate
from capdiff.train import train
from tests.helpers import compose_config, image_bytes, run_entry_point, write_tar

SIZE = 48  # neither shapes size: the UNet's sample size and every part follow data.image_size


def write_shards(folder: Path, prefix: str, shards: int, per_shard: int, seed: int) -> str:
    for n in range(shards):
        members = []
        for i in range(per_shard):
            colour = ((37 * (i + seed)) % 256, (91 * n + 50) % 256, (13 * i) % 256)
            key = f"{prefix}{n}-{i:04d}"
            members += [
                (f"{key}.jpg", image_bytes(colour, (64, 56), "JPEG")),
                (f"{key}.txt", f"a {prefix} {i}".encode()),
            ]
        write_tar(folder / f"{prefix}-{n:03d}.tar", members)
    return str(folder / f"{prefix}-{{000..{shards - 1:03d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("shards")
    return {
        "train": write_shards(folder, "train", 4, 10, 0),
        "val": write_shards(folder, "val", 2, 5, 1),
        "other": write_shards(folder, "other", 1, 7, 2),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shards: dict[str, str]) -> tuple[Path, Path]:
    """(capdiff's root with its data/ caches, the run folder) of a smoke run on the shards."""
    root = tmp_path_factory.mktemp("root")
    run = root / "first-machine" / "run"
    train(
        compose_config(
            root,
            [
                "experiment=smoke",
                "data=webdataset",
                f"data.train_urls='{shards['train']}'",
                f"data.val_urls='{shards['val']}'",
                f"data.image_size={SIZE}",
                f"paths.output_dir={run}",
                "callbacks.periodic_eval=null",
                "callbacks.sample_grid=null",
            ],
        )
    )
    return root, run


def moved(trained: tuple[Path, Path], tmp_path: Path) -> Path:
    """The run folder copied to another place, with the data caches that made it gone."""
    root, run = trained
    target = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, target)
    for cache in ("tokenizers", "autoencoders", "real_features"):
        shutil.rmtree(root / "data" / cache, ignore_errors=True)
    return target


def test_a_checkpoint_carries_its_parts_and_its_run(trained: tuple[Path, Path], shards: dict[str, str]) -> None:
    checkpoint = read_checkpoint(trained[1] / "checkpoints" / "last.ckpt")
    parts, run = checkpoint[PARTS_KEY], checkpoint[RUN_KEY]
    assert set(parts) == {"format", "tokenizer", "llm", "vision", "unet", "vae"}
    assert "tokenizer.json" in parts["tokenizer"]
    assert parts["unet"]["sample_size"] == SIZE // 2  # the smoke VAE halves the side
    assert run["config"]["data"]["val_urls"] == shards["val"] and run["output_dir"] == str(trained[1])


def test_a_moved_run_loads_and_evaluates_without_the_caches(
    trained: tuple[Path, Path], shards: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, _ = trained
    run = moved(trained, tmp_path)
    checkpoint = run / "checkpoints" / "last.ckpt"

    pipe = Pipeline.from_checkpoint(checkpoint)
    assert pipe.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pipe.image_size == SIZE
    image = Image.new("RGB", (64, 56), (200, 30, 30))
    assert len(pipe.caption([image, image])) == 2
    (generated,) = pipe.generate(["a train 3"], steps=2)
    assert generated.size == (SIZE, SIZE)
    image.save(tmp_path / "red.png")
    assert cli.main(["caption", "--ckpt", str(checkpoint), str(tmp_path / "red.png")]) == 0  # the capdiff command
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'red.png'}\t{pipe.caption([image])[0]}"

    # evaluate.py with nothing but the checkpoint: the run's own validation shards, at its image size
    done = run_entry_point("evaluate.py", root, tmp_path / "eval", f"ckpt_path={checkpoint}", "eval.steps=2")
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics, settings = report["metrics"], report["settings"]
    assert metrics["num_validation"] == 10 and {"val/loss", "bleu4", "i2t_r@1"} <= set(metrics)
    assert settings["data"]["val_urls"] == shards["val"] and settings["data"]["image_size"] == SIZE
    assert settings["data"]["train_urls"] is None  # not needed to evaluate
    # no feature network for FID on these images: every other metric, and the key that enables it
    assert not any(k.startswith(("fid_", "fd_", "kd_", "kid_")) for k in metrics)
    assert "eval.fid.feature=clip" in settings["skipped"]["fid_kid"]
    assert "FID/KID are skipped" in done.stdout + done.stderr
    assert settings["training_run"] == str(trained[1])
    with Image.open(tmp_path / "eval" / "samples" / "g4" / "000000.png") as sample:
        assert sample.size == (SIZE, SIZE)


@pytest.mark.slow
def test_a_moved_run_resumes_with_the_parts_its_checkpoint_carries(
    trained: tuple[Path, Path], shards: dict[str, str], tmp_path: Path
) -> None:
    root, _ = trained
    run = moved(trained, tmp_path)
    checkpoint = run / "checkpoints" / "last.ckpt"
    steps = read_checkpoint(checkpoint)["global_step"]
    resumed = compose_config(
        root,
        [
            *("experiment=smoke", f"paths.output_dir={run}", "ckpt_path=last", "trainer.max_epochs=2"),
            *("data=webdataset", f"data.train_urls='{shards['train']}'", f"data.val_urls='{shards['val']}'"),
            *(f"data.image_size={SIZE}", "callbacks.periodic_eval=null", "callbacks.sample_grid=null"),
        ],
    )
    train(resumed)
    assert read_checkpoint(checkpoint)["global_step"] == 2 * steps
    assert not (root / "data" / "tokenizers").exists() and not (root / "data" / "autoencoders").exists()
    assert (run / "parts" / "tokenizer" / "tokenizer.json").is_file()


def test_evaluate_on_other_shards_and_refuse_what_contradicts_the_checkpoint(
    trained: tuple[Path, Path], shards: dict[str, str], tmp_path: Path
) -> None:
    root, run = trained
    checkpoint = run / "checkpoints" / "last.ckpt"
    base = [f"ckpt_path={checkpoint}", "eval.steps=2", "eval.fid.feature=null"]
    out = tmp_path / "other"
    metrics = evaluate(
        compose_config(root, [*base, f"data.val_urls='{shards['other']}'", f"paths.output_dir={out}"], "evaluate")
    )
    assert metrics["num_validation"] == 7
    assert json.loads((out / "metrics.json").read_text())["settings"]["data"]["val_urls"] == shards["other"]

    for override, message in [
        ("data.image_size=32", rf"data.image_size=32 contradicts the checkpoint, trained at {SIZE} px"),
        ("data.latents=true", "reads image shards, not cached latents: drop data.latents"),
    ]:
        refused = tmp_path / override.replace("=", "-")
        with pytest.raises(ValueError, match=message):
            evaluate(compose_config(root, [*base, override, f"paths.output_dir={refused}"], "evaluate"))
        assert not refused.exists()  # refused before any work


def pixels(folder: Path) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(Image.open(p))).int() for p in sorted(folder.glob("*.png"))]


@pytest.mark.slow
def test_repeated_prompts_get_their_own_seeds_the_same_on_one_and_two_ranks(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    root, run = trained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a train 1"}\n' * 4)
    common = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"eval.prompts={prompts}", "eval.samples_per_prompt=2"]
    common += ["eval.steps=2", "eval.batch_size=3", "eval.fid.feature=null", "data.num_workers=0"]
    one = run_entry_point("evaluate.py", root, tmp_path / "one", *common)
    assert one.returncode == 0, one.stderr[-4000:]
    two = run_entry_point("evaluate.py", root, tmp_path / "two", *common, "trainer=ddp_cpu", "trainer.devices=2")
    assert two.returncode == 0, two.stderr[-4000:]
    one, two = pixels(tmp_path / "one" / "samples" / "g4"), pixels(tmp_path / "two" / "samples" / "g4")
    assert len(one) == len(two) == 8
    # 4 copies × 2 samples: 8 different images ...
    assert min((one[i] - one[j]).abs().float().mean() for i in range(8) for j in range(i)) > 5
    # ... the same on 2 ranks, but for float rounding (other batches on each rank): at most 1 level in 0.1% of pixels
    for a, b in zip(one, two, strict=True):
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 1e-3
    index = [json.loads(line) for line in (tmp_path / "two" / "samples" / "index.jsonl").read_text().splitlines()]
    assert sorted(line["seed"] for line in index) == list(range(8))


@pytest.mark.slow
def test_eval_num_samples_scores_the_same_images_on_one_and_two_ranks(
    trained: tuple[Path, Path], shards: dict[str, str], tmp_path: Path
) -> None:
    """`eval.num_samples=N` is the split's first N samples in shard order, whatever the number of ranks (each
    rank used to keep its first N / ranks: another set, and 6 for N=5 on 2 ranks)."""
    root, run = trained
    common = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "eval.steps=2", "eval.fid.feature=null",
              "eval.num_samples=5", "data.num_workers=0", f"data.val_urls='{shards['other']}'"]  # fmt: skip
    one = run_entry_point("evaluate.py", root, tmp_path / "one", *common)
    assert one.returncode == 0, one.stderr[-4000:]
    two = run_entry_point("evaluate.py", root, tmp_path / "two", *common, "trainer=ddp_cpu", "trainer.devices=2")
    assert two.returncode == 0, two.stderr[-4000:]

    def keys(folder: Path) -> list[str]:
        return sorted(json.loads(line)["key"] for line in (folder / "captions.jsonl").read_text().splitlines())

    assert len(keys(tmp_path / "one")) == 5
    assert keys(tmp_path / "one") == keys(tmp_path / "two")
