"""The joint model and its LightningModule: parts, trainable parameters, config and dimension checks, the
optimizer and its schedule, and that it learns."""

from __future__ import annotations

import itertools
import math

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from capdiff.joint import JointModel, JointModule
from capdiff.joint.spec import Optim, parse
from capdiff.models.contrastive import LogitScale
from capdiff.train import build_datamodule, build_model, check_config, train
from capdiff.training.optimization import build_optimizer, param_groups, warmup_cosine
from tests.helpers import REPO


def build_module(cfg) -> tuple[JointModule, dict]:
    datamodule = build_datamodule(cfg)
    module = build_model(cfg, datamodule)
    batch = next(iter(datamodule.val_dataloader()))
    return module, batch


def build(cfg) -> tuple[JointModel, dict]:
    """The plain model as training builds it (its freezing policy applied) and a validation batch."""
    module, batch = build_module(cfg)
    return module.model, batch


def trainable(model: torch.nn.Module, prefix: str) -> set[str]:
    return {n for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad}


def test_the_joint_model_computes_every_term_and_their_weighted_sum(smoke_cfg) -> None:
    model, batch = build(smoke_cfg())
    out = model.losses(batch, "train")
    assert set(out) == {"diffusion_loss", "caption_loss", "contrastive_loss", "loss"}
    expected = out["diffusion_loss"] + out["caption_loss"] + 0.1 * out["contrastive_loss"]
    torch.testing.assert_close(out["loss"], expected)


def test_lora_leaves_only_adapters_trainable_and_freezing_freezes(smoke_cfg) -> None:
    cfg = smoke_cfg("model.llm.lora.enabled=true", "model.unet.lora.enabled=true", "model.vision.freeze=true")
    model, batch = build(cfg)
    llm = trainable(model, "llm.")
    assert llm and all("lora_" in n for n in llm)
    unet = trainable(model, "diffusion.unet.")
    assert unet and all("lora_" in n for n in unet)
    assert not trainable(model, "vision.tower.")
    assert trainable(model, "vision.resampler.")  # the resampler always trains
    assert not trainable(model, "diffusion.vae.")  # the first stage is frozen
    out = model.losses(batch, "train")
    out["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and n.startswith("llm."))


def test_unknown_lora_targets_name_the_key(smoke_cfg) -> None:
    with pytest.raises(ValueError, match=r"model.llm.lora.target_modules: \['q_proj'\] match no module"):
        build(smoke_cfg("model.llm.lora.enabled=true", "model.llm.lora.target_modules=[q_proj]"))


def test_a_zero_weight_term_is_not_computed_and_its_parts_get_no_optimizer_state(smoke_cfg) -> None:
    model, batch = build(smoke_cfg("model.loss.weights.diffusion=0", "model.loss.weights.contrastive=0"))
    assert model.diffusion is None and model.conditioner is None and model.logit_scale is None
    assert set(model.losses(batch, "train")) == {"caption_loss", "loss"}
    assert not trainable(model, "vision.to_embed")
    assert set(param_groups(model)) == {"llm", "vision", "heads"}

    model, batch = build(smoke_cfg("model.loss.weights.caption=0", "model.loss.weights.contrastive=0"))
    assert model.vision is None and model.logit_scale is None
    assert set(model.losses(batch, "train")) == {"diffusion_loss", "loss"}
    assert not trainable(model, "conditioner.to_embed")
    grouped = {n for named in param_groups(model).values() for n, _ in named}
    assert grouped == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("conditioner.to_embed") for n in grouped)


def test_without_diffusion_grad_the_diffusion_loss_trains_the_connector_but_not_the_llm(smoke_cfg) -> None:
    model, batch = build(smoke_cfg("model.conditioner.diffusion_grad=false"))
    model.losses(batch, "train")["diffusion_loss"].backward()
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is not None for p in model.conditioner.connector.parameters())
    assert trainable(model, "llm.")  # the captioner and contrastive losses still train it

    # experiment=diffusion_only laid over the smoke sizes (composing it alone would build the default's data)
    diffusion_only = OmegaConf.load(REPO / "conf" / "experiment" / "diffusion_only.yaml")
    model, _ = build(OmegaConf.merge(smoke_cfg(), diffusion_only))
    assert not trainable(model, "llm.")  # nothing trains it: no optimizer state, no DDP sync
    assert "llm" not in param_groups(model)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.unet.config.in_channels=3", r"model.unet.config.in_channels=3 but the VAE .* 4-channel latents"),
        ("+model.unet.config.sample_size=8", None),  # a from-scratch UNet follows the image size
        ("model.conditioner.out_dim=64", r"model.conditioner.out_dim=64 but the UNet's cross_attention_dim is 32"),
        ("model.conditioner.in_dim=48", r"model.conditioner.in_dim=48 but the LLM \(model.llm\) has hidden size 32"),
    ],
)
def test_dimension_mismatches_fail_at_construction_naming_both_keys(smoke_cfg, override: str, message: str) -> None:
    cfg = smoke_cfg(override)
    if message is None:
        model, _ = build(cfg)
        assert model.diffusion.unet.config.sample_size == model.diffusion.latent_size == 16
        return
    with pytest.raises(ValueError, match=message):
        check_config(cfg)  # before any work
    with pytest.raises(ValueError, match=message):
        build(cfg)


def test_a_few_steps_on_one_batch_lower_every_term(smoke_cfg) -> None:
    torch.manual_seed(0)
    model, batch = build(smoke_cfg("model.caption_dropout=0"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = {k: v.item() for k, v in model.losses(batch, "val").items()}
    for _ in range(40):
        loss = model.losses(batch, "train")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = {k: v.item() for k, v in model.losses(batch, "val").items()}
    # The v-prediction loss (the default) keeps the high-noise steps, where the image must come from the caption
    # alone; it falls slower than the other terms (40 steps: about 0.85×).
    limits = {"caption_loss": 0.8, "contrastive_loss": 0.8, "diffusion_loss": 0.9}
    for term, limit in limits.items():
        assert last[term] < limit * first[term], (term, first[term], last[term])


def test_a_misspelt_key_fails_before_anything_is_built_and_names_the_valid_ones(smoke_cfg) -> None:
    cfg = smoke_cfg("+model.loss.weights.captions=1")
    misspelt = r"model.loss.weights.captions is not a key of model.loss.weights: the valid ones are diffusion, "
    with pytest.raises(ValueError, match=misspelt + "caption, contrastive"):
        check_config(cfg)  # what train.py runs before any shard, tokenizer or autoencoder is touched
    with pytest.raises(ValueError, match=misspelt):
        build(cfg)
    with pytest.raises(ValueError, match=r"model.llm.max_tokens: Value 'many'"):
        JointModel.from_config({"llm": {"max_tokens": "many"}})
    with pytest.raises(ValueError, match=r"model.optim.lrr is not a key of model.optim: the valid ones are lr, "):
        build(smoke_cfg("+model.optim.lrr=0.1"))
    with pytest.raises(ValueError, match=r"model.optim.groups: \['unets'\] are not parts; the parts are llm"):
        build_module(smoke_cfg("+model.optim.groups.unets.lr=0.1"))[0].configure_optimizers()


def test_the_schedule_reads_a_lazy_length_once_and_only_when_the_decay_starts() -> None:
    calls = []

    def length() -> int:
        calls.append(1)
        return 50

    lazy, fixed = warmup_cosine(10, length, 0.1), warmup_cosine(10, 50, 0.1)
    assert [lazy(step) for step in range(11)] == [fixed(step) for step in range(11)] and not calls
    assert [lazy(step) for step in range(11, 60)] == [fixed(step) for step in range(11, 60)] and len(calls) == 1
    assert fixed(50) == pytest.approx(0.1) and fixed(10) == 1.0


def test_the_schedule_warms_up_then_decays_to_its_floor_at_the_runs_last_step(smoke_cfg) -> None:
    from types import SimpleNamespace

    model, _ = build(smoke_cfg())
    trainer = SimpleNamespace(estimated_stepping_batches=50, precision_plugin=SimpleNamespace())
    optim = parse(Optim, {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1, "groups": {"unet": {"lr": 2.0}}}, "o")
    configured = build_optimizer(model, optim, trainer)
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(51):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert lrs[4]["llm"] == pytest.approx(0.5) and lrs[4]["unet"] == pytest.approx(1.0)  # linear warm-up
    assert lrs[10]["llm"] == pytest.approx(1.0) and lrs[10]["unet"] == pytest.approx(2.0)
    assert all(a["llm"] >= b["llm"] for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[30]["llm"] == pytest.approx(0.55)  # half-way down the cosine to the floor
    assert lrs[50]["llm"] == pytest.approx(0.1) and lrs[50]["unet_no_decay"] == pytest.approx(0.2)


class Watch(pl.Callback):
    """Training mode of the parts at every training batch; the logit scale's gradient and value around each
    optimizer step; the UNet's output dtype while sampling (sample grids, periodic evaluation)."""

    def __init__(self) -> None:
        self.modes: list[dict[str, bool]] = []
        self.scale: list[tuple[float, float]] = []
        self.sampling_dtypes: set[torch.dtype] = set()
        self._grad = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        generate, sampling = model.generate, {"on": False}

        def watched(*args, **kwargs):
            sampling["on"] = True
            try:
                return generate(*args, **kwargs)
            finally:
                sampling["on"] = False

        def record(module, args, output) -> None:
            if sampling["on"]:
                self.sampling_dtypes.add(output.sample.dtype)

        model.generate = watched
        model.diffusion.unet.register_forward_hook(record)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = pl_module.model
        parts = {"llm": model.llm.lm, "unet": model.diffusion.unet, "vae": model.diffusion.vae}
        if model.vision is not None:
            parts["tower"] = model.vision.tower
        modes = {name: part.training for name, part in parts.items()}
        for name in ("llm", "tower"):
            dropouts = [m for m in parts.get(name, torch.nn.Module()).modules() if isinstance(m, torch.nn.Dropout)]
            modes[f"{name}_dropout"] = any(m.training for m in dropouts)
        self.modes.append(modes)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if pl_module.model.logit_scale is not None:
            self._grad = float(pl_module.model.logit_scale.log_scale.grad or 0.0)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.model.logit_scale is not None:
            self.scale.append((self._grad, float(pl_module.model.logit_scale.log_scale)))


def test_the_logit_scale_keeps_its_gradient_at_the_bound_and_is_clamped_after_each_step(smoke_cfg) -> None:
    scale = LogitScale(init_temperature=0.005, max_scale=100.0)  # ln(200), above the bound
    scale().backward()
    assert scale.log_scale.grad > 0  # a clamp inside forward would give 0 here, for good
    scale.clamp_()
    assert float(scale.log_scale) == pytest.approx(math.log(100))

    watch = Watch()
    overrides = ["model.contrastive.init_temperature=0.005", "callbacks.periodic_eval=null", "trainer.max_epochs=1"]
    train(smoke_cfg(*overrides), extra_callbacks=[watch])
    assert all(grad != 0.0 for grad, _ in watch.scale)
    assert all(value <= math.log(100) + 1e-6 for _, value in watch.scale)


def test_sampling_during_training_runs_under_the_trainers_precision(smoke_cfg) -> None:
    watch = Watch()
    overrides = ["trainer.precision=bf16-mixed", "callbacks.periodic_eval.every_n_steps=2", "trainer.max_epochs=1"]
    train(smoke_cfg(*overrides), extra_callbacks=[watch])
    assert watch.sampling_dtypes == {torch.bfloat16}  # the sample grid and the periodic evaluation, as training


@pytest.mark.usefixtures("reduced_hub")
@pytest.mark.parametrize("lora", [True, False])
def test_frozen_parts_stay_in_eval_mode_for_the_whole_run(smoke_cfg, lora: bool) -> None:
    hub = [
        "model=sd15_gpt2", "data.image_size=64", "model.vision.resampler.width=64", "model.conditioner.width=64",
        "model.contrastive.embed_dim=32", f"model.llm.lora.enabled={lora}", "trainer.max_epochs=2",
        "callbacks.sample_grid=null", "callbacks.periodic_eval=null",
    ]  # fmt: skip
    watch = Watch()
    train(smoke_cfg(*hub), extra_callbacks=[watch])
    assert len(watch.modes) == 8  # every batch of both epochs, the second after a validation
    for modes in watch.modes:
        # from_pretrained hands every part over in eval mode: the trained UNet trains, the frozen tower does not
        assert not modes["tower"] and not modes["vae"] and modes["unet"]
        assert modes["llm"] is lora and modes["llm_dropout"] is lora  # GPT-2 trains with LoRA; frozen without
        assert not modes["tower_dropout"]  # the frozen CLIP tower never drops out


def test_a_frozen_tower_built_from_its_config_is_in_eval_mode_too(smoke_cfg) -> None:
    watch = Watch()
    overrides = ["model.vision.freeze=true", "trainer.max_epochs=1"]
    train(smoke_cfg(*overrides, "callbacks.sample_grid=null", "callbacks.periodic_eval=null"), extra_callbacks=[watch])
    assert all(not m["tower"] and m["llm"] and m["unet"] for m in watch.modes)  # built in training mode


def test_export_merges_lora_into_the_unet_and_the_llm(smoke_cfg, tmp_path) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import AutoModelForCausalLM

    from capdiff.export import export

    cfg = smoke_cfg("model.unet.lora.enabled=true", "model.llm.lora.enabled=true")
    model, _ = build(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters something to merge
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    export(model, tmp_path / "export")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "llm")
    assert type(unet) is type(model.diffusion.unet) and not any("lora" in n for n in unet.state_dict())
    latents, timesteps = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    text = torch.randn(2, 5, unet.config.cross_attention_dim)
    with torch.no_grad():
        lora_unet = model.diffusion.unet(latents, timesteps, text).sample
        torch.testing.assert_close(unet(latents, timesteps, text).sample, lora_unet)
        ids = torch.tensor([[1, 5, 9, 3]])
        torch.testing.assert_close(lm(ids).logits, model.llm.lm(ids).logits)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_by_norm_and_by_value_with_fused_adamw(smoke_cfg, algorithm: str) -> None:
    from types import SimpleNamespace

    from pytorch_lightning.utilities.enums import GradClipAlgorithmType

    module, _ = build_module(smoke_cfg())
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, fused=True)  # what Lightning's mixed-precision plugin refuses to clip
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=module), precision_plugin=SimpleNamespace())
    module.configure_gradient_clipping(optimizer, 0.5, GradClipAlgorithmType(algorithm))
    if algorithm == "value":
        assert all(torch.all(p.grad == 0.5) for p in params)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        assert norm == pytest.approx(0.5, rel=1e-3)


def test_every_rank_runs_the_same_passes_whatever_its_caption_dropout_draw(smoke_cfg) -> None:
    """Under FSDP each forward of a wrapped block is a collective: a rank that drew no dropped caption must
    still run the empty prompt's pass, or the ranks' collectives stop matching."""
    model, batch = build(smoke_cfg("model.caption_dropout=0.5"))
    calls = []
    model.llm.lm.base_model.register_forward_hook(lambda *args: calls.append(1))
    counts = []
    for drop in (False, True):
        model.caption_dropout_mask = lambda n, device, drop=drop: torch.full((n,), drop, device=device)
        calls.clear()
        model.losses(batch, "train")
        counts.append(len(calls))
    assert counts[0] == counts[1] == 3  # the caption pass, the text pass and the empty prompt's
