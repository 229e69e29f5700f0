"""The text connectors (`model.conditioner.connector`): each one trains, checkpoints and serves; padding never
changes a caption's condition; a wrong connector config fails before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capdiff.models.connectors import MLP, Connector, LayerMix, Queries, Refiner, build_connector
from capdiff.pipeline import Pipeline
from capdiff.train import check_config, train

CONNECTORS = ("mlp", "refiner", "layer_mix", "queries")
CLASSES = {"mlp": MLP, "refiner": Refiner, "layer_mix": LayerMix, "queries": Queries}


@pytest.mark.parametrize("name", CONNECTORS)
def test_every_connector_trains_and_round_trips_through_a_checkpoint(name: str, smoke_cfg, tmp_path: Path) -> None:
    cfg = smoke_cfg(f"model/conditioner/connector={name}", "callbacks.periodic_eval=null", "callbacks.sample_grid=null")
    train(cfg)
    pipe = Pipeline.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", ema=False, device="cpu")
    assert isinstance(pipe.model.conditioner.connector, CLASSES[name])
    assert pipe.model.condition(["a red circle"])["cond"].shape[-1] == 32  # the smoke UNet's cross_attention_dim
    one = pipe.generate(["a red circle in the top left"], steps=2, seed=3)
    again = pipe.generate(["a red circle in the top left", "a blue square"], steps=2, seed=3)
    assert len(one) == 1 and len(again) == 2
    assert isinstance(pipe.caption(one)[0], str)
    # the checkpoint resumes with its connector and continues the step count
    resumed = smoke_cfg(
        f"model/conditioner/connector={name}", "callbacks.periodic_eval=null", "callbacks.sample_grid=null",
        f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2",
    )  # fmt: skip
    train(resumed)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == 1 and last["global_step"] == 8


@pytest.mark.parametrize("name", CONNECTORS)
def test_padding_never_changes_a_captions_condition(name: str, smoke_cfg) -> None:
    """The same caption alone, and batched with a longer one (so padded), gives the same UNet condition on its
    real tokens and the same text embedding."""
    from capdiff.artifacts import derive_parts
    from capdiff.train import build_datamodule, model_config

    cfg = smoke_cfg(f"model/conditioner/connector={name}")
    derived = derive_parts(cfg, build_datamodule(cfg))
    from capdiff.train import instantiate

    model = instantiate(model_config(cfg, derived), recursive=False).model.eval()
    with torch.no_grad():
        torch.nn.init.normal_(next(model.conditioner.connector.parameters()), std=0.5)  # not a symmetric init
        short = "a red circle"
        alone = model.encode_text([short], embed=True)
        batched = model.encode_text(
            [short, "a large blue square in the bottom right on a white background"], embed=True
        )
    mask = alone["cond_mask"][0].bool()
    assert mask.all()  # alone, nothing is padding
    real = batched["cond_mask"][0].bool()
    assert int(real.sum()) == int(mask.sum())
    torch.testing.assert_close(batched["cond"][0][real], alone["cond"][0][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched["text_embed"][0], alone["text_embed"][0], atol=1e-5, rtol=1e-5)


def test_refiner_tokens_see_the_words_after_them() -> None:
    """The point of the refiner: a token's output depends on later words (a causal state does not)."""
    torch.manual_seed(0)
    refiner = Refiner(llm_dim=16, cross_dim=8, width=16, depth=1, heads=2).eval()
    states = torch.randn(1, 5, 16)
    changed = states.clone()
    changed[0, 4] += 1.0
    mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        before, _ = refiner([states], mask)
        after, _ = refiner([changed], mask)
    assert not torch.allclose(before[0, 0], after[0, 0])


def test_layer_mix_reads_every_layer_by_default_and_learns_its_weights() -> None:
    mix = build_connector({"_target_": "capdiff.models.connectors.LayerMix", "hidden": 8}, 16, 8, num_layers=3)
    assert mix.hidden_layers == (0, 1, 2, 3)
    states = [torch.randn(2, 4, 16) for _ in range(4)]
    out, _ = mix(states, torch.ones(2, 4, dtype=torch.long))
    out.sum().backward()
    assert mix.layer_logits.grad is not None and mix.layer_logits.grad.abs().sum() > 0


def test_queries_are_read_after_the_caption_and_give_a_fixed_number_of_tokens(smoke_cfg) -> None:
    from capdiff.artifacts import derive_parts
    from capdiff.train import build_datamodule, instantiate, model_config

    cfg = smoke_cfg("model/conditioner/connector=queries", "model.conditioner.connector.num_queries=3")
    model = instantiate(model_config(cfg, derive_parts(cfg, build_datamodule(cfg))), recursive=False).model.eval()
    with torch.no_grad():
        out = model.encode_text(["a red circle", "a large blue square in the bottom right"])
        empty, empty_mask = model.empty_condition(out["cond"].shape[1], 2)
    assert out["cond"].shape[:2] == (2, 3) and bool(out["cond_mask"].all())
    assert empty.shape == out["cond"].shape and bool(empty_mask.all())  # guidance's empty prompt: the same 3 tokens
    assert not torch.allclose(out["cond"][0], out["cond"][1])  # the queries read the caption before them


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+model.conditioner.connector.depthh=3", r"model.conditioner.connector.depthh is not a key of Refiner: the "
         r"valid ones are width, depth, heads, mlp_ratio"),
        ("model.conditioner.connector._target_=capdiff.models.connectors.Nope", r"is not a connector class"),
        ("model.conditioner.connector._target_=torch.nn.Linear", r"is not a connector class"),
        ("model.conditioner.connector.width=30", r"width=30 is not a multiple of heads=4"),
    ],
)  # fmt: skip
def test_a_wrong_connector_config_fails_before_any_work(override: str, message: str, tmp_path: Path) -> None:
    """The check runs on the config alone, as train.py does before the data, tokenizer or autoencoder exist."""
    from tests.helpers import compose_config

    cfg = compose_config(tmp_path, ["model/conditioner/connector=refiner", override])
    with pytest.raises(ValueError, match=message):
        check_config(cfg)
    assert not (tmp_path / "data").exists()


def test_a_connector_of_a_users_own_module_is_accepted() -> None:
    """A researcher's connector lives in their own module and is named by `_target_`."""
    cls = build_connector({"_target_": "tests.test_connectors.FirstToken"}, 16, 8, num_layers=2)
    out, mask = cls([torch.randn(3, 5, 16)], torch.ones(3, 5, dtype=torch.long))
    assert out.shape == (3, 1, 8) and mask.shape == (3, 1)


class FirstToken(Connector):
    """The shortest connector: the first token's state, projected."""

    def __init__(self, llm_dim: int, cross_dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(llm_dim, cross_dim)

    def forward(self, states, mask):
        return self.proj(states[-1][:, :1]), mask[:, :1]


def _smoke_model(smoke_cfg, *overrides: str):
    from capdiff.artifacts import derive_parts
    from capdiff.train import build_datamodule, instantiate, model_config

    cfg = smoke_cfg(*overrides)
    return instantiate(model_config(cfg, derive_parts(cfg, build_datamodule(cfg))), recursive=False).model.eval()


def test_the_lexical_table_adds_each_words_own_vector_to_its_condition_token(smoke_cfg) -> None:
    """`model.conditioner.lexical`: with the connector's output at zero the condition is the table's row of each
    caption token, so two captions that differ in one word differ at that word's token; the empty prompt (the
    guidance condition) gets the table's row of its one token too."""
    model = _smoke_model(smoke_cfg, "model.conditioner.lexical=true")
    table = model.conditioner.lexical
    assert table is not None and table.num_embeddings == len(model.llm.tokenizer)
    with torch.no_grad():
        torch.nn.init.zeros_(model.conditioner.connector[-1].weight)
        torch.nn.init.zeros_(model.conditioner.connector[-1].bias)
        out = model.encode_text(["a red circle", "a red square"])
        ids, _ = model.llm.tokenize(["a red circle", "a red square"], bos=True, eos=False)
        empty, _ = model.empty_condition(1, 1)
    torch.testing.assert_close(out["cond"], table.weight[ids])
    differ = (out["cond"][0] - out["cond"][1]).abs().sum(-1) > 0
    assert differ.tolist() == (ids[0] != ids[1]).tolist() and bool(differ.any())
    torch.testing.assert_close(empty[0, 0], table.weight[model.llm.tokenizer.bos_token_id])


def test_the_lexical_table_is_left_out_for_connectors_with_tokens_of_their_own(smoke_cfg, caplog) -> None:
    """Queries' tokens are not the caption's words: the table does not apply, and the log says so."""
    with caplog.at_level("WARNING", logger="capdiff.models.conditioner"):
        model = _smoke_model(smoke_cfg, "model/conditioner/connector=queries", "model.conditioner.lexical=true")
    assert model.conditioner.lexical is None
    assert "the lexical table is left out" in caplog.text
    without = _smoke_model(smoke_cfg, "model.conditioner.lexical=false")
    assert without.conditioner.lexical is None and "lexical" not in str(list(without.state_dict()))
