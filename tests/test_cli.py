"""The `capdiff` command as a user runs it: the installed console script (and `python -m capdiff.cli`) in
subprocesses, against the session's trained smoke checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capdiff.cli import MAX_PIXELS, main, slug

CONSOLE_SCRIPT = Path(sys.executable).with_name("capdiff")


def capdiff(*args: str | Path) -> list[str]:
    if not CONSOLE_SCRIPT.is_file():
        pytest.fail(f"no {CONSOLE_SCRIPT}: the console script comes with the install; run `make install`")
    return [str(CONSOLE_SCRIPT), *map(str, args)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-inputs")
    files = {"red": folder / "red.png", "blue": folder / "blue photo.jpg"}
    Image.new("RGB", (48, 40), (220, 30, 30)).save(files["red"])
    Image.new("RGB", (64, 64), (30, 30, 220)).save(files["blue"])
    return files


@pytest.fixture(scope="module")
def runs(trained_checkpoint: Path, inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Each verb run once, the processes side by side: each spends most of its time importing torch and the
    model libraries, on one core, so side by side they keep every core busy. Returns ({name: CompletedProcess},
    the output folder)."""
    out = tmp_path_factory.mktemp("cli-out")
    ckpt = trained_checkpoint
    commands = {
        "caption": capdiff(
            "caption", "--ckpt", ckpt, inputs["red"], inputs["blue"], "--max-new-tokens", "8", "--device", "cpu"
        ),
        "generate": capdiff(
            *("generate", "--ckpt", ckpt, "a red circle", "-n", "2", "--steps", "2", "--seed", "7"),
            *("--sampler", "dpmpp_2m", "--out", out / "gen"),
        ),
        "edit": capdiff(
            *("edit", "--ckpt", ckpt, inputs["red"], "a green circle", "--strength", "0.5", "--steps", "2"),
            *("--device", "cpu", "--out", out / "edit"),
        ),
        "export": [sys.executable, "-m", "capdiff.cli", "export", str(ckpt), str(out / "export")],
    }
    processes = {
        name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, command in commands.items()
    }
    done = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(commands[name], process.returncode, stdout, stderr)
    return done, out


def succeeded(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout.splitlines()


def test_caption_prints_one_tab_separated_line_per_image(runs, inputs, trained_checkpoint: Path) -> None:
    from capdiff.data.decode import load_rgb
    from capdiff.pipeline import Pipeline

    lines = succeeded(runs[0]["caption"])
    assert len(lines) == 2
    paths, captions = zip(*(line.split("\t") for line in lines), strict=True)
    assert paths == (str(inputs["red"]), str(inputs["blue"]))  # as given, in order; a space in a name is kept
    pipe = Pipeline.from_checkpoint(trained_checkpoint, device="cpu")
    images = [load_rgb(inputs[name].read_bytes(), MAX_PIXELS) for name in ("red", "blue")]
    assert list(captions) == pipe.caption(images, max_new_tokens=8)  # the API's captions of the same images


def test_generate_writes_n_different_images_and_prints_their_paths(runs) -> None:
    result, out = runs[0]["generate"], runs[1]
    paths = [Path(line) for line in succeeded(result)]
    assert paths == [out / "gen" / f"{slug('a red circle')}-{seed}.png" for seed in (7, 8)]  # seed + i
    first, second = (np.asarray(Image.open(path)) for path in paths)
    assert first.shape == second.shape == (32, 32, 3)
    assert not np.array_equal(first, second)


def test_edit_writes_the_edited_image(runs) -> None:
    result, out = runs[0]["edit"], runs[1]
    assert succeeded(result) == [str(out / "edit" / "red-edit.png")]
    assert Image.open(out / "edit" / "red-edit.png").size == (32, 32)


def test_export_writes_a_folder_that_loads_with_from_pretrained(runs, inputs) -> None:
    from capdiff.pipeline import Pipeline

    result, out = runs[0]["export"], runs[1]
    assert succeeded(result) == [str(out / "export")]
    pipe = Pipeline.from_pretrained(out / "export", device="cpu")
    assert len(pipe.caption([Image.open(inputs["red"])], max_new_tokens=4)) == 1
    assert pipe.generate(["a red circle"], steps=2)[0].size == (32, 32)


def test_a_missing_checkpoint_is_a_one_line_error_naming_ckpt(tmp_path: Path, inputs) -> None:
    missing = tmp_path / "no.ckpt"
    result = subprocess.run(capdiff("caption", "--ckpt", missing, inputs["red"]), capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"capdiff caption: error: --ckpt {missing}: no such file; pass a .ckpt written by train.py")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--ckpt", "{ckpt}", "x", "--out", "{file}"], "--out {file}: exists and is not a folder"),
        (["edit", "--ckpt", "{folder}", "{file}", "x"], "--ckpt {folder}: this folder is not a capdiff export"),
        (["export", "{file}", "{folder}/export"], "CKPT {file}: cannot load it as a capdiff checkpoint"),
        (["caption", "--ckpt", "{ckpt}", "--device", "cuda:99", "{file}"], "--device cuda:99: "),
        (["caption", "--ckpt", "{ckpt}", "{file}", "{broken}"], "IMG {broken}: cannot read it as an image"),
        (["caption", "--ckpt", "{ckpt}", "{folder}/none.png"], "IMG {folder}/none.png: no such file"),
        (["edit", "--ckpt", "{ckpt}", "{file}", "x", "--out", "{file}/sub"], "--out {file}/sub: cannot make"),
        (["generate", "--ckpt", "{ckpt}", "x", "--sampler", "heun"], "--sampler heun: cannot sample this model"),
        (["edit", "--ckpt", "{ckpt}", "{file}", "x", "--sampler", "euler"], "--sampler euler: inversion editing"),
    ],
)
def test_bad_arguments_are_one_line_errors_with_exit_status_2(
    argv: list[str], message: str, tmp_path: Path, trained_checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    file, broken = tmp_path / "a.png", tmp_path / "broken.png"
    Image.new("RGB", (8, 8)).save(file)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n and no image after the signature")
    names = {"ckpt": trained_checkpoint, "file": file, "broken": broken, "folder": tmp_path}
    assert main([arg.format(**names) for arg in argv]) == 2
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert message.format(**names) in line and "; pass " in line
    assert out == ""  # checked before any work: not even the good image's caption


def test_an_unknown_sampler_is_refused_by_the_argument_parser(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--ckpt", "x.ckpt", "a prompt", "--sampler", "dpm++"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --sampler: 'dpm++' is not a sampler; use one of ddim, ddpm" in err
