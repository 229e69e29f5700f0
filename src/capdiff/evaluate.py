"""The task function behind `python evaluate.py`: a checkpoint's validation losses, then one evaluation pass
(`capdiff.evaluation.runner`) that captions the validation images and generates for their captions (or for
`eval.prompts`), and scores both. Everything lands in the run folder, with the settings that produced it."""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from capdiff.callbacks import load_checkpoint
from capdiff.config import apply_extras, save_resolved_config
from capdiff.data.shapes import ShapesDataModule
from capdiff.evaluation.images import build_extractor, clip_score_metric, real_stats_key
from capdiff.evaluation.runner import EvalSettings, Evaluator
from capdiff.evaluation.shapes import PROBE_VERSION, load_probe, probe_folder
from capdiff.loggers import log_eval_tables, run_loggers
from capdiff.module import JointModule
from capdiff.train import build_datamodule

log = logging.getLogger(__name__)
VERSIONS = ("torch", "torchmetrics", "transformers", "diffusers", "pytorch-lightning")


def check_checkpoint(cfg: DictConfig) -> Path:
    if cfg.get("ckpt_path") is None:
        raise ValueError("ckpt_path is not set: run `python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt`.")
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist; pass a checkpoint file.")
    return path


def read_prompts(path: str) -> list[str]:
    prompts = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f'eval.prompts={path}: line {number} is not a JSON object with a "prompt" ({err}).'
                ) from None
    if not prompts:
        raise ValueError(f'eval.prompts={path} has no prompts; write one {{"prompt": "..."}} per line.')
    return prompts


def settings_from(cfg: DictConfig) -> EvalSettings:
    ev = cfg.eval
    scales = list(ev.guidance_scales) if ev.get("guidance_scales") else [float(ev.guidance_scale)]
    caption = {k: v for k, v in OmegaConf.to_container(ev.caption, resolve=True).items() if v is not None}
    return EvalSettings(
        num_samples=ev.num_samples,
        steps=int(ev.steps),
        eta=float(ev.eta),
        guidance_scales=[float(g) for g in scales],
        seed=int(ev.seed),
        batch_size=int(ev.batch_size),
        caption=caption,
        prompts=read_prompts(ev.prompts) if ev.get("prompts") else None,
    )


def build_evaluator(cfg: DictConfig, model: JointModule, datamodule, settings: EvalSettings) -> Evaluator:
    ev = cfg.eval
    shapes = isinstance(datamodule, ShapesDataModule)
    folder = probe_folder(cfg.paths.data_dir, datamodule)

    def probe():
        if not shapes:
            raise ValueError(
                "eval.fid.feature=probe needs the built-in shapes data (data=synthetic); for other data use "
                "eval.fid.feature=inception, or clip/dinov2 with eval.fid.name_or_path."
            )
        return load_probe(datamodule.train_urls, datamodule.val_urls, folder)[0]

    feature = ev.fid.get("feature")
    extractor = real_cache = None
    if feature and model.diffusion is not None:
        extractor = build_extractor(feature, ev.fid.get("name_or_path"), ev.fid.get("weights_path"), probe)
        identity = ev.fid.get("name_or_path") or ev.fid.get("weights_path") or f"{feature}-v{PROBE_VERSION}"
        key = real_stats_key(
            datamodule.val_urls, "val", feature, str(identity), datamodule.image_size, settings.num_samples or -1
        )
        real_cache = (Path(cfg.paths.data_dir) / "real_features", key)
    clip = clip_score_metric(ev.clip.name_or_path) if ev.clip.get("name_or_path") else None
    return Evaluator(
        model,
        settings,
        cfg.paths.output_dir,
        extractor=extractor,
        feature=feature,
        real_cache=real_cache,
        probe=probe() if (ev.get("probe") and shapes and model.diffusion is not None) else None,
        clip_score=clip,
        kid_subset_size=int(ev.fid.get("kid_subset_size", 1000)),
    )


def evaluate(cfg: DictConfig) -> dict:
    """Writes `metrics.json` (`{"metrics": ..., "settings": ...}`) in the run folder and returns the metrics."""
    apply_extras(cfg)
    path = check_checkpoint(cfg)
    out_dir = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, out_dir)
    settings = settings_from(cfg)  # a bad prompts file fails here, before any work
    datamodule = build_datamodule(cfg)
    if not datamodule.val_urls:
        raise ValueError("data.val_urls is not set: evaluation needs validation shards.")
    model, used_ema = load_checkpoint(path, ema=cfg.eval.get("ema"))
    with run_loggers(cfg) as loggers:
        trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
        (losses,) = trainer.validate(model, datamodule=datamodule)
        evaluator = build_evaluator(cfg, model, datamodule, settings)
        model.eval()
        trainer.test(evaluator, datamodule=datamodule)
        metrics = {k: float(v) for k, v in losses.items()} | evaluator.metrics
        report = {
            "metrics": metrics,
            "settings": {
                "checkpoint": str(path),
                "ema": used_ema,
                "num_samples": settings.num_samples,
                "prompts": cfg.eval.get("prompts") or "validation captions",
                "steps": settings.steps,
                "eta": settings.eta,
                "guidance_scales": settings.guidance_scales,
                "seed": settings.seed,
                "caption": settings.caption,
                "fid_feature": cfg.eval.fid.get("feature"),
                "fid_feature_model": cfg.eval.fid.get("name_or_path"),
                "clip_model": cfg.eval.clip.get("name_or_path"),
                "devices": trainer.world_size,
                "versions": {name: importlib.metadata.version(name) for name in VERSIONS},
            },
        }
        if trainer.is_global_zero:
            (out_dir / "metrics.json").write_text(json.dumps(report, indent=1))
            if len(settings.guidance_scales) > 1:
                write_guidance_curve(metrics["guidance_sweep"], out_dir)
            log.info("metrics written to %s", out_dir / "metrics.json")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        grids = sorted(str(p) for p in out_dir.glob("grid_g*.png"))
        for logger in loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in numeric.items()})
            if grids and hasattr(logger, "log_image"):
                logger.log_image(key="eval/samples", images=grids, caption=[Path(g).stem for g in grids])
        if trainer.is_global_zero:
            log_eval_tables(loggers, numeric, out_dir / "samples")
    return metrics


def write_guidance_curve(sweep: list[dict], out_dir: Path) -> None:
    """FID (or FD) against prompt faithfulness (probe accuracy, else CLIP score) over the guidance scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = sweep[0]
    x_name = next((k for k in first if k.startswith(("fid_", "fd_"))), None)
    y_name = next((k for k in ("probe_attr/mean", "clip_score", "capdiff_image_text_score") if k in first), None)
    columns = ["guidance_scale"] + [k for k in first if k != "guidance_scale"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{row.get(c, float('nan')):.4g}" for c in columns) + " |" for row in sweep]
    (out_dir / "guidance_sweep.md").write_text("\n".join(lines) + "\n")
    if x_name is None or y_name is None:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r[x_name] for r in sweep], [r[y_name] for r in sweep], marker="o")
    for row in sweep:
        ax.annotate(
            f"w={row['guidance_scale']:g}", (row[x_name], row[y_name]), textcoords="offset points", xytext=(4, 4)
        )
    ax.set_xlabel(f"{x_name} (lower is better)")
    ax.set_ylabel(f"{y_name} (higher is better)")
    ax.set_title("classifier-free guidance sweep")
    fig.tight_layout()
    fig.savefig(out_dir / "guidance_curve.png", dpi=120)
    plt.close(fig)
