"""The LLM shared by the captioner (image prefix → caption) and the text conditioner (caption → hidden states)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from capdiff.models.hub import load_pretrained

IGNORE = -100


class LanguageModel(nn.Module):
    """Any Hugging Face causal LM and its tokenizer, with the two passes capdiff needs."""

    def __init__(self, lm: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str = "", max_tokens: int = 48):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long), persistent=False)

    @classmethod
    def build(cls, name_or_path: str | None, config: dict | None, tokenizer: PreTrainedTokenizerBase, **kwargs):
        if name_or_path:
            lm = load_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, "model.llm.name_or_path")
        else:
            spec = dict(config or {})
            model_type = spec.pop("model_type", "gpt2")
            special = {
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
            lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(special | spec)))
        if lm.get_input_embeddings().num_embeddings < len(tokenizer):
            lm.resize_token_embeddings(len(tokenizer))
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
        return cls(lm, tokenizer, **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.lm.get_input_embeddings().embedding_dim

    @property
    def num_layers(self) -> int:
        return int(self.lm.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    def tokenize(self, captions: list[str], bos: bool, eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask; `bos`/`eos` added around each caption, truncated to `max_tokens`."""
        tok = self.tokenizer
        budget = self.max_tokens - int(bos) - int(eos)
        rows = []
        for ids in tok(captions, add_special_tokens=False)["input_ids"]:
            rows.append([tok.bos_token_id] * bos + ids[:budget] + [tok.eos_token_id] * eos)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def text_hidden(
        self, captions: list[str], layers: tuple[int, ...] = (-1,), queries: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The text-only pass: `[bos] caption`, then `queries` (K×d input embeddings, read right after each
        caption's last word whatever the padding) → `hidden` (the last layer), `layers` (the hidden states at
        those indices: 0 the embeddings, -1 the last layer), `mask` (captions, then the K queries) and `ids` (the
        captions' token ids, padded, without the queries)."""
        ids, mask = self.tokenize(captions, bos=True, eos=False)
        caption_ids = ids
        every = layers != (-1,)
        if queries is None:
            out = self.lm.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=every)
        else:
            count = queries.shape[0]
            embeds = self.lm.get_input_embeddings()(ids)
            embeds = torch.cat([embeds, queries.to(embeds.dtype).expand(len(captions), -1, -1)], dim=1)
            # positions count real tokens only, so a caption's queries sit where its words end, padded or not
            positions = (mask.cumsum(1) - 1).clamp_min(0)
            after = mask.sum(1, keepdim=True) + torch.arange(count, device=mask.device)
            positions = torch.cat([positions, after], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, count)], dim=1)
            out = self.lm.base_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=every
            )
        hidden = out.last_hidden_state
        chosen = [out.hidden_states[i] for i in layers] if every else [hidden]
        return {"hidden": hidden, "layers": chosen, "mask": mask, "ids": caption_ids}

    def _prefixed(self, prefix: torch.Tensor) -> torch.Tensor:
        embed = self.lm.get_input_embeddings()
        prompt = embed(self.prompt_ids).unsqueeze(0).expand(prefix.shape[0], -1, -1)
        return torch.cat([prefix, prompt.to(prefix.dtype)], dim=1)

    def caption_logits(self, prefix: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        """Teacher-forced `[prefix][prompt] caption eos`; labels are IGNORE on prefix, prompt and padding."""
        ids, mask = self.tokenize(captions, bos=False, eos=True)
        head = self._prefixed(prefix)
        embeds = torch.cat([head, self.lm.get_input_embeddings()(ids)], dim=1)
        attention = torch.cat([torch.ones(head.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
        labels = torch.cat(
            [
                torch.full(head.shape[:2], IGNORE, dtype=torch.long, device=ids.device),
                ids.masked_fill(mask == 0, IGNORE),
            ],
            dim=1,
        )
        logits = self.lm(inputs_embeds=embeds, attention_mask=attention).logits
        return {"logits": logits, "labels": labels}

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, max_new_tokens: int | None = None, **generate_kwargs) -> list[str]:
        """Captions for image prefixes (greedy by default; pass `num_beams`, `do_sample`, ... to change)."""
        head = self._prefixed(prefix)
        attention = torch.ones(head.shape[:2], dtype=torch.long, device=head.device)
        out = self.lm.generate(
            inputs_embeds=head,
            attention_mask=attention,
            max_new_tokens=max_new_tokens or self.max_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            **generate_kwargs,
        )
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; positions labelled IGNORE (prefix, prompt, padding) do not count."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
