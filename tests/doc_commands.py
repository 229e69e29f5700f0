"""The shell commands of the README and docs/, checked here without running them, so they cannot drift.

Every ```bash / ```sh / ```shell block is read line by line (a trailing `\\` continues a line; `#` starts a
comment; `&&`, `||`, `|` and `;` separate commands) and each command is checked by its program:

- `python train.py …` (also `.venv/bin/python`, `make train ARGS="…"`): the Hydra overrides are composed
  with the real conf/ (a sweep, `a=1,2`, with the first value of each swept key) and `train.py`'s checks
  before any work run: the data module is instantiated (every `data.*` value) and the recipe's
  `check_config` (every model key, every pretrained part found, the parts' sizes);
- `python evaluate.py …`: composed with conf/evaluate.yaml, and its evaluation settings read;
- `python -m capdiff.<module> …`, `torchrun … -m capdiff.<module> …`, `capdiff <verb> …`, `python bench/<x>.py …`:
  the program's own argument parser parses the arguments (nothing runs after the parse);
- `python -m tests.<module>` (a test helper run by hand): the module exists;
- `make <target> [VAR=…]`: `make -n` accepts it; `hf download …`: every option is one `hf download` has;
- `.ci/<script>`: the file exists; `export …` lines, and the programs in `EXTERNAL`, are not checked.

Placeholders get the values the test that reads the document gives: `$NAME` / `${NAME}` as the shell would expand
them (outside single quotes), `<name>` and the upper-case words of `WORDS` replaced first. An unknown
variable or placeholder fails the check, so a new one must be given a value here. `$MODELS` is a folder where
each `hf download <repo id> --local-dir $MODELS/<name>` of the same document has written a config-only copy of
that repo (the configs `capdiff.testing.hub` holds), which is all `check_config` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", re.S | re.M)
PLACEHOLDER = re.compile(r"<([A-Za-z][\w .-]*)>")
EXTERNAL = {"cp", "tmux", "nohup", "scancel", "sbatch", "srun", "rsync", "wandb"}
PYTHONS = {"python", "python3", ".venv/bin/python"}


class Parsed(Exception):
    """Raised in place of running a program once its arguments have parsed."""


@dataclass
class Command:
    source: str  # file:line, for the failure message
    words: list[str]

    def __str__(self) -> str:
        return f"{self.source}: {shlex.join(self.words)}"


def shell_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, logical line) of every fenced shell block, continuations joined."""
    for block in FENCE.finditer(text):
        first = text[: block.start(1)].count("\n") + 1
        pending, start = "", None
        for offset, line in enumerate(block.group(1).splitlines()):
            if start is None:
                start = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending, start = "", None


def strip_comment(line: str) -> str:
    """`line` without its comment: from a `#` that starts a word, outside quotes."""
    quote = ""
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def split_line(line: str, values: dict[str, str]) -> list[list[str]]:
    """The commands of a shell line as words, quotes removed and variables expanded as bash would."""
    commands: list[list[str]] = [[]]
    word: list[str] | None = None
    quote = ""
    i = 0

    def add(text: str) -> None:
        nonlocal word
        word = (word or []) + [text]

    def end_word() -> None:
        nonlocal word
        if word is not None:
            commands[-1].append("".join(word))
            word = None

    while i < len(line):
        c = line[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                add(c)
        elif c == "\\" and i + 1 < len(line):
            add(line[i + 1])
            i += 1
        elif c == "$":
            match = re.match(r"\$(?:\{(\w+)\}|(\w+))", line[i:])
            if not match:
                raise ValueError(f"a bare $ in {line!r}")
            name = match.group(1) or match.group(2)
            if name not in values:
                raise ValueError(f"${name} has no test value: give it one in the test that reads it ({line!r})")
            add(values[name])
            i += match.end() - 1
        elif quote == '"':
            if c == '"':
                quote = ""
            else:
                add(c)
        elif c in "'\"":
            quote = c
            add("")
        elif c.isspace():
            end_word()
        elif c == "#" and word is None:
            break
        elif c in "&|;":
            end_word()
            i += 1 if line[i : i + 2] in ("&&", "||") else 0
            commands.append([])
        elif c in "<>":
            raise ValueError(f"a redirection or an unknown <placeholder> in {line!r}")
        elif c == "{" and re.match(r"\{[^{}\s]*\.\.[^{}\s]*\}", line[i:]):
            raise ValueError(f"an unquoted brace range (the shell would expand it before Hydra sees it) in {line!r}")
        else:
            add(c)
        i += 1
    if quote:
        raise ValueError(f"an unclosed {quote} in {line!r}")
    end_word()
    return [c for c in commands if c]


def document_commands(path: Path, values: dict[str, str], words: dict[str, str]) -> list[Command]:
    text = path.read_text()
    found = []
    for number, line in shell_lines(text):
        where = f"{path.name}:{number}"
        line = PLACEHOLDER.sub(lambda m, where=where: _placeholder(m, words, where), strip_comment(line))
        for name, value in words.items():
            if name.isupper():
                line = re.sub(rf"\b{name}\b", value, line)
        for command in split_line(line, values):
            found.append(Command(f"{path.relative_to(REPO)}:{number}", command))
    return found


def _placeholder(match: re.Match, words: dict[str, str], where: str) -> str:
    key = f"<{match.group(1)}>"
    if key not in words:
        raise ValueError(f"{where}: {key} has no test value: give it one in the test that reads it")
    return words[key]


def model_folders(commands: list[Command], models: str) -> dict[str, str]:
    """`--local-dir` → repo id of every `hf download` into `models`."""
    folders = {}
    for command in commands:
        if command.words[:2] == ["hf", "download"] and "--local-dir" in command.words:
            folder = command.words[command.words.index("--local-dir") + 1]
            if folder.startswith(models):
                folders[folder] = command.words[2]
    return folders


def write_config_only(folder: Path, repo: str) -> None:
    """The config files of `repo` (as capdiff.testing.hub has them), without weights: what check_config reads."""
    from transformers import CLIPConfig

    from capdiff.testing import hub

    def write(path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    if repo == hub.GPT2:
        write(folder / "config.json", hub.GPT2_CONFIG)
    elif repo == hub.CLIP:
        config = CLIPConfig(text_config=hub.CLIP_TEXT, vision_config=hub.CLIP_VISION, projection_dim=512)
        write(folder / "config.json", config.to_dict())
    elif repo == hub.SD_VAE:
        write(folder / "config.json", hub.VAE_CONFIG | {"_class_name": "AutoencoderKL"})
    elif repo == hub.SD15:
        write(folder / "model_index.json", hub.MODEL_INDEX)
        write(folder / "unet" / "config.json", hub.UNET_CONFIG | {"_class_name": "UNet2DConditionModel"})
        write(folder / "vae" / "config.json", hub.VAE_CONFIG | {"_class_name": "AutoencoderKL", "sample_size": 512})
    else:
        raise ValueError(f"hf download {repo}: no config-only copy for it in tests/doc_commands.py")


@dataclass
class Checker:
    """Checks commands; `root` holds every path a composed config names (`paths.*`)."""

    root: Path
    hub_ids_offline: bool = False  # docs/: a pretrained part named by hub id needs the network; composed only
    checked: list[str] = field(default_factory=list)

    def check(self, command: Command) -> None:
        words = list(command.words)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words.pop(0)  # environment for the command (HF_HUB_OFFLINE=1)
        program, args = words[0], words[1:]
        if program == "export" or program in EXTERNAL:
            return
        if program in PYTHONS:
            self.python(args)
        elif program == "torchrun":
            from torch.distributed.run import get_args_parser

            parsed = get_args_parser().parse_args(args)
            assert parsed.module, f"torchrun without -m: {command}"
            self.module(parsed.training_script, parsed.training_script_args)
        elif program in ("capdiff", ".venv/bin/capdiff"):
            self.module("capdiff.cli", args)
        elif program == "make":
            self.make(args)
        elif program == "hf":
            self.hf(args)
        elif program.startswith(".ci/"):
            assert (REPO / program).is_file(), f"{program} is not in the repository"
        else:
            raise AssertionError(f"no rule checks the program {program!r}: add one to tests/doc_commands.py")
        self.checked.append(str(command))

    def python(self, args: list[str]) -> None:
        if args[:1] == ["train.py"]:
            self.train(args[1:])
        elif args[:1] == ["evaluate.py"]:
            self.evaluate(args[1:])
        elif args[:1] == ["-m"]:
            self.module(args[1], args[2:])
        elif args and args[0].startswith("bench/"):
            self.bench(args[0], args[1:])
        else:
            raise AssertionError(f"no rule checks python {shlex.join(args)}")

    # ------------------------------------------------------------------ Hydra
    def compose(self, config: str, overrides: list[str]):
        from hydra import compose, initialize_config_dir
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from capdiff.config import register_resolvers

        register_resolvers()
        flags = [o for o in overrides if o.startswith("-")]
        assert set(flags) <= {"-m", "--multirun"}, f"{flags}: only -m is checked"
        chosen = []
        for override in OverridesParser.create().parse_overrides([o for o in overrides if o not in flags]):
            if override.is_sweep_override():
                chosen.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
            else:
                chosen.append(override.input_line)
        base = [
            f"paths.root_dir={self.root}",
            f"paths.output_dir={self.root / 'out'}",
            f"paths.work_dir={self.root}",
        ]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config, overrides=base + chosen, return_hydra_config=True)
        body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.resolve(body)
        return body

    def train(self, overrides: list[str]):
        import hydra

        from capdiff.models.hub import PretrainedNotFound
        from capdiff.train import check_config, instantiate_data

        cfg = self.compose("train", overrides)
        instantiate_data(cfg.data)
        if cfg.get("stage") != "autoencoder":
            try:
                check_config(cfg)
            except PretrainedNotFound:
                if not self.hub_ids_offline:
                    raise
                cls = hydra.utils.get_class(cfg.model._target_)
                cls.parse_config(OmegaConf.to_container(cfg.model, resolve=True))  # every key known
        return cfg

    def evaluate(self, overrides: list[str]):
        from capdiff.evaluate import fid_feature, settings_from

        cfg = self.compose("evaluate", overrides)
        assert cfg.ckpt_path, "evaluate.py needs ckpt_path"
        settings_from(cfg)
        fid_feature(cfg, shapes=False)
        return cfg

    # ------------------------------------------------------------ argparse
    def module(self, name: str, args: list[str]) -> None:
        if name.startswith("tests."):  # the test helpers that run as programs: they exist
            assert importlib.util.find_spec(name) is not None, f"-m {name}: no such module"
            return
        assert name.startswith("capdiff."), f"-m {name}: not a capdiff module"
        if name == "capdiff.cli":
            from capdiff.cli import build_parser

            parse(lambda a: build_parser().parse_args(a), args)
            return
        main = getattr(importlib.import_module(name), "main", None)
        assert main is not None, f"python -m {name}: the module has no main()"
        parse(main, args)

    def bench(self, script: str, args: list[str]) -> None:
        path = REPO / script
        assert path.is_file(), f"{script} is not in the repository"
        with _argv([script, *args]), _on_path(path.parent):
            parse(lambda _: runpy.run_path(str(path), run_name="__main__"), args)

    # --------------------------------------------------------------- others
    def make(self, args: list[str]) -> None:
        assignments = dict(a.split("=", 1) for a in args if "=" in a)
        targets = [a for a in args if "=" not in a]
        done = subprocess.run(
            ["make", "-n", *targets, *(f"{k}={v}" for k, v in assignments.items()), "UV_SOURCES="],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, f"make -n {shlex.join(args)}: {done.stderr}"
        extra = shlex.split(assignments.get("ARGS", ""))
        if "train" in targets:
            self.train(extra)
        for word in extra:
            if word.startswith("tests/"):
                assert (REPO / word.split("::")[0]).exists(), f"make {shlex.join(args)}: no {word}"

    def hf(self, args: list[str]) -> None:
        assert args[:1] == ["download"], f"hf {shlex.join(args)}: only `hf download` is checked"
        from capdiff.models.hub import is_hub_id

        assert is_hub_id(args[1]), f"hf download {args[1]}: not a hub id"
        options = set(re.findall(r"--[a-z][a-z-]+", hf_download_help()))
        unknown = [a for a in args if a.startswith("--") and a not in options]
        assert not unknown, f"hf download has no {unknown}"


@functools.cache
def hf_download_help() -> str:
    done = subprocess.run(
        [str(REPO / ".venv" / "bin" / "hf"), "download", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def parse(main, args: list[str]) -> None:
    """Run `main(args)` until its argument parser has parsed them; fail on a parse error (exit 2)."""
    parser = argparse.ArgumentParser
    originals = {name: getattr(parser, name) for name in ("parse_args", "parse_intermixed_args")}

    def stopping(name: str):
        def parse_then_stop(self, args=None, namespace=None):
            originals[name](self, args, namespace)
            raise Parsed

        return parse_then_stop

    for name in originals:  # either way a program parses its command line, nothing of it runs afterwards
        setattr(parser, name, stopping(name))
    try:
        main(args)
    except Parsed:
        return
    except SystemExit as err:
        if err.code not in (0, None):
            raise AssertionError(f"the arguments {args} did not parse (exit {err.code})") from None
        return
    finally:
        for name, method in originals.items():
            setattr(parser, name, method)
    raise AssertionError(f"{main} returned without parsing its arguments")


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved, sys.argv = sys.argv, argv
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
