"""W&B as users meet it without a key or a network: offline runs whose files hold the metrics and the config,
one W&B run per run folder across resumes, and no crash when W&B cannot be reached."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from capdiff.loggers import RUN_ID_FILE
from capdiff.train import train

BLOCK = 32 * 1024  # a .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type)-framed chunks


def read_records(path: Path) -> list[pb.Record]:
    """The protobuf records of an offline run's `run-<id>.wandb` file (what `wandb sync` uploads)."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunk = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def summarize(path: Path) -> dict:
    history, config, run = set(), set(), None
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            config |= {item.key or "/".join(item.nested_key) for item in record.config.update}
        elif kind == "run":
            run = record.run
    return {"history": history, "config": config, "run": run}


@pytest.fixture
def no_wandb_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc from `wandb login`


def test_without_a_key_training_logs_offline_and_a_resume_continues_the_same_run(
    smoke_cfg, tmp_path: Path, no_wandb_key, caplog
) -> None:
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="capdiff.loggers"):
        train(smoke_cfg("logger=wandb"))
    notices = [r.getMessage() for r in caplog.records if "W&B: no API key" in r.getMessage()]
    assert len(notices) == 1 and "wandb sync" in notices[0]
    run_id = (run / RUN_ID_FILE).read_text().strip()
    (first,) = (run / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")
    expected = {"val/loss", "val/diffusion_loss", "val/caption_loss", "samples/count"}
    logged = summarize(first)
    for _ in range(30):  # W&B's service writes the offline file on its own; on a loaded machine it lags the run
        if expected <= logged["history"]:
            break
        time.sleep(1)
        logged = summarize(first)
    assert expected <= logged["history"]
    assert {"model", "data", "trainer", "seed", "task_name"} <= logged["config"]  # the whole resolved config
    assert (logged["run"].run_id, logged["run"].run_group, logged["run"].job_type) == (run_id, "smoke", "train")
    assert list(logged["run"].tags) == ["smoke"]

    train(smoke_cfg("logger=wandb", "trainer.max_epochs=2", "ckpt_path=last"))
    assert (run / RUN_ID_FILE).read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))) == 2  # one id, both parts

    import wandb

    assert wandb.run is None  # finished: the next run in this process starts its own


@pytest.mark.slow  # W&B's own 5 s init timeout, in a process of its own
def test_when_wandb_cannot_be_reached_the_run_goes_on_offline(tmp_path: Path) -> None:
    # A process of its own: W&B reads its environment once per process.
    # Also not this process's W&B service (WANDB_SERVICE), which a run in an earlier test started.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "HOME": str(tmp_path / "home"),
        "WANDB_API_KEY": "x" * 40,
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens there
        "WANDB_INIT_TIMEOUT": "5",
    }
    script = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from capdiff.loggers import wandb_logger\n"
        f"logger = wandb_logger(save_dir={str(tmp_path / 'run')!r})\n"
        "logger.log_metrics({'val/loss': 1.5}, step=3)\n"
        "logger.experiment.finish()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "W&B could not start online" in done.stderr
    (path,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    assert "val/loss" in summarize(path)["history"]


def test_evaluation_results_go_to_wandb_as_tables(tmp_path: Path) -> None:
    from PIL import Image

    samples = tmp_path / "samples"
    samples.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(samples / "000000.png")
    (samples / "index.jsonl").write_text(
        '{"prompt": "a red circle", "seed": 7, "guidance_scale": 4.0, "file": "000000.png"}\n'
    )
    # As evaluate.py does it (build_loggers starts the run, then tables, then finish), in a process of its own
    # so that no W&B state of an earlier test in this process takes part.
    script = (
        "from pathlib import Path\n"
        "from capdiff.loggers import finish_loggers, log_eval_tables, wandb_logger\n"
        f"logger = wandb_logger(save_dir={str(tmp_path / 'run')!r}, offline=True, job_type='eval')\n"
        "logger.experiment.config.update({'eval': {'steps': 25}})\n"
        "log_eval_tables([logger], {'fd_probe': 12.5, 'probe_attr/mean': 0.5}, "
        f"Path({str(samples)!r}))\n"
        "finish_loggers([logger])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = summarize(path)
    assert {"eval/metrics/_type", "eval/samples_table/_type"} <= logged["history"]
    assert logged["run"].job_type == "eval" and "eval" in logged["config"]


def test_identity_of_a_runs_wandb_logger_and_none_without_one(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import CSVLogger

    from capdiff.loggers import wandb_identity, wandb_logger

    csv = CSVLogger(tmp_path)
    logger = wandb_logger(save_dir=str(tmp_path / "run"), group="smoke", name="first", offline=True)
    run_id = (tmp_path / "run" / RUN_ID_FILE).read_text().strip()
    assert wandb_identity([csv, logger]) == {
        "id": run_id,
        "project": "capdiff",
        "entity": None,
        "group": "smoke",
        "name": "first",
    }
    assert wandb_identity([csv]) is None
    assert wandb_identity([]) is None


def compose_with_hydra(root: Path, overrides: list[str], config: str):
    """A composed config with its `hydra` node, set as the current HydraConfig (as in a real run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from tests.helpers import REPO

    base = [f"paths.root_dir={root}", f"paths.output_dir={root / 'out'}", "extras.print_config=false"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config, overrides=base + overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def hydra_config():
    from hydra.core.hydra_config import HydraConfig

    yield compose_with_hydra
    HydraConfig.instance().cfg = None


def test_a_given_wandb_id_continues_that_run_and_becomes_the_run_folders_id(tmp_path: Path, hydra_config) -> None:
    import hydra

    from capdiff.loggers import wandb_logger

    run = tmp_path / "out"
    first = wandb_logger(save_dir=str(run), offline=True)
    kept = (run / RUN_ID_FILE).read_text().strip()
    assert first._wandb_init["id"] == kept and first._wandb_init["resume"] == "allow"
    # `logger.wandb.id=...` on the command line, through the real config
    cfg = hydra_config(tmp_path, ["logger=wandb", "logger.wandb.id=elsewhere7"], "train")
    given = hydra.utils.instantiate(cfg.logger.wandb)
    assert (given._wandb_init["id"], given._wandb_init["resume"]) == ("elsewhere7", "allow")
    assert (run / RUN_ID_FILE).read_text().strip() == "elsewhere7"
    again = wandb_logger(save_dir=str(run), offline=True)  # a later resume of this folder, without the id
    assert again._wandb_init["id"] == "elsewhere7"


TRAINING = {"id": "trn00042", "project": "shapes", "entity": "lab", "group": "smoke-sweep7", "name": "lr=0.1"}


def test_an_evaluation_run_joins_the_training_runs_group_project_and_entity(tmp_path: Path, hydra_config) -> None:
    import hydra

    from capdiff.loggers import link_to_training

    cfg = hydra_config(tmp_path, ["logger=wandb", "ckpt_path=x.ckpt"], "evaluate")
    link_to_training(cfg, TRAINING)
    logger = hydra.utils.instantiate(cfg.logger.wandb)
    init = logger._wandb_init
    assert (init["group"], init["project"], init["entity"], init["job_type"]) == (
        "smoke-sweep7",
        "shapes",
        "lab",
        "eval",
    )
    assert init["config"] == {
        "training_run_id": "trn00042",
        "training_run_name": "lr=0.1",
        "training_run_group": "smoke-sweep7",
    }
    assert init["id"] != "trn00042"  # its own run, in the training run's group


def test_an_evaluation_keeps_the_project_entity_and_group_it_was_given(tmp_path: Path, hydra_config) -> None:
    import hydra

    from capdiff.loggers import link_to_training

    given = ["logger.wandb.project=evals", "logger.wandb.entity=me", "logger.wandb.group=mine"]
    cfg = hydra_config(tmp_path, ["logger=wandb", "ckpt_path=x.ckpt", *given], "evaluate")
    link_to_training(cfg, TRAINING)
    init = hydra.utils.instantiate(cfg.logger.wandb)._wandb_init
    assert (init["project"], init["entity"], init["group"]) == ("evals", "me", "mine")
    assert init["config"]["training_run_id"] == "trn00042"


def test_linking_does_nothing_without_a_wandb_logger_or_a_training_identity(tmp_path: Path, hydra_config) -> None:
    from omegaconf import OmegaConf

    from capdiff.loggers import link_to_training

    csv_only = hydra_config(tmp_path, ["ckpt_path=x.ckpt"], "evaluate")
    before = OmegaConf.to_yaml(csv_only)
    link_to_training(csv_only, TRAINING)
    assert OmegaConf.to_yaml(csv_only) == before and "wandb" not in csv_only.logger
    untrained = hydra_config(tmp_path, ["logger=wandb", "ckpt_path=x.ckpt"], "evaluate")
    before = OmegaConf.to_yaml(untrained)
    link_to_training(untrained, None)
    assert OmegaConf.to_yaml(untrained) == before


def test_a_linked_evaluation_run_records_the_training_run_in_its_wandb_files(tmp_path: Path, hydra_config) -> None:
    import hydra

    from capdiff.loggers import finish_loggers, link_to_training

    cfg = hydra_config(tmp_path, ["logger=wandb", "ckpt_path=x.ckpt", "logger.wandb.entity=null"], "evaluate")
    link_to_training(cfg, TRAINING | {"entity": None})
    logger = hydra.utils.instantiate(cfg.logger.wandb)
    logger.log_metrics({"eval/fd_probe": 3.0})
    finish_loggers([logger])
    init = logger._wandb_init  # what wandb.init got (the offline run file is written asynchronously)
    assert (init["group"], init["project"]) == ("smoke-sweep7", "shapes")
    config = init["config"]
    assert {k: config[k] for k in ("training_run_id", "training_run_name", "training_run_group")} == {
        "training_run_id": "trn00042",
        "training_run_name": "lr=0.1",
        "training_run_group": "smoke-sweep7",
    }


SWEEP_APP = """
import hydra
from capdiff.loggers import wandb_logger

@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    from hydra.core.hydra_config import HydraConfig

    out = HydraConfig.get().runtime.output_dir
    logger = wandb_logger(save_dir=out, name=cfg.get("name"), offline=True)
    print("NAME", HydraConfig.get().job.num, logger._wandb_init["name"], logger._wandb_init["group"])

main()
"""


def sweep_names(tmp_path: Path, *overrides: str) -> dict[str, list[str]]:
    app = tmp_path / "app.py"
    app.write_text(SWEEP_APP)
    command = [sys.executable, str(app), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return {line.split()[1]: line.split()[2:] for line in done.stdout.splitlines() if line.startswith("NAME ")}


@pytest.mark.slow  # a real Hydra multirun in a process of its own
def test_sweep_jobs_are_named_by_their_swept_overrides(tmp_path: Path) -> None:
    names = sweep_names(tmp_path, "+lr=0.1,0.2", "+layers=range(1,3)", "+note=fixed", "+paths.x=/p", "+ckpt_path=c")
    assert names == {
        "0": ["lr=0.1,layers=1", "capdiff-sweep"],
        "1": ["lr=0.1,layers=2", "capdiff-sweep"],
        "2": ["lr=0.2,layers=1", "capdiff-sweep"],
        "3": ["lr=0.2,layers=2", "capdiff-sweep"],
    }


def test_a_sweep_job_whose_sweep_cannot_be_read_is_named_by_all_its_overrides(tmp_path: Path, hydra_config) -> None:
    from capdiff.loggers import wandb_logger

    # no multirun.yaml in the sweep folder (a launcher whose jobs do not see it): every override but the noisy
    sweep = ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    hydra_config(tmp_path, [*sweep, "model.caption_dropout=0.2", "ckpt_path=last", "+paths.x=/p"], "train")
    assert wandb_logger(save_dir=str(tmp_path / "a"), offline=True)._wandb_init["name"] == "model.caption_dropout=0.2"
    assert wandb_logger(save_dir=str(tmp_path / "b"), name="chosen", offline=True)._wandb_init["name"] == "chosen"
    hydra_config(tmp_path, ["model.caption_dropout=0.2"], "train")  # not a multirun: the folder's name
    assert wandb_logger(save_dir=str(tmp_path / "c"), offline=True)._wandb_init["name"] == "c"
