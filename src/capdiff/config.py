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


def register_resolvers() -> None:
    """Resolvers the configs use; registered before Hydra composes them (train.py, evaluate.py)."""
    if not OmegaConf.has_resolver("capdiff.gpus_per_node"):
        # conf/hydra/launcher/slurm.yaml: a GPU per device on GPU trainers, none on CPU ones
        OmegaConf.register_new_resolver(
            "capdiff.gpus_per_node", lambda accelerator, devices: devices if accelerator in ("gpu", "cuda") else None
        )


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
