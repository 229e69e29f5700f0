"""W&B as users meet it without a key or a network: offline runs whose files hold the metrics and the config,
one W&B run per run folder across resumes, and no crash when W&B cannot be reached."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
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
    logged = summarize(first)
    assert {"val/loss", "val/diffusion_loss", "val/caption_loss", "samples/count"} <= logged["history"]
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
