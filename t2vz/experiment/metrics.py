"""What the ablations measure: the literature's CLIP score, textual faithfulness and frame consistency (`ClipScorer`,
computed as torchmetrics and Tune-A-Video compute them; docs/experiments.md), and model-free
temporal metrics (phase-correlation motion, motion-compensated warp error by one global translation, and Lai et
al.'s optical-flow warp error, `flow.py`) that need no CLIP weights; for
image-to-video, frame 1 against the picture it started from (`first_frame_error`, with its PSNR).

Frames are float tensors (f, h, w, 3) in [0, 1]. Metrics over frame pairs are means over an empty set for a
single frame and return NaN (no pair exists to measure); a video of one frame is neither consistent nor not.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .flow import flow_warp_error
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from t2vz.sd.text_encoder import MAX_TOKENS, load_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grayscale weights


def _check_frames(frames: torch.Tensor) -> torch.Tensor:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (f, h, w, 3) floats in [0, 1], got shape {tuple(frames.shape)}; "
                         "convert (f, 3, h, w) with frames.permute(0, 2, 3, 1)")
    if not frames.is_floating_point():
        raise ValueError(f"frames must be floats in [0, 1], got dtype {frames.dtype}; divide uint8 by 255")
    return frames


def toy_clip_dir() -> Path:
    """The toy CLIP's folder inside the package (`metrics.clip=toyworld`; trained by experiments/train_toy_clip.py)."""
    from importlib import resources

    return Path(str(resources.files("t2vz") / "data" / "clip" / "toyworld"))


def clip_image_processor(folder: str | Path | None, image_size: int):
    """CLIP's image preprocessing as the field computes it: transformers' PIL-based `CLIPImageProcessor` (resize the
    short side to `size` with PIL's bicubic filter, center crop, rescale by 1/255, normalise with CLIP's mean and
    std). It is what torchmetrics' `CLIPScore` calls through `CLIPProcessor`, and what transformers 4 used for every
    published CLIP score; transformers 5 calls it `CLIPImageProcessorPil` and would otherwise pick a torchvision
    backend whenever torchvision is installed, which resamples differently. The folder's own
    `preprocessor_config.json` where it has one, else CLIP's defaults at the model's `image_size`."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    if folder is not None and (Path(folder) / "preprocessor_config.json").is_file():
        return Processor.from_pretrained(str(folder))
    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                     image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


class ClipScorer:
    """A `transformers.CLIPModel` with its tokenizer and image processor: CLIP score, textual faithfulness and frame
    consistency of a video, computed as the literature computes them (docs/experiments.md, "Metrics").

    - `clip_score(frames, prompt)`: torchmetrics' `CLIPScore` (Hessel et al. 2021's scale) of the video's frames
      against the prompt, max(100 · mean_k cos(E_I(frame k), E_T(prompt)), 0): the text-to-video papers' "CLIP score"
      (Text2Video-Zero: 31.19 against CogVideo's 29.63, 25 prompts). tests/test_clip_score.py checks it equals
      torchmetrics' on the same frames;
    - `textual_faithfulness(frames, edit_prompt)`: the same score against the edited prompt (Tune-A-Video's
      "textual faithfulness", Wu et al. 2023);
    - `frame_consistency(frames)`: 100 · the mean cosine between CLIP image embeddings of all pairs of frames
      (Tune-A-Video's "frame consistency"), and of consecutive pairs (FateZero's evaluation, Qi et al. 2023).

    Frames are scored as the uint8 pictures a video file holds (`video_io.to_uint8`), as a user scoring the written
    video would. `name` is recorded with every number (the CLIP model used).
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, name: str, processor=None, batch_size: int = 32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.image_size = model.config.vision_config.image_size
        self.processor = processor if processor is not None else clip_image_processor(None, self.image_size)
        self.max_tokens = min(MAX_TOKENS, model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        name: str | None = None) -> "ClipScorer":
        """Load a CLIPModel folder (or hub id) in fp32: its own tokenizer if the folder has one, else t2vz's shipped
        one; its own preprocessor_config.json if it has one, else CLIP's defaults. `name` (default: the path) is
        what metrics.json and reports record."""
        model = CLIPModel.from_pretrained(str(name_or_path)).float().to(device)
        folder = Path(name_or_path)
        has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
        tokenizer = load_tokenizer(folder if has_tokenizer else None)
        processor = clip_image_processor(folder if folder.is_dir() else None, model.config.vision_config.image_size)
        return cls(model, tokenizer, name=name or str(name_or_path), processor=processor)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """(f, h, w, 3) floats in [0, 1] → pixel values (f, 3, s, s): the frames as uint8 pictures (round(255 · x)),
        through the image processor (`clip_image_processor`)."""
        from t2vz.video_io import to_uint8

        pictures = list(to_uint8(_check_frames(frames)))
        return self.processor(images=pictures, return_tensors="pt")["pixel_values"]

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def image_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """(f, h, w, 3) in [0, 1] → L2-normalised CLIP image embeddings (f, d), in batches of `batch_size`."""
        chunks = []
        for batch in _check_frames(frames).split(self.batch_size):
            pixels = self.preprocess(batch).to(self.device, self.model.dtype)
            chunks.append(self._pooled(self.model.get_image_features(pixel_values=pixels)).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str] | str) -> torch.Tensor:
        """n prompts → L2-normalised CLIP text embeddings (n, d): padded to the longest of a batch with an attention
        mask and truncated to the model's positions, as `CLIPProcessor(text=..., padding=True)` does."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        chunks = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[i:i + self.batch_size], padding=True, max_length=self.max_tokens,
                                    truncation=True, return_tensors="pt")
            out = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                               attention_mask=tokens.attention_mask.to(self.device))
            chunks.append(self._pooled(out).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    def frame_scores(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        """100 · cos(E_I(frame k), E_T(prompt)) of every frame: (f, h, w, 3) → (f,), unclamped."""
        return 100.0 * (self.image_embeddings(frames) @ self.text_embeddings([prompt]).T)[:, 0]

    def clip_score(self, frames: torch.Tensor, prompt: str) -> float:
        """max(mean_k 100 · cos(E_I(frame k), E_T(prompt)), 0): torchmetrics' `CLIPScore` updated with the f frames,
        each paired with the prompt (it clamps the mean, not each frame)."""
        return max(self.frame_scores(frames, prompt).mean().item(), 0.0)

    def textual_faithfulness(self, frames: torch.Tensor, edit_prompt: str) -> float:
        """Tune-A-Video's textual faithfulness: the CLIP score of all frames of the edited video against the edited
        prompt (`clip_score`)."""
        return self.clip_score(frames, edit_prompt)

    def frame_consistency(self, frames: torch.Tensor) -> dict[str, float]:
        """100 · the mean cosine between CLIP image embeddings of frame pairs, (f, h, w, 3) → two floats:

        - `frame_consistency`: over all pairs i < j (Tune-A-Video, Wu et al. 2023; 92.40 for theirs);
        - `frame_consistency_consecutive`: over pairs (i, i+1) (FateZero's evaluation script, Qi et al. 2023).

        A single frame has no pairs: both are NaN.
        """
        e = self.image_embeddings(frames)
        cos = e @ e.T  # (f, f)
        i, j = torch.triu_indices(len(e), len(e), offset=1)
        nan = float("nan")
        return {
            "frame_consistency": 100.0 * cos[i, j].mean().item() if len(e) > 1 else nan,
            "frame_consistency_consecutive": 100.0 * cos.diagonal(offset=1).mean().item() if len(e) > 1 else nan,
        }


# ---- model-free temporal metrics ---------------------------------------------------------------------------

def _gray(frame: torch.Tensor) -> torch.Tensor:
    """(h, w, 3) or (h, w) → (h, w) float64 luma."""
    frame = frame.double()
    return frame if frame.ndim == 2 else frame @ frame.new_tensor(LUMA)


def _parabolic_offset(c_minus: float, c0: float, c_plus: float) -> float:
    """Vertex of the parabola through (−1, c_minus), (0, c0), (1, c_plus): the sub-pixel peak offset."""
    denom = c_minus - 2.0 * c0 + c_plus
    return 0.5 * (c_minus - c_plus) / denom if denom < 0 else 0.0


def _overlap(a: torch.Tensor, b: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The regions of a and b that correspond under b(y, x) = a(y − dy, x − dx): two equal-size crops."""
    h, w = a.shape[:2]
    return (a[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)],
            b[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)])


def phase_correlation(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """One pass of phase correlation (Kuglin & Hines 1975) on gray (h, w) float64 frames → (dy, dx).

    Mean-subtract and Hann-window both; the peak of ifft(Fb · conj(Fa) / (|Fb · conj(Fa)| + ε)) sits at the
    shift, refined per axis by a parabola through its neighbours, wrapped into [−h/2, h/2) × [−w/2, w/2).
    ε = 0.1 · mean magnitude regularises the whitening: frequencies the frames do not contain (smooth content)
    would otherwise contribute pure noise with full weight.
    """
    h, w = a.shape
    window = torch.outer(torch.hann_window(h, periodic=False, dtype=a.dtype),
                         torch.hann_window(w, periodic=False, dtype=a.dtype))
    fa = torch.fft.fft2((a - a.mean()) * window)
    fb = torch.fft.fft2((b - b.mean()) * window)
    cross = fb * fa.conj()
    corr = torch.fft.ifft2(cross / (cross.abs() + 0.1 * cross.abs().mean() + 1e-30)).real  # (h, w)
    py, px = divmod(int(corr.argmax()), w)
    c = lambda y, x: corr[y % h, x % w].item()  # noqa: E731
    dy = py + _parabolic_offset(c(py - 1, px), c(py, px), c(py + 1, px))
    dx = px + _parabolic_offset(c(py, px - 1), c(py, px), c(py, px + 1))
    return float(dy - h if dy >= h / 2 else dy), float(dx - w if dx >= w / 2 else dx)


def global_translation(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The global shift (dy, dx) in pixels with b(y, x) ≈ a(y − dy, x − dx); a, b: (h, w, 3) or (h, w).

    Sign convention: content moving right (down) from a to b gives positive dx (dy). Two passes of
    `phase_correlation`: the whole frames give the integer shift; the overlapping crops, aligned by it, give
    the sub-pixel residual. The fixed window pulls a one-pass estimate towards zero (0.1–0.2 px on 64 px frames);
    on the aligned crops the residual, and with it the pull, is small (≤ 0.1 px in tests/test_metrics.py).
    """
    ga, gb = _gray(a), _gray(b)
    if ga.shape != gb.shape:
        raise ValueError(f"frames must have the same size, got {tuple(a.shape)} and {tuple(b.shape)}")
    dy, dx = (round(d) for d in phase_correlation(ga, gb))
    ca, cb = _overlap(ga, gb, dy, dx)
    if min(ca.shape) < 8:  # too little overlap to refine
        return float(dy), float(dx)
    ry, rx = phase_correlation(ca, cb)
    return dy + ry, dx + rx


def measured_motion(frames: torch.Tensor) -> torch.Tensor:
    """(f, h, w, 3) → (f − 1, 2): the global translation (dy, dx) from frame k to frame k + 1."""
    frames = _check_frames(frames)
    shifts = [global_translation(frames[k], frames[k + 1]) for k in range(len(frames) - 1)]
    return torch.tensor(shifts, dtype=torch.float32).reshape(-1, 2)


def frame_difference(frames: torch.Tensor) -> float:
    """Naive temporal baseline: mean |frame_{k+1} − frame_k| over pixels, channels and consecutive pairs."""
    frames = _check_frames(frames)
    if len(frames) < 2:
        return float("nan")
    return (frames[1:] - frames[:-1]).abs().mean().item()


def _aligned_difference(a: torch.Tensor, b: torch.Tensor, dy: int, dx: int) -> float:
    """mean |b(y, x) − a(y − dy, x − dx)| over the region where both exist; a, b: (h, w, 3)."""
    a_part, b_part = _overlap(a, b, dy, dx)
    return (b_part - a_part).abs().mean().item() if a_part.numel() else float("nan")


def warp_error(frames: torch.Tensor) -> float:
    """Motion-compensated frame difference: mean |frame_{k+1} − shift(frame_k, measured translation)| over the
    overlap (translation rounded to whole pixels), averaged over consecutive pairs. (f, h, w, 3) → float.

    Near 0 for a video whose frames differ only by a global translation, unlike `frame_difference`."""
    frames = _check_frames(frames)
    if len(frames) < 2:
        return float("nan")
    motion = measured_motion(frames).round().long().tolist()
    errors = [_aligned_difference(frames[k], frames[k + 1], dy, dx) for k, (dy, dx) in enumerate(motion)]
    return sum(errors) / len(errors)


def video_metrics(frames: torch.Tensor, prompt: str, scorer: ClipScorer | None = None) -> dict[str, float]:
    """Every metric in one flat dict: the model-free ones always (`warp_error` by one global translation,
    `flow_warp_error` by optical flow), the CLIP ones only when a scorer is given."""
    frames = _check_frames(frames)
    motion = measured_motion(frames)
    nan = float("nan")
    metrics = {
        "warp_error": warp_error(frames),
        "flow_warp_error": flow_warp_error(frames),  # Lai et al.'s, with DIS optical flow (`flow.py`)
        "frame_difference": frame_difference(frames),
        "motion_dy_mean": motion[:, 0].mean().item() if len(motion) else nan,
        "motion_dx_mean": motion[:, 1].mean().item() if len(motion) else nan,
    }
    if scorer is not None:
        metrics["clip_score"] = scorer.clip_score(frames, prompt)
        metrics.update(scorer.frame_consistency(frames))
    return metrics


def first_frame_error(frames: torch.Tensor, image: torch.Tensor) -> dict[str, float]:
    """Image-to-video: how closely frame 1 reproduces the picture it was inverted from. `frames` (f, h, w, 3), or
    (b, f, h, w, 3) for a batch (frame 1 of every video, pooled), and the picture `image` (H, W, 3), floats in
    [0, 1]; the picture is resized to h × w as the pipeline resizes it (`video_io.resize_frames`). Returns
    `first_frame_error`, the mean |frame 1 − picture| on the 0..255 scale, and `first_frame_psnr`, the PSNR in dB,
    10 · log10(255² / MSE) (inf for identical images)."""
    from t2vz.video_io import resize_frames

    first = _check_frames(frames[:, 0] if frames.ndim == 5 else frames[:1]).double()
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (h, w, 3) floats in [0, 1], got shape {tuple(image.shape)}")
    picture = resize_frames(image[None].float(), tuple(first.shape[1:3]))[0].double().to(first.device)
    difference = (first - picture) * 255.0
    mse = difference.square().mean().item()
    return {"first_frame_error": difference.abs().mean().item(),
            "first_frame_psnr": 10.0 * math.log10(255.0**2 / mse) if mse > 0 else float("inf")}
