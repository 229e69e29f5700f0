"""The task function behind `python evaluate.py`: a checkpoint's validation losses, then one evaluation pass
(`capdiff.evaluation.runner`) that captions the validation images and generates for their captions (or for
`eval.prompts`), and scores both. Everything lands in the run folder, with the settings that produced it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import RichProgressBar

from capdiff.checkpoints.portable import is_sharded_checkpoint, load_checkpoint, read_checkpoint, read_run
from capdiff.config import apply_extras, command_line_overrides, save_resolved_config
from capdiff.data.shapes import ShapesDataModule
from capdiff.evaluation.images import build_extractor, clip_score_metric, real_stats_key
from capdiff.evaluation.postprocessing import postprocess_from
from capdiff.evaluation.runner import EvalSettings, Evaluator
from capdiff.evaluation.shapes import PROBE_VERSION, load_probe, probe_folder
from capdiff.evaluation.validation import ValidationLosses
from capdiff.loggers import link_to_training, log_eval_tables, run_loggers
from capdiff.quiet import quiet_known_warnings
from capdiff.samplers import DEFAULT_SAMPLER, check_sampler
from capdiff.train import instantiate_data, prepare_datamodule

log = logging.getLogger(__name__)
VERSIONS = ("torch", "torchmetrics", "transformers", "diffusers", "pytorch-lightning")


def check_checkpoint(cfg: DictConfig) -> Path:
    if cfg.get("ckpt_path") is None:
        raise ValueError("ckpt_path is not set: run `python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt`.")
    path = Path(cfg.ckpt_path)
    if path.is_dir() and (path / "checkpoints" / "last.ckpt").exists():  # a run folder
        path = path / "checkpoints" / "last.ckpt"
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(
            f"ckpt_path={cfg.ckpt_path!r} does not exist; pass a checkpoint (<run>/checkpoints/last.ckpt: a file, or "
            "the folder FSDP writes)."
        )
    return path


# What the data is, as the model saw it in training: evaluation follows the checkpoint here.
INTRINSIC = ("image_size", "caption_key")


def explicit_data_keys() -> set[str] | None:
    """The `data.*` keys set on this command line (None when the config was not composed by a Hydra run)."""
    overrides = command_line_overrides()
    if overrides is None:
        return None
    return {o.key_or_group.split(".")[1] for o in overrides if o.key_or_group.startswith("data.")}


def follow_run(cfg: DictConfig, run: dict | None, image_size: int, explicit: set[str] | None) -> None:
    """Make `cfg.data` the data to evaluate on: with `data` left to follow the checkpoint (the default), the
    training run's own data config with every key set here replacing the run's; with a data source chosen
    (`data=webdataset`), that source, at the checkpoint's image size and caption key unless they are set.
    Refuses what contradicts the checkpoint, and training-only settings (latents)."""
    given = OmegaConf.to_container(cfg.data, resolve=False)
    if given.get("_target_") is None:
        if run is None:
            raise ValueError(
                f"ckpt_path={cfg.ckpt_path}: this checkpoint does not record the run that trained it (it predates "
                "capdiff's run records), so its data is unknown: choose it, e.g. `data=webdataset "
                "data.val_urls=<shards>` or `data=synthetic`."
            )
        data = dict(run["config"]["data"])
        for key, value in given.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = dict(data[key]) | {k: v for k, v in value.items() if v is not None}
            elif value is not None:
                data[key] = value
        explicit = {k for k, v in given.items() if v is not None and v != {} and not _all_none(v)}
        if "val_urls" in explicit and "_target_" not in explicit:
            # other shards: read as image-text shards (never written over as the built-in shapes would be),
            # without the run's training shards, which evaluation does not need
            data["_target_"] = "capdiff.data.ImageTextDataModule"
            data.pop("shapes", None)
        origin = "the run's"
    else:
        data = given
        if explicit is None:
            explicit = set(given)
        for key in INTRINSIC:
            if key not in explicit and run is not None and key in run["config"]["data"]:
                data[key] = run["config"]["data"][key]
        origin = "the chosen"
    for key in ("latents", "latents_dir"):
        if key in explicit and data.get(key):
            raise ValueError(
                f"data.{key}={data[key]}: evaluation captions and scores images, so it reads image shards, not "
                f"cached latents: drop data.{key} (data.val_urls names the image shards to evaluate on)."
            )
    data["latents"], data["latents_dir"] = False, None  # a run that trained on cached latents: its images
    # what training drew its captions from: evaluation reads the validation shards' references alone
    data["sources"], data["caption_mix"], data["captioner_caption_key"] = None, None, None
    if not str(data.get("_target_")).endswith("ShapesDataModule"):  # the shapes probe trains on the train split
        data["train_urls"], data["samples_per_epoch"] = None, None
    if "image_size" in explicit and int(data["image_size"]) != image_size:
        raise ValueError(
            f"data.image_size={data['image_size']} contradicts the checkpoint, trained at {image_size} px: drop "
            f"data.image_size (evaluation follows the checkpoint) or set data.image_size={image_size}."
        )
    data["image_size"] = image_size
    with open_dict(cfg):
        cfg.data = OmegaConf.create(data)
    log.info("evaluating on %s data: %s", origin, cfg.data.get("val_urls"))


def _all_none(value) -> bool:
    return isinstance(value, dict) and all(v is None or _all_none(v) for v in value.values())


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
        sampler=check_sampler(ev.get("sampler", DEFAULT_SAMPLER), "eval.sampler"),
        steps=int(ev.steps),
        eta=float(ev.eta),
        guidance_scales=[float(g) for g in scales],
        seed=int(ev.seed),
        batch_size=int(ev.batch_size),
        caption=caption,
        prompts=read_prompts(ev.prompts) if ev.get("prompts") else None,
        samples_per_prompt=samples_per_prompt(ev.get("samples_per_prompt", 1)),
    )


def samples_per_prompt(value) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"eval.samples_per_prompt={value!r} must be a positive integer (images per prompt).")
    return value


def fid_feature(cfg: DictConfig, shapes: bool) -> tuple[str | None, str | None]:
    """The feature space of FID/KID for `eval.fid.feature` (`auto`: the shapes probe on the built-in shapes,
    torchmetrics' Inception where torch-fidelity is installed, else none), and why FID/KID are skipped when
    they are."""
    feature = cfg.eval.fid.get("feature")
    if feature != "auto":
        return feature, None if feature else "eval.fid.feature=null"
    if shapes:
        return "probe", None
    if importlib.util.find_spec("torch_fidelity") is not None:
        return "inception", None
    return None, (
        "no feature network for these images: set eval.fid.feature=clip eval.fid.name_or_path=<a CLIP, e.g. "
        "openai/clip-vit-base-patch16> (or dinov2 with a DINOv2), or eval.fid.feature=inception after "
        "`make install EXTRAS=dev,slurm,sweep,demo,inception`"
    )


def build_evaluator(
    cfg: DictConfig, model: torch.nn.Module, datamodule, settings: EvalSettings, feature: str | None
) -> Evaluator:
    ev = cfg.eval
    shapes = isinstance(datamodule, ShapesDataModule)

    def probe():
        if not shapes:
            raise ValueError(
                "eval.fid.feature=probe needs the built-in shapes data (data=synthetic); for other data use "
                "eval.fid.feature=inception, or clip/dinov2 with eval.fid.name_or_path."
            )
        folder = probe_folder(cfg.paths.data_dir, datamodule)
        return load_probe(datamodule.shapes_train_urls, datamodule.val_urls, folder)[0]

    extractor = real_cache = None
    if feature and model.can_generate:
        extractor = build_extractor(feature, ev.fid.get("name_or_path"), ev.fid.get("weights_path"), probe)
        identity = ev.fid.get("name_or_path") or ev.fid.get("weights_path") or f"{feature}-v{PROBE_VERSION}"
        key = real_stats_key(
            datamodule.val_urls, "val", feature, str(identity), datamodule.image_size, settings.num_samples or -1,
            getattr(datamodule, "written_as", None),
        )  # fmt: skip
        real_cache = (Path(cfg.paths.data_dir) / "real_features", key)
    clip = clip_score_metric(ev.clip.name_or_path) if ev.clip.get("name_or_path") else None
    return Evaluator(
        model,
        settings,
        cfg.paths.output_dir,
        extractor=extractor,
        feature=feature,
        real_cache=real_cache,
        probe=probe() if (ev.get("probe") and shapes and model.can_generate) else None,
        clip_score=clip,
        kid_subset_size=int(ev.fid.get("kid_subset_size", 1000)),
        judge=load_checkpoint(ev.judge)[0] if ev.get("judge") else None,
    )


def evaluate(cfg: DictConfig) -> dict:
    """Writes `metrics.json` (`{"metrics": ..., "settings": ...}`) in the run folder and returns the metrics."""
    quiet_known_warnings()
    apply_extras(cfg)
    path = check_checkpoint(cfg)
    settings = settings_from(cfg)  # a bad prompts file fails here, before any work
    checkpoint = read_checkpoint(path)  # memory-mapped: the run record and hyperparameters, no weights read
    diffusion = checkpoint["hyper_parameters"].get("diffusion") or {}
    check_sampler(settings.sampler, "eval.sampler", bool(diffusion.get("zero_terminal_snr")))  # this model's
    run = read_run(checkpoint)
    follow_run(cfg, run, int(checkpoint["hyper_parameters"].get("image_size", 32)), explicit_data_keys())
    link_to_training(cfg, (run or {}).get("wandb"))
    out_dir = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, out_dir)
    datamodule = instantiate_data(cfg.data)
    if not datamodule.val_urls:
        raise ValueError(
            "data.val_urls is not set (nor recorded in the checkpoint's run): evaluation needs validation shards, "
            "e.g. data.val_urls='/data/val-{000..003}.tar'."
        )
    datamodule = prepare_datamodule(datamodule)
    settings.postprocess = postprocess_from(cfg, datamodule)  # a bad step fails here, before the model loads
    feature, skipped = fid_feature(cfg, isinstance(datamodule, ShapesDataModule))
    if skipped and cfg.eval.fid.get("feature"):
        log.warning("FID/KID are skipped: %s.", skipped)
    model, used_ema = load_checkpoint(path, ema=cfg.eval.get("ema"), checkpoint=checkpoint)
    with run_loggers(cfg) as loggers:
        bar = RichProgressBar(leave=True)
        trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[bar])
        (losses,) = trainer.validate(ValidationLosses(model), datamodule=datamodule)
        evaluator = build_evaluator(cfg, model, datamodule, settings, feature)
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
                "sampler": settings.sampler,
                "steps": settings.steps,
                "eta": settings.eta,
                "guidance_scales": settings.guidance_scales,
                "seed": settings.seed,
                "caption": settings.caption,
                "fid_feature": feature,
                "skipped": {"fid_kid": skipped} if skipped else {},
                "not_applicable": evaluator.not_applicable,
                "postprocess": settings.postprocess.name if settings.postprocess is not None else None,
                "judge": cfg.eval.get("judge"),
                "samples_per_prompt": settings.samples_per_prompt,
                "data": OmegaConf.to_container(cfg.data, resolve=True),
                "training_run": (run or {}).get("output_dir"),
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
