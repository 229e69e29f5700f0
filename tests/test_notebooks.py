"""Both notebooks execute top to bottom against a small trained model, and are stored without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from capdiff.train import train
from tests.helpers import REPO, compose_config

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_both_notebooks_are_there_and_stored_without_outputs() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "compare_runs.ipynb"}
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs before commit"


@pytest.fixture(scope="module")
def runs(smoke_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small trained runs for the notebooks to load and compare."""
    folder = tmp_path_factory.mktemp("runs")
    for i in range(2):
        train(compose_config(smoke_root, ["experiment=smoke", f"paths.output_dir={folder / f'run{i}'}", f"seed={i}"]))
    return folder


@pytest.mark.parametrize("name", ["quickstart.ipynb", "compare_runs.ipynb"])
def test_notebook_executes(name: str, runs: Path, smoke_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPDIFF_CKPT", str(runs / "run0" / "checkpoints" / "last.ckpt"))
    monkeypatch.setenv("CAPDIFF_DATA", str(smoke_root / "data"))
    monkeypatch.setenv("CAPDIFF_RUNS", str(runs / "*"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    book = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    outputs = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    if name == "compare_runs.ipynb":
        assert "2 runs:" in outputs and "val/loss" in outputs
    else:
        assert "checkpoint:" in outputs and os.environ["CAPDIFF_CKPT"] in outputs
