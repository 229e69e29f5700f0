"""Every shell command of the README checked without running it (the rules, and the values given to its
placeholders, are in tests/doc_commands.py), and the files and folders the README names where the configs
put them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from tests.doc_commands import REPO, Checker, Command, document_commands, model_folders, write_config_only

README = REPO / "README.md"
# Stand-ins for the README's folders: replaced by real temporary ones when a command is checked.
VALUES = {"MODELS": "/@models", "DATA": "/@data"}
WORDS = {
    "<run>": "2026-01-01_00-00-00",
    "<date>": "2026-01-01",
    "<time>": "00-00-00",
    "<prompts.jsonl>": "/@root/prompts.jsonl",
    "CKPT": "model.ckpt",
}
COMMANDS = document_commands(README, VALUES, WORDS)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folders the README's commands name: $MODELS with a config-only copy of each downloaded repo."""
    root = tmp_path_factory.mktemp("readme")
    for folder, repo in model_folders(COMMANDS, VALUES["MODELS"]).items():
        write_config_only(Path(folder.replace(VALUES["MODELS"], str(root / "models"))), repo)
    (root / "prompts.jsonl").write_text('{"prompt": "a red circle"}\n')
    return root


def real(command: Command, root: Path) -> Command:
    places = {VALUES["MODELS"]: str(root / "models"), VALUES["DATA"]: str(root / "data"), "/@root": str(root)}

    def fill(word: str) -> str:
        for stand_in, path in places.items():
            word = word.replace(stand_in, path)
        return word

    return Command(command.source, [fill(w) for w in command.words])


def find(text: str) -> Command:
    return next(c for c in COMMANDS if any(text in w for w in c.words))


def test_the_readme_has_a_command_for_every_recipe() -> None:
    programs = {[*c.words, ""][1] for c in COMMANDS if c.words[0] in ("python", ".venv/bin/python")}
    assert {"train.py", "evaluate.py", "-m"} <= programs
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("command", COMMANDS, ids=[c.source for c in COMMANDS])
def test_every_readme_command_exists_with_its_arguments(command: Command, root: Path) -> None:
    Checker(root).check(real(command, root))


def test_recipe_2_trains_on_8_gpus_with_the_downloaded_parts_and_accumulation(root: Path) -> None:
    command = real(find("trainer.accumulate_grad_batches=4"), root)
    cfg = Checker(root).train(command.words[command.words.index("train.py") + 1 :])
    assert cfg.trainer.devices == 8 and cfg.trainer.strategy == "ddp" and cfg.trainer.accumulate_grad_batches == 4
    assert cfg.trainer.precision == "bf16-mixed"
    parts = [cfg.model[p].name_or_path for p in ("llm", "vision", "vae", "unet")]
    assert all(p.startswith(str(root / "models")) for p in parts), parts
    assert [s.get("weight") for s in cfg.data.sources] == [3, 1] and cfg.data.val_urls
    assert cfg.data.samples_per_epoch is None  # counted from the local shards


def test_recipe_3_sweeps_the_learning_rate_of_every_part(root: Path) -> None:
    command = real(find("hparams_search=joint_optuna"), root)
    overrides = command.words[command.words.index("train.py") + 1 :]
    cfg = Checker(root).train(overrides)
    assert cfg.logger.wandb and cfg.logger.csv and cfg.task_name == "joint_ddim"
    groups = cfg.model.optim.groups
    assert all(groups[p].get("lr") is None for p in groups)  # every part follows model.optim.lr


def test_the_run_files_the_readme_names_are_where_the_configs_put_them(tmp_path: Path) -> None:
    from tests.helpers import compose_config

    text = README.read_text()
    cfg = compose_config(tmp_path, [])
    logger = hydra.utils.instantiate(cfg.logger.csv, save_dir=str(tmp_path))
    csv = (Path(logger.log_dir) / "metrics.csv").relative_to(tmp_path).as_posix()
    assert f"`{csv}`" in text and csv == "csv/version_0/metrics.csv"
    with hydra.initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        run = hydra.compose("train", overrides=["experiment=joint_ddim"], return_hydra_config=True)
    sweep = OmegaConf.to_container(run.hydra.sweep)
    assert sweep == {
        "dir": "${paths.log_dir}/${task_name}/multiruns/${now:%Y-%m-%d_%H-%M-%S}",
        "subdir": "${hydra.job.num}",
    }
    assert run.task_name == "joint_ddim" and "`logs/joint_ddim/multiruns/<date>_<time>/<n>/`" in text


def test_the_inception_extra_installs_into_the_venv_with_the_constraints() -> None:
    line = next(re.finditer(r"`(make install EXTRAS=[\w,]*inception[\w,]*)`", README.read_text())).group(1)
    extras = line.split("=", 1)[1]
    done = subprocess.run(
        ["make", "-n", "install", f"EXTRAS={extras}", "UV_SOURCES="], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    plan = re.sub(r"\\\n\s*", " ", done.stdout)  # the recipe's continued lines joined
    installs = [c.strip() for c in re.split(r"&&|\|\||[;{}]", plan) if f'-e ".[{extras}]"' in c]
    assert [c.split()[0] for c in installs] == [".venv/bin/uv", ".venv/bin/python"]  # uv, then pip as fallback
    assert all("-c constraints.txt" in c for c in installs), installs
    assert f"touch .venv/.capdiff-installed-{extras.replace(',', '-')}" in done.stdout  # its own stamp
    default = re.search(r"^EXTRAS \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert set(default.split(",")) < set(extras.split(","))  # the default extras stay installed
