"""Config helpers shared by the task functions: extras, printing and saving the resolved config."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import rich
import rich.syntax
import rich.tree
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PRINT_ORDER = ("data", "model", "trainer", "callbacks", "logger", "paths", "extras")
# The first line of every Slurm job's script (conf/hydra/launcher/slurm.yaml): srun stops a job's other tasks
# when one exits with an error (`srun --kill-on-bad-exit`; capdiff.slurm.failing_the_step), so the other ranks
# of a failed rank do not wait for it.
KILL_BAD_EXIT = "export SLURM_KILL_BAD_EXIT=1"


def auto_precision(accelerator: str) -> str:
    """`trainer.precision` for an accelerator: bf16 mixed on a GPU that has bf16 (fp16 mixed on older ones),
    fp32 on the CPU (`auto`: the GPU when there is one)."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"


def register_resolvers() -> None:
    """Resolvers the configs use; registered before Hydra composes them (train.py, evaluate.py)."""
    if not OmegaConf.has_resolver("capdiff.precision"):
        OmegaConf.register_new_resolver("capdiff.precision", auto_precision)
    if not OmegaConf.has_resolver("capdiff.gpus_per_node"):
        # conf/hydra/launcher/slurm.yaml: a GPU per device on GPU trainers, none on CPU ones
        OmegaConf.register_new_resolver(
            "capdiff.gpus_per_node", lambda accelerator, devices: devices if accelerator in ("gpu", "cuda") else None
        )
    if not OmegaConf.has_resolver("capdiff.signal_delay"):
        # conf/hydra/launcher/slurm.yaml: how early Slurm signals before the time limit
        OmegaConf.register_new_resolver("capdiff.signal_delay", signal_delay)
    if not OmegaConf.has_resolver("capdiff.slurm_setup"):
        # conf/hydra/launcher/slurm.yaml: the job script's first lines
        OmegaConf.register_new_resolver("capdiff.slurm_setup", slurm_setup)
    if not OmegaConf.has_resolver("capdiff.shapes_tag"):
        # conf/data/synthetic.yaml: shapes with noisy training captions live in a folder of their own
        OmegaConf.register_new_resolver("capdiff.shapes_tag", _shapes_tag)


def signal_delay(timeout_min: int | float, chosen: int | float | None = None) -> int:
    """Seconds before the time limit Slurm signals a job: `chosen` (`slurm.signal_delay_s`), else 600 s or a
    tenth of the limit when that is shorter (a 10-minute test job gets 60 s). At or past the whole limit, the job
    would be signalled as it starts, and requeue itself for ever: refused with the fix."""
    limit = float(timeout_min) * 60
    delay = float(chosen) if chosen is not None else min(600.0, max(30.0, limit / 10))
    if delay >= limit:
        raise ValueError(
            f"slurm.signal_delay_s={delay:g} is not shorter than the job's time limit ({limit:g} s, "
            f"slurm.timeout_min={timeout_min}): the job would be signalled as it starts. Lower it, or raise "
            "slurm.timeout_min."
        )
    return int(delay)


def slurm_setup(lines: list[str] | None) -> list[str]:
    """The shell lines a Slurm job's script runs first: KILL_BAD_EXIT, then the user's `slurm.setup`."""
    return [KILL_BAD_EXIT, *(lines or [])]


def _shapes_tag(vague_fraction: float, wrong_fraction: float, holdout: bool = False) -> str:
    from capdiff.data.shapes import shapes_folder_tag  # the data package imports torch: only when composed

    return shapes_folder_tag(vague_fraction, wrong_fraction, holdout)


def is_multirun() -> bool:
    """Whether this process is a job of a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def command_line_overrides(task: list[str] | None = None) -> list | None:
    """The command-line overrides of this Hydra run (or `task`), parsed by Hydra's own grammar; None when the
    config was not composed by a Hydra run (`hydra.compose` in tests and notebooks)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if task is None:
        if not HydraConfig.initialized():
            return None
        task = list(HydraConfig.get().overrides.task)
    return OverridesParser.create().parse_overrides(list(task))


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config_tree(cfg)
    if extras.get("tf32") and torch.cuda.is_available():
        # TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer); bf16 autocast is unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def print_config_tree(cfg: DictConfig) -> None:
    """The resolved config as a tree, main groups first."""
    tree = rich.tree.Tree("config", style="dim")
    names = [n for n in PRINT_ORDER if n in cfg] + [n for n in cfg if n not in PRINT_ORDER]
    for name in names:
        branch = tree.add(str(name), style="bold")
        node = cfg[name]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


def save_resolved_config(cfg: DictConfig, folder: str | Path) -> Path:
    """Write `config.yaml` with every interpolation resolved: what this run really used."""
    path = Path(folder) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


register_resolvers()  # on import too, so configs composed without train.py / evaluate.py resolve
