"""Files built before training (shapes shards, tokenizer, first-stage autoencoder, probe) have one writer in
the whole job, global rank 0, on every launcher; temporary names never collide between hosts or processes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from capdiff.distributed import host_tag, is_global_leader, partial_path, seed_for_rank

LAUNCHERS = [
    ({}, True),  # a plain `python train.py`
    ({"RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun, first process
    ({"RANK": "8", "LOCAL_RANK": "0"}, False),  # torchrun, the first process of the second node
    ({"SLURM_PROCID": "0"}, True),  # srun, task 0
    ({"SLURM_PROCID": "8", "SLURM_LOCALID": "0"}, False),  # srun, first task of node 2
    ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # Lightning's launcher inside an interactive allocation
    ({"NODE_RANK": "1"}, False),  # Lightning's launcher, the main process of node 1
    ({"LOCAL_RANK": "3"}, False),  # a process Lightning's launcher started
]


@pytest.mark.parametrize(("env", "leader"), LAUNCHERS)
def test_only_global_rank_zero_writes_shared_files(monkeypatch, env: dict, leader: bool) -> None:
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_LOCALID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_global_leader() is leader


def test_temporary_names_are_unique_to_host_and_process(tmp_path: Path) -> None:
    name = partial_path(tmp_path / "tokenizer").name
    assert name == f".tokenizer.{host_tag()}.{os.getpid()}.partial" and "." not in host_tag()


def test_a_rank_other_than_zero_waits_for_the_tokenizer_and_never_writes_it(smoke_cfg, monkeypatch) -> None:
    from capdiff.artifacts import cache_folder, prepare_tokenizer
    from capdiff.models.tokenizer import build_byte_bpe
    from capdiff.train import build_datamodule

    cfg = smoke_cfg("model.llm.build_tokenizer.vocab_size=290")  # a tokenizer no other test has built
    datamodule = build_datamodule(cfg)
    settings = {"vocab_size": 290, "captions": 20000}
    folder = cache_folder(cfg.paths.data_dir, "tokenizers", datamodule, settings)
    assert not folder.exists()
    monkeypatch.setenv("SLURM_PROCID", "5")
    built = []
    waiter = threading.Thread(target=lambda: built.append(prepare_tokenizer(cfg, datamodule)))
    waiter.start()
    time.sleep(2.5)
    assert waiter.is_alive() and not folder.exists()  # waiting, and not writing
    build_byte_bpe(["a red circle", "a blue square"] * 50, folder, 290)  # what global rank 0 would do
    waiter.join(timeout=10)
    assert not waiter.is_alive() and built == [folder]


def test_each_rank_seeds_its_own_stream(monkeypatch) -> None:
    import torch

    monkeypatch.setenv("PL_GLOBAL_SEED", "42")
    seed_for_rank(0)
    zero = torch.rand(4)
    seed_for_rank(1)
    one = torch.rand(4)
    seed_for_rank(0)
    assert torch.equal(torch.rand(4), zero) and not torch.equal(zero, one)
