"""Prompts → CLIP token embeddings, the conditioning c of the UNet (Radford et al. 2021; SD 1.5 uses the last
hidden state of CLIP ViT-L/14's text transformer). The transformer itself is `transformers.CLIPTextModel`.

Axis letters: b prompts, n tokens (77), c channels (768).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # transformers is imported when a tokenizer or text model is built, not with t2vz
    from transformers import CLIPTextModel, CLIPTokenizer

MAX_TOKENS = 77


def shipped_tokenizer_dir() -> Path:
    """The CLIP BPE tokenizer that ships with t2vz (see weights_convert/clip_vocab.py)."""
    return Path(str(resources.files("t2vz") / "data" / "clip_tokenizer"))


def load_tokenizer(folder: str | Path | None = None) -> CLIPTokenizer:
    """CLIP's tokenizer from a folder with vocab.json and merges.txt (the shipped one by default)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder or shipped_tokenizer_dir()), model_max_length=MAX_TOKENS)


def build_clip_text_model(config: dict) -> CLIPTextModel:
    """transformers' CLIPTextModel from the config dict stored in a t2vz model folder (CLIPTextConfig kwargs)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "unused kwargs" chatter on construction
    try:
        return CLIPTextModel(CLIPTextConfig(**config))
    finally:
        hf_logging.set_verbosity(verbosity)


CLIP_PREFIX = "text_model."


def canonical_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as every CLIP checkpoint stores them (`text_model.encoder.layers.0...`), whichever transformers wrote
    them: transformers 5 drops the `text_model.` level from CLIPTextModel's own keys. Position ids are dropped."""
    return {
        (k if k.startswith(CLIP_PREFIX) else CLIP_PREFIX + k): v
        for k, v in state_dict.items()
        if not k.endswith("position_ids")
    }


def clip_state_dict_for(model: CLIPTextModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical `text_model.*` keys → the key names the installed transformers' CLIPTextModel uses."""
    state_dict = canonical_clip_state_dict(state_dict)
    if any(k.startswith(CLIP_PREFIX) for k in model.state_dict()):
        return state_dict
    return {k[len(CLIP_PREFIX):]: v for k, v in state_dict.items()}


class TextEncoder(nn.Module):
    """Tokenize (pad to 77 with <|endoftext|>, truncate) and encode: list of b prompts → (b, 77, c)."""

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """list of b prompts → token ids (b, 77)."""
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids

    def forward(self, prompts: list[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenize(prompts).to(self.model.device)
        return self.model(ids).last_hidden_state
