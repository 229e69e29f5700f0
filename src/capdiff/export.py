"""Export a checkpoint to a folder of standard sub-folders: `python -m capdiff.export <ckpt> <folder>`.

    <folder>/unet/          diffusers UNet2DConditionModel   (UNet2DConditionModel.from_pretrained(folder/unet))
    <folder>/vae/           diffusers AutoencoderKL
    <folder>/llm/           transformers causal LM + its tokenizer (AutoModelForCausalLM / AutoTokenizer)
    <folder>/vision/        transformers CLIPVisionModel (the tower), when the model has a captioner
    <folder>/heads.safetensors   capdiff's own weights: resampler, grid/layout tokens, connector, projections
    <folder>/capdiff.json   the hyperparameters, pointing at the sub-folders

LoRA adapters are merged into the exported weights; EMA weights (when the checkpoint has them) replace the live
ones unless `--no-ema`. `capdiff.pipeline.Pipeline.from_pretrained(folder)` loads it.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from capdiff.checkpoints.portable import load_checkpoint, model_config
from capdiff.joint.model import JointModel
from capdiff.joint.spec import as_dict

FORMAT = 1
PARTS = {"llm": "llm.lm.", "vision": "vision.tower.", "unet": "diffusion.unet.", "vae": "diffusion.vae."}


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with its peft LoRA layers merged into plain weights: each LoRA-wrapped layer is
    replaced by its base layer holding W + BA, so the model keeps its own class and config (a diffusers UNet
    and a transformers LM alike) and saves with its own `save_pretrained`.

    This is what peft's `merge_and_unload` does layer by layer (peft's own `merge` and `get_base_layer`), but
    `merge_and_unload` is a method of peft's model wrapper, which capdiff does not keep: it injects LoRA in
    place (`capdiff.models.lora`) so that each part keeps its class and its parameter names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    return model


SUBFOLDER_KEYS = (("llm", "name_or_path"), ("llm", "tokenizer"), ("vision", "name_or_path"), ("unet", "name_or_path"))
SUBFOLDER_KEYS += (("vae", "name_or_path"),)


def export(model: JointModel, folder: str | Path) -> Path:
    """Write the model to `folder` (layout in the module docstring); sub-folder paths are stored relative."""
    if not isinstance(model, JointModel):
        raise ValueError(
            f"export writes a joint model's standard sub-folders; a {type(model).__name__} has none of them: use "
            "its checkpoint as it is (Pipeline.from_checkpoint, capdiff generate --ckpt)."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hparams = as_dict(model.spec)
    merged(model.llm.lm).save_pretrained(folder / "llm")
    model.llm.tokenizer.save_pretrained(folder / "llm")
    hparams["llm"] = dict(hparams["llm"]) | {"name_or_path": "llm", "tokenizer": "llm", "lora": {}}
    if model.vision is not None:
        merged(model.vision.tower).save_pretrained(folder / "vision")
        hparams["vision"] = dict(hparams.get("vision") or {}) | {"name_or_path": "vision", "lora": {}}
    if model.diffusion is not None:
        merged(model.diffusion.unet).save_pretrained(folder / "unet")
        model.diffusion.vae.save_pretrained(folder / "vae")
        hparams["unet"] = dict(hparams["unet"]) | {"name_or_path": "unet", "lora": {}}
        hparams["vae"] = dict(hparams["vae"]) | {"name_or_path": "vae"}
    heads = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(tuple(PARTS.values())) and "lora_" not in k
    }
    save_file(heads, folder / "heads.safetensors")
    (folder / "capdiff.json").write_text(json.dumps({"format": FORMAT, "hparams": hparams}, indent=1))
    return folder


def load_exported(folder: str | Path) -> JointModel:
    """The JointModel from an export folder (sub-folders by the standard loaders, then capdiff's heads)."""
    folder = Path(folder).resolve()
    spec_file = folder / "capdiff.json"
    if not spec_file.is_file():
        raise FileNotFoundError(
            f"{folder} is not a capdiff export (no capdiff.json); make one with `python -m capdiff.export`."
        )
    spec = json.loads(spec_file.read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{spec_file}: format {spec.get('format')} is not the supported format {FORMAT}.")
    hparams = model_config(spec["hparams"])  # exports before capdiff 0.2 carry the training settings too
    for part, key in SUBFOLDER_KEYS:
        if (hparams.get(part) or {}).get(key):
            hparams[part][key] = str(folder / hparams[part][key])
    model = JointModel.from_config(hparams)
    heads = load_file(folder / "heads.safetensors")
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(PARTS.values()))]
    if missing or unexpected:
        raise ValueError(f"{folder}/heads.safetensors does not fit the model: missing {missing}, extra {unexpected}")
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capdiff.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt written by train.py")
    parser.add_argument("folder", help="where to write the export")
    parser.add_argument("--no-ema", action="store_true", help="export the live weights, not the EMA average")
    args = parser.parse_args(argv)
    model, _ = load_checkpoint(args.checkpoint, ema=not args.no_ema)
    print(f"exported to {export(model, args.folder)}")


if __name__ == "__main__":
    main()
