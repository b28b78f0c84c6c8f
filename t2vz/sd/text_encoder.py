"""Prompts → CLIP token embeddings, the conditioning c of the UNet (Radford et al. 2021; SD 1.5 uses the last
hidden state of CLIP ViT-L/14's text transformer). The transformer itself is `transformers.CLIPTextModel`.

SDXL (Podell et al. 2023, Sec. 2.1) conditions on two text encoders: CLIP ViT-L (`CLIPTextModel`, 768 wide) and
OpenCLIP ViT-bigG (`CLIPTextModelWithProjection`, 1280 wide). The context c is the concatenation of both
penultimate hidden states (the output of the second-to-last layer, before the final layer norm), (b, 77, 768 + 1280);
the pooled embedding is bigG's projected end-of-text feature (`text_embeds`, (b, 1280)), which enters the UNet
through its added "text_time" embedding. Both tokenize with the same CLIP BPE vocabulary; the second pads with "!"
(id 0) instead of <|endoftext|>, as OpenCLIP does (`SDXL_TOKENIZER_2_CONFIG`). `SDXLTextEncoders` computes what
diffusers' `StableDiffusionXLPipeline.encode_prompt` does (without clip_skip).

Axis letters: b prompts, n tokens (77), c channels (768; SDXL 2048), p pooled channels (1280).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # transformers is imported when a tokenizer or text model is built, not with t2vz
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_TOKENS = 77
SDXL_PAD_TOKEN = "!"  # the second SDXL tokenizer pads with id 0, as OpenCLIP's tokenizer does
# tokenizer_config.json of SDXL's second tokenizer (stable-diffusion-xl-base-1.0/tokenizer_2): the shipped
# vocabulary and merges, padding with "!".
SDXL_TOKENIZER_2_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": MAX_TOKENS,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": SDXL_PAD_TOKEN,
    "unk_token": "<|endoftext|>",
}


def shipped_tokenizer_dir() -> Path:
    """The CLIP BPE tokenizer that ships with t2vz (see weights_convert/clip_vocab.py)."""
    return Path(str(resources.files("t2vz") / "data" / "clip_tokenizer"))


def load_tokenizer(folder: str | Path | None = None) -> CLIPTokenizer:
    """CLIP's tokenizer from a folder with vocab.json and merges.txt (the shipped one by default)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder or shipped_tokenizer_dir()), model_max_length=MAX_TOKENS)


def build_clip_text_model(config: dict, projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """transformers' CLIPTextModel from the config dict stored in a t2vz model folder (CLIPTextConfig kwargs);
    with `projection`, CLIPTextModelWithProjection (SDXL's second encoder: `text_projection` to projection_dim)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "unused kwargs" chatter on construction
    try:
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))
    finally:
        hf_logging.set_verbosity(verbosity)


CLIP_PREFIX = "text_model."


PROJECTION_KEY = "text_projection.weight"  # CLIPTextModelWithProjection's projection: beside text_model.*


def canonical_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as every CLIP checkpoint stores them (`text_model.encoder.layers.0...`, and `text_projection.weight`
    for a CLIPTextModelWithProjection), whichever transformers wrote them: transformers 5 drops the `text_model.`
    level from CLIPTextModel's own keys. Position ids are dropped."""
    return {
        (k if k.startswith(CLIP_PREFIX) or k == PROJECTION_KEY else CLIP_PREFIX + k): v
        for k, v in state_dict.items()
        if not k.endswith("position_ids")
    }


def clip_state_dict_for(model: CLIPTextModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical `text_model.*` keys → the key names the installed transformers' CLIPTextModel (or
    CLIPTextModelWithProjection) uses."""
    state_dict = canonical_clip_state_dict(state_dict)
    if any(k.startswith(CLIP_PREFIX) for k in model.state_dict()):
        return state_dict
    return {k.removeprefix(CLIP_PREFIX): v for k, v in state_dict.items()}


class TextEncoder(nn.Module):
    """Tokenize (pad to 77 with <|endoftext|>, truncate) and encode: list of b prompts → (b, 77, c)."""

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """list of b prompts → token ids (b, 77)."""
        return tokenize(self.tokenizer, prompts)

    def forward(self, prompts: list[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenize(prompts).to(self.model.device)
        return self.model(ids).last_hidden_state


def load_sdxl_tokenizer_2(folder: str | Path | None = None) -> CLIPTokenizer:
    """SDXL's second tokenizer: the folder's (its tokenizer_config.json pads with "!"), or by default the shipped
    vocabulary padding with "!" (`SDXL_TOKENIZER_2_CONFIG`)."""
    from transformers import CLIPTokenizer

    if folder is not None:
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)
    return CLIPTokenizer.from_pretrained(str(shipped_tokenizer_dir()), model_max_length=MAX_TOKENS,
                                         pad_token=SDXL_PAD_TOKEN)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """list of b prompts → token ids (b, 77): padded to 77 with the tokenizer's pad token, truncated."""
    return tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


class SDXLTextEncoders(nn.Module):
    """SDXL's two text encoders: prompts → (context (b, 77, c1 + c2), pooled (b, p)).

    context = [penultimate hidden state of CLIP ViT-L ; penultimate hidden state of OpenCLIP bigG] on the channel
    axis (hidden_states[-2]: no final layer norm); pooled = bigG's `text_embeds` (final layer norm, end-of-text
    token, `text_projection`). As diffusers' `encode_prompt`, `prompts_2` (what the second encoder reads) defaults
    to `prompts`, and a negative prompt is encoded the same way (`forward(negative, negative_2)`).

    Unconditional embeddings: diffusers' SDXL pipeline, when no negative prompt is given at all, uses zeros for both
    the context and the pooled embedding instead of encoding "" (its `force_zeros_for_empty_prompt`, true for SDXL
    base). That is a pipeline's decision; `unconditional` implements it.
    """

    def __init__(self, encoder_1: CLIPTextModel, encoder_2: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer,
                 tokenizer_2: CLIPTokenizer):
        super().__init__()
        self.encoder_1 = encoder_1
        self.encoder_2 = encoder_2
        self.tokenizer = tokenizer  # the first tokenizer: token positions (attention maps, prompt weighting) use it
        self.tokenizer_2 = tokenizer_2

    @property
    def device(self) -> torch.device:
        return self.encoder_2.device

    def forward(self, prompts: list[str] | str, prompts_2: list[str] | str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompts_2 = prompts if prompts_2 is None else [prompts_2] if isinstance(prompts_2, str) else list(prompts_2)
        if len(prompts_2) != len(prompts):
            raise ValueError(f"prompts_2 has {len(prompts_2)} prompts and prompts {len(prompts)}; give one each")
        out_1 = self.encoder_1(tokenize(self.tokenizer, prompts).to(self.encoder_1.device), output_hidden_states=True)
        out_2 = self.encoder_2(tokenize(self.tokenizer_2, prompts_2).to(self.encoder_2.device),
                               output_hidden_states=True)
        context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return context, out_2.text_embeds

    def unconditional(self, batch: int, negative: list[str] | str | None = None,
                      negative_2: list[str] | str | None = None, force_zeros_for_empty_prompt: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier-free guidance embeddings for `batch` prompts, as diffusers' SDXL `encode_prompt`: zeros
        (context and pooled) when no negative prompt is given and `force_zeros_for_empty_prompt`; else the negative
        prompts encoded (None → "", `negative_2` None → `negative`; a string is repeated `batch` times)."""
        if negative is None and force_zeros_for_empty_prompt:
            context, pooled = self.shapes()
            dtype = self.encoder_2.dtype
            return (torch.zeros(batch, MAX_TOKENS, context, device=self.device, dtype=dtype),
                    torch.zeros(batch, pooled, device=self.device, dtype=dtype))
        negative = "" if negative is None else negative
        negative_2 = negative if negative_2 is None else negative_2
        negative = [negative] * batch if isinstance(negative, str) else list(negative)
        negative_2 = [negative_2] * batch if isinstance(negative_2, str) else list(negative_2)
        if len(negative) != batch:
            raise ValueError(f"{len(negative)} negative prompts for {batch} prompts; give one, or one per prompt")
        return self(negative, negative_2)

    def shapes(self) -> tuple[int, int]:
        """(context channels c1 + c2, pooled channels p)."""
        return (self.encoder_1.config.hidden_size + self.encoder_2.config.hidden_size,
                self.encoder_2.config.projection_dim)
