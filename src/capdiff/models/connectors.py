"""Connectors: the LLM's text states → the UNet's cross-attention tokens (`model.conditioner.connector`).

A causal LM's state at a word has seen only the words before it ("circle" does not know "in the top left"
comes next), and its last layer is shaped for predicting the next token. What the UNet reads is therefore a
choice, made here, with one class per published answer:

- `MLP`: each token's last-layer state mapped on its own (what capdiff started with).
- `Refiner`: a small bidirectional transformer over the normalised states, with the padding mask, so every token
  sees the whole caption (Lumina-Image 2.0's context refiner; HunyuanVideo's token refiner; LI-DiT).
- `LayerMix`: a learned, softmax-weighted average of several layers, each normalised first (Wang et al., 2025,
  "layer-normalized average embeddings across all layers").
- `Queries`: learned tokens appended after the caption; the LLM reads them causally after every word, and their
  states are the condition (MetaQuery, Pan et al., 2025; GILL; BLIP3-o).

A connector is a `Connector` subclass built from its config (`_target_` and its constructor's keyword
arguments) with the LLM's width and the UNet's `cross_attention_dim`. It says which LLM layers it reads
(`hidden_layers`) and which tokens the LLM reads after the caption (`query_tokens`), and maps those states to
`(tokens, mask)`. Adding one is a class here (or in any importable module) and a file in
`conf/model/conditioner/connector/`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_KEY = "model.conditioner.connector"
BUILT_IN = ("MLP", "Refiner", "LayerMix", "Queries")
MLP_TARGET = f"{__name__}.MLP"  # what a config without a connector was trained with


class Connector(nn.Module):
    """LLM text states → `(tokens B×L'×cross_dim, mask B×L')`."""

    #: indices into the LLM's hidden states (0: the embeddings, -1: the last layer) that `forward` receives
    hidden_layers: tuple[int, ...] = (-1,)
    #: whether the output tokens are the caption's own tokens, one each and in order (what the conditioner's
    #: `lexical` table adds to); a connector that says so opts in
    per_token: bool = False

    def query_tokens(self) -> torch.Tensor | None:
        """Input embeddings (K×d_llm) the LLM reads after each caption; None: the caption alone."""
        return None

    def forward(self, states: Sequence[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _mlp(llm_dim: int, hidden: int, cross_dim: int) -> list[nn.Module]:
    return [nn.LayerNorm(llm_dim), nn.Linear(llm_dim, hidden), nn.GELU(), nn.Linear(hidden, cross_dim)]


class MLP(nn.Sequential, Connector):
    """Each token's last-layer state through LayerNorm → Linear → GELU → Linear. Its weights keep the names
    they had before connectors were a choice (`connector.0` … `connector.3`), so those checkpoints load."""

    per_token = True

    def __init__(self, llm_dim: int, cross_dim: int, hidden: int = 512) -> None:
        super().__init__(*_mlp(llm_dim, hidden, cross_dim))

    def forward(self, states: Sequence[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(states[-1]), mask


class Refiner(Connector):
    """RMSNorm → Linear → `depth` pre-norm transformer encoder blocks (bidirectional self-attention over the real
    tokens: padding is masked as a key) → LayerNorm → Linear. As Lumina-Image 2.0 refines Gemma's states before
    its DiT reads them, with `depth=2` there too."""

    per_token = True

    def __init__(
        self, llm_dim: int, cross_dim: int, width: int = 256, depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"{CONFIG_KEY}.width={width} is not a multiple of heads={heads}: change either.")
        self.norm_in = nn.RMSNorm(llm_dim)
        self.proj_in = nn.Linear(llm_dim, width)
        block = nn.TransformerEncoderLayer(
            width, heads, int(width * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, cross_dim)

    def forward(self, states: Sequence[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.proj_in(self.norm_in(states[-1]))
        x = self.blocks(x, src_key_padding_mask=mask == 0)
        return self.proj_out(self.norm_out(x)), mask


class LayerMix(Connector):
    """A softmax-weighted average of LLM layers, each layer-normalised (no affine) first so no layer's scale
    dominates, then the MLP. `layers`: hidden-state indices (0: the input embeddings, -1: the last layer); null:
    all of them, the input embeddings included."""

    per_token = True

    def __init__(
        self, llm_dim: int, cross_dim: int, hidden: int = 512, layers: list[int] | None = None, num_layers: int = 0
    ) -> None:
        super().__init__()
        if layers is None:
            if num_layers < 1:
                raise ValueError(f"{CONFIG_KEY}: LayerMix with layers: null needs the LLM's layer count.")
            layers = list(range(num_layers + 1))
        if not layers:
            raise ValueError(f"{CONFIG_KEY}.layers is empty: list hidden-state indices, or null for every layer.")
        self.hidden_layers = tuple(int(i) for i in layers)
        self.layer_logits = nn.Parameter(torch.zeros(len(self.hidden_layers)))
        self.mlp = nn.Sequential(*_mlp(llm_dim, hidden, cross_dim))

    def forward(self, states: Sequence[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = torch.stack([F.layer_norm(s, s.shape[-1:]) for s in states], dim=0)
        weights = self.layer_logits.softmax(0).to(normed.dtype)
        return self.mlp(torch.einsum("k,kbld->bld", weights, normed)), mask


class Queries(Connector):
    """`num_queries` learned input embeddings appended after each caption (at the positions after its last
    word, whatever the padding); their last-layer states, through the MLP, are the condition: a fixed number of
    tokens that have each read the whole caption."""

    def __init__(self, llm_dim: int, cross_dim: int, num_queries: int = 16, hidden: int = 512) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"{CONFIG_KEY}.num_queries={num_queries}: use at least 1.")
        self.queries = nn.Parameter(torch.randn(num_queries, llm_dim) * 0.02)  # GPT-2's embedding init scale
        self.mlp = nn.Sequential(*_mlp(llm_dim, hidden, cross_dim))

    def query_tokens(self) -> torch.Tensor:
        return self.queries

    def forward(self, states: Sequence[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.queries.shape[0]
        return self.mlp(states[-1][:, -count:]), mask[:, -count:]


def connector_class(config: dict[str, Any]) -> type[Connector]:
    """The class a connector config names (`_target_`: a dotted path, or a built-in's name)."""
    target = (config or {}).get("_target_")
    if not target:
        raise ValueError(
            f"{CONFIG_KEY}._target_ is missing: choose a connector, e.g. {CONFIG_KEY}._target_="
            f"capdiff.models.connectors.Refiner (built in: {', '.join(BUILT_IN)})."
        )
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or __name__), name)
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Connector)) or cls is Connector:
        raise ValueError(
            f"{CONFIG_KEY}._target_={target!r} is not a connector class: name a subclass of "
            f"capdiff.models.connectors.Connector (built in: "
            + ", ".join(f"capdiff.models.connectors.{n}" for n in BUILT_IN)
            + ")."
        )
    return cls


def check_connector(config: dict[str, Any]) -> type[Connector]:
    """Checks a connector config before anything is built: a known class and only its own keys."""
    cls = connector_class(config)
    params = inspect.signature(cls.__init__).parameters
    valid = [n for n in params if n not in ("self", "llm_dim", "cross_dim", "num_layers")]
    for key in config:
        if key != "_target_" and key not in valid:
            raise ValueError(
                f"{CONFIG_KEY}.{key} is not a key of {cls.__name__}: the valid ones are {', '.join(valid) or 'none'}."
            )
    return cls


def build_connector(config: dict[str, Any], llm_dim: int, cross_dim: int, num_layers: int) -> Connector:
    cls = check_connector(config)
    options = {k: v for k, v in config.items() if k != "_target_"}
    if "num_layers" in inspect.signature(cls.__init__).parameters:
        options["num_layers"] = num_layers
    return cls(llm_dim, cross_dim, **options)
