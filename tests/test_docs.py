"""The documentation holds only what the repository has: its links resolve, the config keys it names exist, its
commands are checked as the README's are (tests/doc_commands.py), `make bench` runs what docs/benchmarks.md
lists, and no file cites a document from outside the repository."""

from __future__ import annotations

import itertools
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.doc_commands import PLACEHOLDER, REPO, Checker, Command, document_commands, split_line

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
VALUES = {"MODELS": "/models", "DATA": "/data"}
WORDS = {"<run>": "2026-01-01_00-00-00", "<date>": "2026-01-01", "<time>": "00-00-00"}
COMMANDS = [c for doc in DOCS[1:] for c in document_commands(doc, VALUES, WORDS)]
CONFIGS = sorted((REPO / "conf").rglob("*.yaml"))
NOT_KEYS = {"trainer.global_step"}  # Lightning's step counter, which the docs name as a metric axis
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Documents of the place this project was written in, which the repository does not hold.
OUTSIDE = re.compile("|".join(["DESIGN" + r"(\.md| §)", "STYLE" + r"\.md", r"\.\./" + "shared", "/work" + "/"]))


def project_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    return [REPO / f for f in listed if (REPO / f).is_file()]


def test_no_file_cites_a_document_from_outside_the_repository() -> None:
    citing = []
    for path in project_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # images, checkpoints
        citing += [f"{path.relative_to(REPO)}: {m.group()}" for m in OUTSIDE.finditer(text)]
    assert not citing


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_relative_link_points_to_a_file_and_heading_that_exist(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists() or (anchor and (path.suffix != ".md" or anchor not in anchors(path))):
            broken.append(target)
    assert not broken, f"{doc.name}: {broken}"


@pytest.mark.parametrize("command", COMMANDS, ids=[c.source for c in COMMANDS])
def test_every_docs_command_exists_with_its_arguments(command: Command, tmp_path: Path) -> None:
    Checker(tmp_path, hub_ids_offline=True).check(command)


def comment_commands(path: Path) -> list[Command]:
    """The `python …` commands of a config file's comments: in backticks, or a comment line of its own
    (continued by a trailing `\\`)."""
    found, pending, start = [], "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        comment = line.partition("# ")[2] if "#" in line else ""
        if pending:
            pending, text = "", pending + comment
        elif comment.startswith("python "):
            start, text = number, comment
        else:
            found += [(number, span) for span in re.findall(r"`(python [^`]+)`", comment)]
            continue
        if text.rstrip().endswith("\\"):
            pending = text.rstrip()[:-1] + " "
        else:
            found.append((start, text))
    where = path.relative_to(REPO)
    return [
        Command(f"{where}:{number}", words)
        for number, text in found
        for words in split_line(PLACEHOLDER.sub(lambda m: CONFIG_WORDS.get(m.group(), m.group()), text), VALUES)
    ]


CONFIG_WORDS = {"<file>": "model.ckpt", "<name>": "smoke"}
CONFIG_COMMANDS = [c for path in CONFIGS for c in comment_commands(path)]


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=[c.source for c in CONFIG_COMMANDS])
def test_every_command_in_a_config_comment_exists_with_its_arguments(command: Command, tmp_path: Path) -> None:
    Checker(tmp_path, hub_ids_offline=True).check(command)


@cache
def composed() -> list:
    """Configs that between them hold every key the documentation may name."""
    from hydra import compose, initialize_config_dir

    from capdiff.config import register_resolvers

    register_resolvers()
    variants = [
        ("train", []),
        ("train", ["experiment=joint_ddim", "trainer=fsdp", "logger=many", "hydra/launcher=slurm"]),
        ("train", ["hparams_search=joint_optuna"]),
        ("train", ["experiment=text_gan"]),
        ("evaluate", []),
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return [compose(name, overrides=o, return_hydra_config=True) for name, o in variants]


def named_keys(doc: Path) -> set[str]:
    """Config keys in the document's inline code (`model.optim.lr`, `data.{num_workers,pin_memory}=…`),
    braces expanded; keys with a placeholder (`model.<part>.freeze`) or an ellipsis are left out."""
    roots = "model|data|trainer|callbacks|logger|eval|paths|extras|hydra"
    keys = set()
    for span in re.findall(r"`([^`\n]+)`", doc.read_text()):
        for word in span.split():
            key = word.split("=", 1)[0].strip("\"'")
            if not re.fullmatch(rf"(?:{roots})\.[\w.{{}},]+", key) or key.endswith((".", ".py")) or key in NOT_KEYS:
                continue
            parts = re.split(r"\{([\w,]+)\}", key)
            choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
            keys |= {"".join(c) for c in itertools.product(*choices)}
    return keys


def has(cfg, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=KeyError, throw_on_missing=False) is not KeyError


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_config_key_the_documentation_names_exists(doc: Path) -> None:
    missing = sorted(k for k in named_keys(doc) if not any(has(c, k) for c in composed()))
    assert not missing, f"{doc.name} names keys no config has: {missing}"


def test_make_bench_runs_the_benchmarks_docs_benchmarks_md_lists() -> None:
    table = re.findall(r"^\| [^|]* \| `python bench/(\w+)\.py", (REPO / "docs" / "benchmarks.md").read_text(), re.M)
    listed = re.search(r"^BENCHMARKS := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    assert sorted(listed) == sorted(set(table) - {"fullsize"})  # fullsize: its own target, bench-fullsize
    plan = subprocess.run(["make", "-n", "bench", "bench-fullsize", "UV_SOURCES="], cwd=REPO, capture_output=True,
                          text=True).stdout  # fmt: skip
    assert all((REPO / "bench" / f"{name}.py").is_file() for name in listed) and "bench/fullsize.py" in plan
