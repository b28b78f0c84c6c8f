"""The sampling loop every pipeline shares: DDIM (Song et al. 2021, Eq. 12) with classifier-free guidance (Ho &
Salimans 2022), and the steps around it (text conditioning, x_T, decoding), as k-diffusion keeps its samplers'
common loop in one place. The text conditioning of every pipeline, from prompt text or from embeddings given in its
place, is `encode_prompts`.

Random stream, kept identical to diffusers' pipelines for seed compatibility: x_T is the first draw from
`generator` (a CPU generator draws on the CPU, whatever the device), then DDIM's noise when η > 0.

Layouts: a video's latents are (b, c, f, h, w); the UNet sees frames folded into the batch, (b f) c h w, by
`fold_frames` / `unfold_frames`. With classifier-free guidance the UNet batch is [uncond rows; text rows].
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from tqdm.auto import tqdm

from ..sd.attention import CrossFrame
from ..sd.loading import StableDiffusion
from ..sd.model_folder import SDXL
from ..sd.schedulers import DDIM
from ..sd.tome import TokenMerging
from .chunks import eps_by_chunks
from .fast import loop_unet_kwargs


def fold_frames(video: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) → ((b f), c, h, w): frames into the batch, video-major."""
    return rearrange(video, "b c f h w -> (b f) c h w")


def unfold_frames(frames: torch.Tensor, f: int) -> torch.Tensor:
    """((b f), c, h, w) → (b, c, f, h, w)."""
    return rearrange(frames, "(b f) c h w -> b c f h w", f=f)


def check_size(height: int, width: int, multiple: int = 8) -> None:
    """Image sizes must be whole multiples of the VAE's downsampling factor (8 for SD 1.5)."""
    for name, value in (("height", height), ("width", width)):
        if int(value) != value or value <= 0 or value % multiple:
            raise ValueError(
                f"{name}={value} must be a positive multiple of {multiple} (the VAE downsamples by {multiple})"
            )


def prompt_texts(prompt: str | Sequence[str] | None, negative_prompt: str | Sequence[str] | None,
                 rows: int | None = None) -> tuple[list[str] | None, list[str] | None]:
    """The prompts as a list (None for None) and the negative prompt of each (a single string serves every prompt;
    `rows`: how many prompts there are when they come as embeddings). ValueError naming the bad value."""
    prompts = None
    if prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        rows = len(prompts)
    if negative_prompt is None:
        return prompts, None
    negatives = [negative_prompt] * rows if isinstance(negative_prompt, str) else list(negative_prompt) \
        if isinstance(negative_prompt, (list, tuple)) else [None]
    if not all(isinstance(p, str) for p in negatives):
        raise ValueError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
    if len(negatives) != rows:
        raise ValueError(f"{len(negatives)} negative prompts for {rows} prompts")
    return prompts, negatives


def check_per_prompt(num_videos_per_prompt: int) -> None:
    """The number of videos (or images) per prompt: an integer >= 1."""
    if isinstance(num_videos_per_prompt, bool) or int(num_videos_per_prompt) != num_videos_per_prompt \
            or num_videos_per_prompt < 1:
        raise ValueError(f"num_videos_per_prompt={num_videos_per_prompt} must be an integer >= 1")


def repeat_rows(rows, n: int):
    """Each row of `rows` (a list, or a tensor's first axis) n times in a row, prompt-major; None for None."""
    if rows is None or n == 1:
        return rows
    return rows.repeat_interleave(n, dim=0) if isinstance(rows, torch.Tensor) else [r for r in rows for _ in range(n)]


@dataclass
class TextConditioning:
    """A batch's text conditioning, one row per video (or image), prompt-major, on the UNet's device and in its
    dtype: the text branch `text` (b, n, d) and the unconditional branch `uncond` (b, n, d), None without
    classifier-free guidance. `prompts`: each row's prompt text, None when the rows came as embeddings (background
    smoothing's attention masks look the subject's tokens up in it)."""

    text: torch.Tensor
    uncond: torch.Tensor | None = None
    prompts: list[str] | None = None
    pooled: torch.Tensor | None = None         # SDXL: the pooled text embedding of each row (b, p)
    uncond_pooled: torch.Tensor | None = None  # SDXL: the unconditional branch's (b, p)

    def added_cond(self, time_ids: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """SDXL's added conditioning for the UNet (`UNet.forward(added_cond=...)`), its rows following `context`'s:
        the pooled embeddings ([uncond; text] with guidance) and the six size/crop numbers `time_ids` (6,) on every
        row (`sdxl_time_ids`). None for SD 1.5 (no pooled embedding)."""
        if self.pooled is None:
            return None
        pooled = self.pooled if self.uncond_pooled is None else torch.cat([self.uncond_pooled, self.pooled])
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled).expand(pooled.shape[0], -1)}

    @property
    def batch(self) -> int:
        """b, the number of videos (or images)."""
        return self.text.shape[0]

    @property
    def context(self) -> torch.Tensor:
        """The UNet's cross-attention context: [uncond; text] stacked on the batch axis (b → 2b) for classifier-free
        guidance, text alone (b) without."""
        return self.text if self.uncond is None else torch.cat([self.uncond, self.text])


def checked_embeds(sd: StableDiffusion, embeds, name: str, expected: tuple[int, ...] | None = None) -> torch.Tensor:
    """A caller's text embeddings: a tensor (b, n_tokens, d), d the UNet's cross_attention_dim, of shape `expected`
    where given; moved to the model's device and dtype. ValueError naming the shape and what is expected."""
    d = sd.unet.config.cross_attention_dim
    if not isinstance(embeds, torch.Tensor):
        raise ValueError(f"{name} must be a tensor (b, n_tokens, {d}), got {type(embeds).__name__}")
    shape = tuple(embeds.shape)
    if expected is not None and shape != tuple(expected):
        raise ValueError(f"{name} of shape {shape}, expected {tuple(expected)} (the shape of the text branch)")
    if len(shape) != 3 or shape[0] < 1 or shape[1] < 1 or shape[2] != d:
        raise ValueError(f"{name} of shape {shape}, expected (b, n_tokens, {d}): {d} is the UNet's "
                         "cross_attention_dim, b >= 1 the number of prompts")
    return embeds.to(device=sd.device, dtype=sd.dtype)


SDXL_TEXT_OPTIONS = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def refuse_sdxl_options(given: Sequence[str], family: str) -> None:
    """ValueError naming the SDXL-only options `given` (their names) unless the model's `family` is SDXL."""
    if given and family != SDXL:
        raise ValueError(f"{', '.join(given)}: SDXL option(s), and this model is SD 1.5 ({family}); leave them unset, "
                         "or load an SDXL model")


def encode_prompts(
    sd: StableDiffusion,
    prompt: str | Sequence[str] | None,
    negative_prompt: str | Sequence[str] | None = None,
    guidance: bool = True,
    num_per_prompt: int = 1,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    prompt_name: str = "prompt",
    one_prompt: bool = False,
    **sdxl,
) -> TextConditioning:
    """The text conditioning of every pipeline, from prompt text or from embeddings (as diffusers' encode_prompt):

    - the text branch: `prompt` (a string or a list) encoded, or `prompt_embeds` (b, n_tokens, d) as given; exactly
      one of the two (`prompt_name` is the prompt's keyword in errors);
    - the unconditional branch, with `guidance` (classifier-free guidance, s > 1) only: `negative_prompt` encoded
      (one string for every prompt, or one per prompt), or `negative_prompt_embeds` of prompt_embeds' shape (of the
      encoded text's, (b, 77, d), for a text prompt), at most one of the two; neither: "" encoded for each prompt;
    - each row repeated `num_per_prompt` times, prompt-major, as the text path repeats the prompts.
    `one_prompt`: the pipeline takes a single prompt (one string, or one row of embeddings). ValueError, one line,
    naming the bad value and what is expected.

    SDXL models take `sdxl` keywords too (`SDXL_TEXT_OPTIONS`; an SD 1.5 model refuses them): `prompt_2` and
    `negative_prompt_2`, what the second text encoder reads (default: `prompt`, `negative_prompt`), and with
    embeddings `pooled_prompt_embeds` (b, p) beside `prompt_embeds` and `negative_pooled_prompt_embeds` beside
    `negative_prompt_embeds`. With no negative at all the unconditional branch is zeros, not "" encoded, as
    diffusers' SDXL pipelines do (`force_zeros_for_empty_prompt`; `SDXLTextEncoders.unconditional`)."""
    unknown = sorted(set(sdxl) - set(SDXL_TEXT_OPTIONS))
    if unknown:
        raise TypeError(f"unknown text option(s) {', '.join(unknown)}")
    sdxl = {k: v for k, v in sdxl.items() if v is not None}
    refuse_sdxl_options(sorted(sdxl), sd.family)
    is_sdxl = sd.family == SDXL
    if (prompt is None) == (prompt_embeds is None):
        d = sd.unet.config.cross_attention_dim
        raise ValueError(f"give {prompt_name} or prompt_embeds, not both" if prompt is not None else
                         f"no {prompt_name}: give {prompt_name} (text) or prompt_embeds (b, n_tokens, {d})")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("give negative_prompt or negative_prompt_embeds, not both")
    for second, name, embeds in (("prompt_2", "prompt_embeds", prompt_embeds),
                                 ("negative_prompt_2", "negative_prompt_embeds", negative_prompt_embeds)):
        if second in sdxl and embeds is not None:  # as diffusers' check_inputs
            raise ValueError(f"give {second} with text, not with {name}: the embeddings already hold both text "
                             "encoders' output")
    check_per_prompt(num_per_prompt)
    pooled = uncond_pooled = None
    if prompt_embeds is not None:
        text = checked_embeds(sd, prompt_embeds, "prompt_embeds")
        if one_prompt and text.shape[0] != 1:
            raise ValueError(f"prompt_embeds of shape {tuple(text.shape)} for a pipeline that takes one prompt, "
                             f"expected (1, n_tokens, {text.shape[2]})")
        if is_sdxl:
            pooled = checked_pooled(sd, sdxl.get("pooled_prompt_embeds"), "pooled_prompt_embeds", text.shape[0])
    if one_prompt and prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{prompt_name} must be one string, got {prompt!r}")
    prompts, negatives = prompt_texts(prompt, negative_prompt, None if prompt_embeds is None else text.shape[0])
    if prompts is not None:
        text, pooled = encode_text(sd, prompts, sdxl.get("prompt_2"))
    uncond = None
    if negative_prompt_embeds is not None:
        uncond = checked_embeds(sd, negative_prompt_embeds, "negative_prompt_embeds", tuple(text.shape))
        if is_sdxl:
            uncond_pooled = checked_pooled(sd, sdxl.get("negative_pooled_prompt_embeds"),
                                           "negative_pooled_prompt_embeds", text.shape[0])
    elif guidance and is_sdxl:
        uncond, uncond_pooled = (t.to(sd.dtype) for t in sd.text_encoder.unconditional(
            text.shape[0], negatives, sdxl.get("negative_prompt_2")))
    elif guidance:
        uncond = sd.text_encoder(negatives or [""] * text.shape[0]).to(sd.dtype)
    if uncond is not None and uncond.shape != text.shape:
        raise ValueError(f"prompt_embeds of shape {tuple(text.shape)} have {text.shape[1]} tokens but the "
                         f"unconditional branch encoded from text has {uncond.shape[1]}: give "
                         f"negative_prompt_embeds of shape {tuple(text.shape)}")
    if not guidance:
        uncond = uncond_pooled = None
    return TextConditioning(*(repeat_rows(rows, num_per_prompt) for rows in (text, uncond, prompts, pooled,
                                                                                  uncond_pooled)))


def encode_text(sd: StableDiffusion, prompts: list[str], prompts_2=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts → (context rows (b, 77, d), pooled rows (b, p) for SDXL, None for SD 1.5), in the model's dtype."""
    if sd.family != SDXL:
        return sd.text_encoder(prompts).to(sd.dtype), None
    if prompts_2 is not None:
        prompts_2, _ = prompt_texts(prompts_2, None)
        if len(prompts_2) != len(prompts):
            raise ValueError(f"{len(prompts_2)} prompt_2 for {len(prompts)} prompts: give one, or one per prompt")
    context, pooled = sd.text_encoder(prompts, prompts_2)
    return context.to(sd.dtype), pooled.to(sd.dtype)


def checked_pooled(sd: StableDiffusion, pooled, name: str, rows: int) -> torch.Tensor:
    """SDXL's pooled embeddings given beside prompt embeddings: a tensor (rows, p), p the second text encoder's
    projection width; moved to the model's device and dtype."""
    p = sd.text_encoder.shapes()[1]
    if pooled is None:
        raise ValueError(f"an SDXL model given {name.replace('pooled_', '')} needs {name} ({rows}, {p}) too, as "
                         "diffusers' SDXL pipelines do")
    if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (rows, p):
        shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise ValueError(f"{name} of shape {shape}, expected ({rows}, {p}): one pooled embedding per prompt row")
    return pooled.to(device=sd.device, dtype=sd.dtype)


def sdxl_time_ids(original_size, crops_coords_top_left, target_size) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2): original size (h, w), crop top-left (y, x) and
    target size (h, w) as one row of six numbers, (6,)."""
    return torch.tensor([*original_size, *crops_coords_top_left, *target_size], dtype=torch.float32)


def guided_eps(unet: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               guidance_scale: float, **unet_kwargs) -> torch.Tensor:
    """ε = ε_uncond + s·(ε_text − ε_uncond), both branches in one batch of `unet` (the UNet, or the UNet driven by
    a ControlNet): x (n, c, h, w) → (n, c, h, w)."""
    if guidance_scale <= 1.0:
        return unet(x, t, context, **unet_kwargs)
    eps_uncond, eps_text = unet(torch.cat([x, x]), t, context, **unet_kwargs).chunk(2)
    return eps_uncond + guidance_scale * (eps_text - eps_uncond)


def checked_latents(sd: StableDiffusion, latents: torch.Tensor, shape: tuple[int, ...], what: str = "") -> torch.Tensor:
    """A caller's x_T: checked against `shape` (ValueError naming both, plus `what`), moved to the model's device
    and dtype."""
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}{what}")
    return latents.to(device=sd.device, dtype=sd.dtype)


def step_counter(callback: Callable[[int, int, torch.Tensor], None] | None):
    """A user's `callback(i, t, x)` as a DDIM step callback `(t, x)`, i counting the steps across every loop it
    is passed to (a pipeline's several phases and chunks); None for None."""
    if callback is None:
        return None
    counter = itertools.count()
    return lambda t, x: callback(next(counter), t, x)


def chain(*callbacks):
    """One step callback `(t, x)` from several (None skipped): each may return a replacement x, later ones see it."""
    callbacks = [c for c in callbacks if c is not None]

    def run(t: int, x: torch.Tensor) -> torch.Tensor:
        for callback in callbacks:
            replaced = callback(t, x)
            x = x if replaced is None else replaced
        return x
    return run if callbacks else None


def ddim_loop(
    x: torch.Tensor,
    scheduler: DDIM,
    timesteps: torch.Tensor,
    predict_eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator | None = None,
    step_callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    desc: str = "DDIM",
    progress: bool = True,
) -> torch.Tensor:
    """DDIM (Eq. 12) over `timesteps` with any noise prediction `predict_eps(x, t) -> ε` (guidance included):
    x at timesteps[0] → x one DDIM step below timesteps[−1]. `step_callback(t, x)` may return a replacement x.

    `timesteps` stay on the CPU for the scheduler (it reads each t as a Python int, which on an accelerator would
    wait for it); the UNet gets t from one copy of them on x's device, made here, so that no step copies a
    timestep from the host."""
    on_device = timesteps.to(x.device)  # (n,): one copy per loop; on_device[i] is a view, not a copy
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
        eps = predict_eps(x, on_device[i])
        x, _ = scheduler.step(eps, t, x, generator=generator)
        replaced = step_callback(int(t), x) if step_callback is not None else None
        x = x if replaced is None else replaced
    return x


def ddim_denoise(
    sd: StableDiffusion,
    x: torch.Tensor,
    scheduler: DDIM,
    timesteps: torch.Tensor,
    context: torch.Tensor,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    cross_frame: CrossFrame | None = None,
    step_callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    desc: str = "DDIM",
    progress: bool = True,
    chunk_size: int | None = None,
    cache: tuple[int, int] | None = None,
    merging: TokenMerging | None = None,
    added_cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """DDIM with classifier-free guidance (T2V-Zero steps 2 and 5): x ((b f), c, h, w) at timesteps[0] → x one DDIM
    step below timesteps[−1], f = `cross_frame.num_frames` (1 without). With `chunk_size`, the UNet sees at most
    that many frames of each video at a time (`chunks.eps_by_chunks`).

    `cache` = (interval, branch): DeepCache's feature caching (`sd/deepcache.py`), a full UNet pass every
    `interval` steps of this loop, starting with its first, and branch `branch` alone in between. The caches live
    for this call only (one per chunk, `chunks.chunk_caches`): every loop starts on a full pass. `merging`: token
    merging in the UNet (`sd/tome.py`), one object for the whole generation (it carries the random stream).
    `added_cond`: SDXL's added conditioning (`TextConditioning.added_cond`), its rows following `context`'s."""
    unet_kwargs = loop_unet_kwargs(cache, merging)

    def predict_chunk(x: torch.Tensor, t: torch.Tensor, ids: list[int], frames: CrossFrame | None) -> torch.Tensor:
        return guided_eps(sd.unet, x, t, context, guidance_scale, cross_frame=frames, added_cond=added_cond,
                          **unet_kwargs(ids))
    return ddim_loop(x, scheduler, timesteps, eps_by_chunks(predict_chunk, cross_frame, chunk_size), generator,
                     step_callback, desc, progress)


def decode_images(sd: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (n, 4, h, w) → images (n, 3, 8h, 8w) in [0, 1]."""
    images = sd.vae.decode(latents / sd.vae.config.scaling_factor)
    return (images / 2 + 0.5).clamp(0, 1)


def decode_video(sd: StableDiffusion, latents: torch.Tensor, f: int) -> torch.Tensor:
    """T2V-Zero step 6: scaled latents ((b f), c, h, w) → frames (b, f, H, W, 3) in [0, 1] on the CPU, decoded one
    frame at a time so that memory does not grow with the video's length."""
    images = torch.cat([decode_images(sd, x[None]) for x in latents])
    return rearrange(images, "(b f) c h w -> b f h w c", f=f).float().cpu()
