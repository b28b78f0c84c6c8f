"""Train the toy CLIP: a small `transformers.CLIPModel`, contrastively, on the toy world's captioned renders.

    1. data    render `data.num_images` captioned scenes (`world.scene_for_index`, held-out combinations excluded,
               as the toy model's data); in a share `data.moved` of them the objects are moved as in a frame of
               `world.render_video`, some partly out of the picture, as the method's warped videos show them
    2. train   symmetric InfoNCE with a learned temperature (Radford et al. 2021, Fig. 3), every image against
               every caption of the batch; the toy world has few captions, so a batch holds the same scene
               description many times, and all of an image's captions that describe it (same background and
               objects, in either order) share the target's mass instead of counting as negatives. Each batch is
               degraded towards what the toy diffusion model draws (`augment`: translation with edge or mirror
               padding, Gaussian blur, mild colour jitter, additive noise, uint8 rounding), colours kept
               recognisable because the captions name them
    3. export  fp16 `model.safetensors` + `config.json` (`CLIPModel.save_pretrained`), the image preprocessing
               (`CLIPImageProcessor`: 64 px, CLIP's mean and std) and `t2vz_clip.json` (command, config, seed,
               versions, threads, CPU, seconds per stage, and the zero-shot accuracies of the exported folder on
               renders the training never saw), written into a temporary folder and renamed into place

The scorer (`t2vz.experiment.metrics`) loads the folder with `CLIPModel.from_pretrained(folder).float()` and
`clip_image_processor(folder)` (the PIL `CLIPImageProcessor` from its preprocessor_config.json) and tokenizes with
t2vz's shipped CLIP tokenizer; the validation here goes through the same calls. Checkpoints go to `workdir`
(atomically, every `checkpoint_every` steps) and a re-run resumes. Entry point: `experiments/train_toy_clip.py`; the
shipped folder: `shipped_clip_dir()`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..experiment.config import TOY_CLIP
from ..experiment.metrics import CLIP_MEAN, CLIP_STD, clip_image_processor, toy_clip_dir
from ..experiment.tracking import LoggerConfig, Tracker
from ..sd.model_folder import write_atomically
from ..sd.text_encoder import MAX_TOKENS, load_tokenizer
from . import world
from .training import load_checkpoint, lr_at, save_atomic

SHIPPED_CLIP = TOY_CLIP  # "toyworld": metrics.clip's default
PROVENANCE_FILE = "t2vz_clip.json"
VOCAB_SIZE = 49408  # the shipped CLIP tokenizer's
# CLIP_MEAN, CLIP_STD: CLIP's image normalisation (OpenAI CLIP; transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD,
# CLIPImageProcessor's defaults), which the exported preprocessor_config.json keeps.


def shipped_clip_dir(name: str = SHIPPED_CLIP) -> Path:
    """The toy CLIP folder inside the package (t2vz/data/clip/NAME; `metrics.toy_clip_dir` for the shipped one)."""
    return toy_clip_dir().parent / name


# ---- the recipe ---------------------------------------------------------------------------------------------------

@dataclass
class ClipDataConfig:
    num_images: int = 20000
    seed: int = 0  # scene i is world.scene_for_index(seed, i)
    moved: float = 0.25  # share of scenes whose objects are moved (a render_video frame), possibly partly outside
    workers: int = 2  # rendering processes (the images do not depend on it)


@dataclass
class ClipVisionConfig:
    image_size: int = 64  # the toy world's size
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4


@dataclass
class ClipTextConfig:
    # The 49408-token embedding is most of the model: at width 32 it is 1.58M of the 1.83M parameters.
    hidden_size: int = 32
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = MAX_TOKENS


@dataclass
class AugmentConfig:
    """Each degradation is applied to a sample with its probability, with a strength drawn uniformly up to its
    maximum; a maximum of 0 switches it off, `enabled=False` all of them. Colours and intensities in [0, 1]."""

    enabled: bool = True
    shift: int = 10  # largest translation in pixels (each axis); the border filled by edge or mirror padding
    shift_prob: float = 0.5
    reflect: float = 0.5  # share of batches whose shifts mirror the border (the method's warp) rather than repeat it
    blur_sigma: float = 1.5  # largest Gaussian blur σ in pixels
    blur_prob: float = 0.5
    jitter: float = 0.08  # largest brightness and contrast change (×1 ± jitter) and per-channel offset (± jitter/2)
    jitter_prob: float = 0.5
    noise_std: float = 0.05  # largest standard deviation of additive Gaussian noise
    noise_prob: float = 0.5


@dataclass
class ClipEvalConfig:
    """The validation written into t2vz_clip.json: renders from `seed` (never the training's), single objects."""

    seed: int = 1
    num_images: int = 200  # single-object scenes of scene_for_index(seed, ·), held-out combinations allowed
    per_held_out: int = 8  # renders of each world.HELD_OUT combination
    blur_sigma: float = 1.0  # the degraded copy: Gaussian blur of this σ,
    noise_std: float = 0.05  # then additive noise of this standard deviation


@dataclass
class ClipTrainConfig:
    workdir: str = "runs/toy_clip"  # the rendered dataset and the checkpoint; re-running resumes from here
    out: str = "t2vz/data/clip/toyworld"  # the exported CLIP folder
    seed: int = 0  # the initialisation, batches and augmentations
    threads: int = 2  # torch.set_num_threads; 0 leaves PyTorch's default
    # The shipped folder: 2000 steps of 256 took 619.5 s (Intel Xeon, 2 cores, 2 threads, torch 2.13.0+cpu, other
    # jobs beside it); after 1500 steps on 6000 images the shape was right in 0.95 of the held-out renders
    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3  # peak; linear warm-up over `warmup` steps, then cosine decay to 0
    warmup: int = 100
    weight_decay: float = 0.05  # AdamW, on the weight matrices (not embeddings, norms, biases, the temperature)
    temperature_init: float = 0.07  # CLIP's; learned as log(1/τ), capped at 1/τ = 100 as CLIP
    projection_dim: int = 64
    checkpoint_every: int = 200
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    vision: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: ClipEvalConfig = field(default_factory=ClipEvalConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode="offline"))
    progress: bool = True


def check_config(cfg: ClipTrainConfig) -> None:
    """Refuse settings that cannot train, with the setting's name: before anything is rendered."""
    def whole(name, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")

    def number(name, value, low, high, low_open=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < low or value > high or (low_open and value == low):
            bound = f"in ({low}, {high}]" if low_open else f"in [{low}, {high}]"
            raise ValueError(f"{name}={value!r} must be a number {bound}")

    whole("threads", cfg.threads, 0)
    whole("steps", cfg.steps, 0)
    whole("batch_size", cfg.batch_size, 2)
    whole("warmup", cfg.warmup, 0)
    whole("checkpoint_every", cfg.checkpoint_every, 1)
    whole("projection_dim", cfg.projection_dim, 1)
    number("lr", cfg.lr, 0, 1, low_open=True)
    number("weight_decay", cfg.weight_decay, 0, 1)
    number("temperature_init", cfg.temperature_init, 0.01, 1)
    whole("data.num_images", cfg.data.num_images, 2)
    whole("data.workers", cfg.data.workers, 1)
    number("data.moved", cfg.data.moved, 0, 1)
    v, t = cfg.vision, cfg.text
    if v.image_size != world.SIZE:
        raise ValueError(f"vision.image_size={v.image_size!r}: the toy world is drawn at {world.SIZE}×{world.SIZE}")
    whole("vision.patch_size", v.patch_size, 1)
    if v.image_size % v.patch_size:
        raise ValueError(f"vision.patch_size={v.patch_size!r} must divide vision.image_size={v.image_size}")
    for prefix, c in (("vision", v), ("text", t)):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            whole(f"{prefix}.{name}", getattr(c, name), 1)
        if c.hidden_size % c.num_attention_heads:
            raise ValueError(f"{prefix}.num_attention_heads={c.num_attention_heads} must divide "
                             f"{prefix}.hidden_size={c.hidden_size}")
    whole("text.max_position_embeddings", t.max_position_embeddings, 2)
    a = cfg.augment
    whole("augment.shift", a.shift, 0)
    if a.shift >= v.image_size // 2:
        raise ValueError(f"augment.shift={a.shift} must be below half the image ({v.image_size // 2} px)")
    for name in ("shift_prob", "reflect", "blur_prob", "jitter_prob", "noise_prob"):
        number(f"augment.{name}", getattr(a, name), 0, 1)
    number("augment.blur_sigma", a.blur_sigma, 0, 5)
    number("augment.jitter", a.jitter, 0, 0.5)
    number("augment.noise_std", a.noise_std, 0, 0.5)
    e = cfg.eval
    whole("eval.seed", e.seed, 0)
    if e.seed == cfg.data.seed:
        raise ValueError(f"eval.seed={e.seed} is data.seed: the validation must use scenes the training never saw")
    whole("eval.num_images", e.num_images, 0)
    whole("eval.per_held_out", e.per_held_out, 0)
    if e.num_images + e.per_held_out == 0:
        raise ValueError("eval.num_images and eval.per_held_out are both 0: the folder would ship unvalidated")
    number("eval.blur_sigma", e.blur_sigma, 0, 5)
    number("eval.noise_std", e.noise_std, 0, 0.5)


def clip_config(cfg: ClipTrainConfig):
    """The transformers CLIPConfig of the recipe: the shipped tokenizer's vocabulary and end-of-text token."""
    from transformers import CLIPConfig

    text = dict(vocab_size=VOCAB_SIZE, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, **dataclasses.asdict(cfg.text))
    vision = dict(num_channels=3, hidden_act="quick_gelu", **dataclasses.asdict(cfg.vision))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim,
                      logit_scale_init_value=math.log(1.0 / cfg.temperature_init))


# ---- stage 1: data ------------------------------------------------------------------------------------------------

def moved(scene: world.Scene, dx: float, dy: float) -> world.Scene:
    """The scene with every object displaced by (dx, dy) over its still background: frame 1 of
    `world.render_video(scene, 2, (dx, dy))`."""
    return dataclasses.replace(scene, things=tuple(dataclasses.replace(t, cx=t.cx + dx, cy=t.cy + dy)
                                                   for t in scene.things))


def training_scene(cfg: ClipDataConfig, index: int) -> world.Scene:
    """Scene `index` of the dataset: `world.scene_for_index`, and with probability `moved` its objects displaced
    so that their centres stay inside the picture (from 2 to 62 px): some partly outside, none gone."""
    scene = world.scene_for_index(cfg.seed, index)
    rng = np.random.default_rng([cfg.seed, index, 7])  # its own stream: the scene is the toy model's scene i
    if rng.random() >= cfg.moved:
        return scene
    xs, ys = [t.cx for t in scene.things], [t.cy for t in scene.things]
    lo, hi = 2.0, world.SIZE - 2.0
    dx = rng.uniform(lo - min(xs), hi - max(xs))
    dy = rng.uniform(lo - min(ys), hi - max(ys))
    return moved(scene, float(dx), float(dy))


def positive_key(scene: world.Scene) -> str:
    """What a caption says about the scene, order aside: captions of one key describe the same picture."""
    return scene.background + "|" + "+".join(sorted(f"{t.colour} {t.shape}" for t in scene.things))


def _render_range(cfg: ClipDataConfig, start: int, stop: int):
    images = np.empty((stop - start, world.SIZE, world.SIZE, 3), np.uint8)
    captions, keys = [], []
    for j, i in enumerate(range(start, stop)):
        scene = training_scene(cfg, i)
        images[j] = world.render(scene)
        captions.append(scene.caption)
        keys.append(positive_key(scene))
    return images, captions, keys


def dataset_key(cfg: ClipDataConfig) -> str:
    """Seed, size, moved share and a hash of the first scenes as the world now renders them: the cache and the
    checkpoint carry it, so a changed world is never trained on stale images."""
    images, captions, _ = _render_range(cfg, 0, min(8, cfg.num_images))
    digest = hashlib.sha1(images.tobytes())
    digest.update("\n".join(captions).encode())
    return f"{cfg.seed}_{cfg.num_images}_{cfg.moved:g}_{digest.hexdigest()[:10]}"


def build_dataset(cfg: ClipDataConfig, workdir: Path, key: str, progress: bool = True
                  ) -> tuple[np.ndarray, list[str], list[str]]:
    """Render (or read the cached) images (n, 64, 64, 3) uint8, their captions and `positive_key`s."""
    cache = workdir / f"clip_data_{key}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return f["images"], [str(c) for c in f["captions"]], [str(k) for k in f["keys"]]
    n, chunk = cfg.num_images, 500
    ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    images = np.empty((n, world.SIZE, world.SIZE, 3), np.uint8)
    captions, keys = [None] * n, [None] * n
    bar = tqdm(total=n, desc="rendering the toy world", disable=not progress)

    def put(start, result):
        imgs, caps, ks = result
        images[start:start + len(imgs)] = imgs
        captions[start:start + len(imgs)], keys[start:start + len(imgs)] = caps, ks
        bar.update(len(imgs))

    if cfg.workers == 1:
        for start, stop in ranges:
            put(start, _render_range(cfg, start, stop))
    else:
        with ProcessPoolExecutor(cfg.workers) as pool:
            for (start, _), result in zip(ranges, pool.map(_render_range, [cfg] * len(ranges),
                                                           *zip(*ranges))):
                put(start, result)
    bar.close()
    tmp = cache.with_name(f".{cache.stem}.partial.npz")
    np.savez(tmp, images=images, captions=np.array(captions), keys=np.array(keys))
    tmp.replace(cache)
    return images, captions, keys


# ---- augmentation -------------------------------------------------------------------------------------------------

def translate(x: torch.Tensor, shifts: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    """x (b, c, h, w) with sample i moved by shifts[i] = (dx, dy) whole pixels (|d| <= pad), the uncovered border
    filled by `mode` padding ("replicate": the edge repeated, "reflect": mirrored)."""
    if pad == 0:
        return x
    b, c, h, w = x.shape
    p = F.pad(x, (pad, pad, pad, pad), mode=mode)
    rows = (pad - shifts[:, 1])[:, None] + torch.arange(h)
    cols = (pad - shifts[:, 0])[:, None] + torch.arange(w)
    return p[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x (b, c, h, w) blurred by a separable Gaussian of σ = sigma[i] pixels per sample (0: unchanged), truncated
    at 3σ of the largest, edges repeated."""
    top = float(sigma.max())
    if top <= 0:
        return x
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * top))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp(min=1e-6)[:, None]
    k = torch.exp(-t[None] ** 2 / (2 * s ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b·c, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Degrade a batch (b, 3, h, w) in [0, 1] towards the toy diffusion model's frames, every draw from `gen`:
    shift, blur, colour jitter, noise (each per sample with its probability), then rounding to uint8 levels."""
    b = x.shape[0]
    if not cfg.enabled:
        return x

    def strength(prob: float, top: float, shape=()) -> torch.Tensor:
        on = (torch.rand(b, generator=gen) < prob).to(x.dtype)
        return torch.rand((b, *shape), generator=gen) * top * on.view(b, *([1] * len(shape)))

    if cfg.shift > 0:
        on = torch.rand(b, generator=gen) < cfg.shift_prob
        shifts = torch.randint(-cfg.shift, cfg.shift + 1, (b, 2), generator=gen) * on[:, None]
        mode = "reflect" if float(torch.rand((), generator=gen)) < cfg.reflect else "replicate"
        x = translate(x, shifts, cfg.shift, mode)
    if cfg.blur_sigma > 0:
        x = gaussian_blur(x, strength(cfg.blur_prob, cfg.blur_sigma))
    if cfg.jitter > 0:
        amount = strength(cfg.jitter_prob, 1.0, (5,))  # brightness, contrast, three channel offsets
        sign = torch.rand((b, 5), generator=gen) * 2 - 1
        d = (amount * sign * cfg.jitter).to(x.dtype)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (1 + d[:, 1]).view(b, 1, 1, 1) + mean
        x = x * (1 + d[:, 0]).view(b, 1, 1, 1) + (d[:, 2:] / 2).view(b, 3, 1, 1)
    if cfg.noise_std > 0:
        std = strength(cfg.noise_prob, cfg.noise_std)
        x = x + torch.randn(x.shape, generator=gen) * std.view(b, 1, 1, 1)
    return torch.round(x.clamp(0, 1) * 255) / 255


def degrade(images: np.ndarray, blur_sigma: float, noise_std: float, seed: int = 0) -> np.ndarray:
    """uint8 images (n, h, w, 3) blurred (σ pixels) and noised (standard deviation in [0, 1] units), uint8 again:
    the validation's stand-in for generated frames."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = gaussian_blur(x, torch.full((len(x),), float(blur_sigma)))
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * noise_std
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def normalise(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, h, w) in [0, 1] → CLIP's pixel values, as CLIPImageProcessor makes them from uint8 at 64 px."""
    return (x - x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)) / x.new_tensor(CLIP_STD).view(1, 3, 1, 1)


# ---- stage 2: contrastive training --------------------------------------------------------------------------------

def embeddings(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image (b, d) and text (n, d) embeddings: each tower's pooled output through its projection."""
    image = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
    text = model.text_projection(model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor
                     ) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of (image, caption) pairs: cross-entropy of each image over the captions
    and of each caption over the images, logits s·cos (Radford et al. 2021). Pairs whose `groups` are equal say
    the same thing, so the target spreads evenly over them (with distinct groups: CLIP's identity target)."""
    logits = logit_scale.exp() * image @ text.T
    same = (groups[:, None] == groups[None, :]).to(logits.dtype)
    target = same / same.sum(1, keepdim=True)  # symmetric in which image and which caption: one target for both
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean())


def tokenize(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded to the longest caption (the end-of-text token, as CLIP's causal
    text model pools at the first end-of-text, is unaffected by the padding after it)."""
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


def recipe_fingerprint(cfg: ClipTrainConfig) -> str:
    """What the checkpoint's weights depend on, besides the data: resuming under another recipe is refused."""
    keys = ("seed", "steps", "batch_size", "lr", "warmup", "weight_decay", "temperature_init", "projection_dim",
            "vision", "text", "augment")
    d = dataclasses.asdict(cfg)
    return hashlib.sha1(json.dumps({k: d[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:12]


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the linear and convolution weights only."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_clip(cfg: ClipTrainConfig, images: np.ndarray, captions: list[str], keys: list[str], data: str,
               workdir: Path, tracker: Tracker):
    """Stage 2. Returns the trained CLIPModel (fp32, eval mode). Resumes from `workdir/clip.pt` (the same data
    and recipe only) with the optimiser and the random stream where they stopped."""
    from transformers import CLIPModel

    path = workdir / "clip.pt"
    fingerprint = recipe_fingerprint(cfg)
    torch.manual_seed(cfg.seed * 1000 + 11)
    model = CLIPModel(clip_config(cfg))
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 12)
    step = 0
    state = load_checkpoint(path)
    if state is not None:
        if state.get("data") != data or state.get("recipe") != fingerprint:
            what = "dataset" if state.get("data") != data else "recipe (model, steps, batch, lr or augmentation)"
            raise ValueError(f"{path} was trained with another {what}: train in a new workdir=..., or delete "
                             f"{path} to start again")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step = int(state["step"])
    ids, mask = tokenize(load_tokenizer(), captions)
    names = {k: i for i, k in enumerate(sorted(set(keys)))}
    groups = torch.tensor([names[k] for k in keys])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8, (n, 3, h, w)
    b = cfg.batch_size
    bar = tqdm(total=cfg.steps, initial=step, desc="training the toy CLIP", disable=not cfg.progress)
    model.train()
    while step < cfg.steps:
        idx = torch.randint(len(pixels), (b,), generator=gen)
        x = normalise(augment(pixels[idx].float() / 255, cfg.augment, gen))
        image, text = embeddings(model, x, ids[idx], mask[idx])
        loss = contrastive_loss(image, text, model.logit_scale, groups[idx])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))  # CLIP's cap on 1/τ
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", inv_temp=f"{model.logit_scale.exp().item():.1f}")
        if step % 50 == 0:
            tracker.log_metrics({"clip/loss": loss.item(), "clip/inverse_temperature": model.logit_scale.exp().item(),
                                 "clip/lr": opt.param_groups[0]["lr"], "clip/step": step})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "generator": gen.get_state(), "data": data, "recipe": fingerprint}, path)
    bar.close()
    return model.eval().requires_grad_(False)


# ---- validation ---------------------------------------------------------------------------------------------------

Label = tuple[str, str, str]  # (colour, shape, background kind)


def held_out_renders(seed: int, per_combination: int) -> tuple[np.ndarray, list[Label]]:
    """`per_combination` renders of each `world.HELD_OUT` combination (never in any training data), scenes drawn
    from the streams (seed, 1_000_000 + k, j)."""
    images, labels = [], []
    for k, (colour, shape, background) in enumerate(world.HELD_OUT):
        for j in range(per_combination):
            rng = np.random.default_rng([seed, 1_000_000 + k, j])
            scene = world.sample_scene(rng, seed=int(rng.integers(2 ** 31)), allow_held_out=True,
                                       background=background, things=[(colour, shape)])
            images.append(world.render(scene))
            labels.append((colour, shape, background))
    return np.stack(images) if images else np.empty((0, world.SIZE, world.SIZE, 3), np.uint8), labels


def new_renders(seed: int, num: int) -> tuple[np.ndarray, list[Label]]:
    """The first `num` single-object scenes of `world.scene_for_index(seed, ·)`, held-out combinations allowed."""
    images, labels, i = [], [], 0
    while len(images) < num:
        scene = world.scene_for_index(seed, i, allow_held_out=True)
        i += 1
        if len(scene.things) == 1:
            images.append(world.render(scene))
            labels.append((scene.things[0].colour, scene.things[0].shape, scene.background))
    return np.stack(images) if images else np.empty((0, world.SIZE, world.SIZE, 3), np.uint8), labels


def single_object_captions() -> list[Label]:
    """Every single-object caption's (colour, shape, background): 5 × 4 × 5 = 100."""
    return [(c, s, b) for c in world.OBJECT_COLOURS for s in world.SHAPES for b in world.BACKGROUNDS]


def load_clip(folder: str | Path):
    """The CLIP folder as the scorer loads it: `CLIPModel.from_pretrained(folder).float()` (eval mode) and its
    preprocessor_config.json through `metrics.clip_image_processor` (transformers' PIL CLIPImageProcessor)."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(folder)).float().eval()
    return model, clip_image_processor(folder, model.config.vision_config.image_size)


@torch.no_grad()
def similarities(model, processor, tokenizer, images: np.ndarray, captions: list[str]) -> torch.Tensor:
    """100 · cos(image, caption) (n_images, n_captions): pixels from `processor` on the uint8 images, captions
    padded to the longest with an attention mask (the scorer's calls)."""
    pixels = processor(images=list(images), return_tensors="pt").pixel_values
    ids, mask = tokenize(tokenizer, captions)
    image, text = [], None
    for i in range(0, len(pixels), 256):
        e, text = embeddings(model, pixels[i:i + 256].to(model.dtype), ids, mask)
        image.append(e)
    return 100.0 * torch.cat(image).float() @ text.float().T


def zero_shot_accuracies(model, processor, tokenizer, images: np.ndarray, labels: list[Label]) -> dict[str, float]:
    """How often the image's own caption scores highest among the captions that differ from it only in the colour
    (5 candidates, chance 0.2), only in the shape (4, chance 0.25), only in the background (5, chance 0.2), and
    among all 100 single-object captions ("all", chance 0.01)."""
    options = single_object_captions()
    index = {o: i for i, o in enumerate(options)}
    scores = similarities(model, processor, tokenizer, images,
                          [world.caption(b, [(c, s)]) for c, s, b in options])
    right = {"colour": 0, "shape": 0, "background": 0, "all": 0}
    for row, (c, s, b) in zip(scores, labels):
        for name, candidates in (("colour", [(c2, s, b) for c2 in world.OBJECT_COLOURS]),
                                 ("shape", [(c, s2, b) for s2 in world.SHAPES]),
                                 ("background", [(c, s, b2) for b2 in world.BACKGROUNDS])):
            picked = candidates[int(row[[index[o] for o in candidates]].argmax())]
            right[name] += picked == (c, s, b)
        right["all"] += options[int(row.argmax())] == (c, s, b)
    return {k: round(v / max(len(labels), 1), 4) for k, v in right.items()} | {"images": len(labels)}


def validate(folder: Path, trained, cfg: ClipEvalConfig) -> dict:
    """The exported folder's zero-shot accuracies on renders the training never saw, clean and degraded
    (`degrade`), and the largest |Δ score| between it (fp16 on disk, loaded then .float()) and the fp32 model
    that was trained."""
    model, processor = load_clip(folder)
    tokenizer = load_tokenizer()
    sets = {"held_out_combinations": held_out_renders(cfg.seed, cfg.per_held_out),
            "new_scenes": new_renders(cfg.seed, cfg.num_images)}
    out = {"eval_seed": cfg.seed, "degraded": {"blur_sigma": cfg.blur_sigma, "noise_std": cfg.noise_std}}
    for name, (images, labels) in sets.items():
        if not labels:
            continue
        out[name] = {"clean": zero_shot_accuracies(model, processor, tokenizer, images, labels),
                     "degraded": zero_shot_accuracies(model, processor, tokenizer,
                                                      degrade(images, cfg.blur_sigma, cfg.noise_std, cfg.seed),
                                                      labels)}
    images = np.concatenate([s[0] for s in sets.values()])[:64]
    captions = [world.caption(b, [(c, s)]) for c, s, b in single_object_captions()]
    shipped = similarities(model, processor, tokenizer, images, captions)
    fp32 = similarities(trained, processor, tokenizer, images, captions)
    out["fp16_max_abs_score_difference"] = round(float((shipped - fp32).abs().max()), 4)
    return out


# ---- stage 3: export ----------------------------------------------------------------------------------------------

def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo, as lscpu shows it), or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def export(cfg: ClipTrainConfig, model, recipe: dict) -> Path:
    """Write `cfg.out` atomically: fp16 weights and config, the preprocessor, and t2vz_clip.json with `recipe`
    and the validation of the written weights (measured in the temporary folder, before the rename)."""
    def fill(tmp: Path) -> None:
        start = time.time()
        copy.deepcopy(model).half().save_pretrained(str(tmp))  # a copy: the fp32 model is validated against it
        clip_image_processor(None, cfg.vision.image_size).save_pretrained(str(tmp))  # 64 px, CLIP's mean, std
        recipe["validation"] = validate(tmp, model, cfg.eval)
        recipe["seconds"]["export_and_validation_s"] = round(time.time() - start, 1)
        recipe["seconds"]["total_s"] = round(sum(v for k, v in recipe["seconds"].items() if k != "total_s"), 1)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")

    return write_atomically(cfg.out, fill, overwrite=True)


def train(cfg: ClipTrainConfig, command: str, config_yaml: str | None = None) -> Path:
    """All stages; returns the exported folder. `config_yaml`: the resolved config as the entry point prints it
    (default: this dataclass as YAML)."""
    check_config(cfg)
    if config_yaml is None:
        from omegaconf import OmegaConf
        config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    with Tracker(cfg.logger, workdir, dataclasses.asdict(cfg), name="train_toy_clip", job_type="train") as tracker:
        start = time.time()
        data = dataset_key(cfg.data)
        images, captions, keys = build_dataset(cfg.data, workdir, data, cfg.progress)
        seconds["data_s"] = round(time.time() - start, 1)
        start = time.time()
        model = train_clip(cfg, images, captions, keys, data, workdir, tracker)
        seconds["train_s"] = round(time.time() - start, 1)
        recipe = {"command": command, "seed": cfg.seed, "config": config_yaml, "torch": torch.__version__,
                  "python": sys.version.split()[0], "threads": torch.get_num_threads(), "cpu": cpu_model_name(),
                  "parameters": sum(p.numel() for p in model.parameters()), "seconds": seconds}
        out = export(cfg, model, recipe)
        v = recipe["validation"]
        tracker.log_metrics({**{f"time/{k}": s for k, s in seconds.items()},
                             **{f"val/{name}/{kind}/{k}": x for name in ("held_out_combinations", "new_scenes")
                                if name in v for kind in ("clean", "degraded") for k, x in v[name][kind].items()}})
    return out
