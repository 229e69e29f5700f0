"""Progress bars of the long loops outside training: `capdiff-shards inspect` over many shards, and the shapes
probe's training. Shown on a terminal, gone once done, and never in captured output."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import rich
import torch
from rich.console import Console

from capdiff.evaluation.shapes import ATTRIBUTES, fit_probe
from tests.helpers import good_members, write_tar


def inspect(shards: str, **env: str) -> str:
    """stdout + stderr of `capdiff-shards inspect`, terminal control codes taken out."""
    command = [sys.executable, "-m", "capdiff.data.shards", "inspect", shards]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | env, timeout=120, check=True)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stdout + done.stderr)


def test_shards_inspect_shows_its_progress_on_a_terminal_only(tmp_path: Path) -> None:
    for n in range(3):
        write_tar(tmp_path / f"s-{n}.tar", good_members("k", 2, 2 * n))
    shards = str(tmp_path / "s-{0..2}.tar")
    on_terminal = inspect(shards, TTY_COMPATIBLE="1", TTY_INTERACTIVE="1")
    assert "inspecting" in on_terminal and "100%" in on_terminal and "3 shards, 6 samples" in on_terminal
    captured = inspect(shards)
    assert "inspecting" not in captured and "3 shards, 6 samples" in captured


def test_the_probe_training_shows_its_progress_on_a_terminal_only(monkeypatch) -> None:
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    attributes = [{name: values[i % len(values)] for name, values in ATTRIBUTES.items()} for i in range(8)]
    terminal = io.StringIO()
    monkeypatch.setattr(rich, "_console", Console(file=terminal, force_terminal=True, force_interactive=True))
    fit_probe(images, attributes, epochs=2, batch_size=4)
    assert "training the shapes probe" in terminal.getvalue()
    assert "4/4" in terminal.getvalue()  # 2 epochs × 2 batches, all done

    captured = io.StringIO()
    monkeypatch.setattr(rich, "_console", Console(file=captured))  # not a terminal: a log file, a pipe
    fit_probe(images, attributes, epochs=2, batch_size=4)
    assert captured.getvalue() == ""
