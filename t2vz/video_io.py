"""Writing and reading images and videos. Every write is atomic: into a temporary file beside the target, then
one `os.replace`; on any failure neither a partial target nor the temporary file is left behind, and an existing
target is left unchanged.

Frames are `(f, h, w, 3)`: float tensors in [0, 1] or uint8 arrays. Formats: `.mp4` (H.264 via imageio-ffmpeg,
yuv420p) and `.gif` (imageio's pillow plugin; pillow is a dependency of imageio itself).
"""
from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np
import torch

VIDEO_FORMATS = ("mp4", "gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# x264 constant rate factor (0 lossless … 51 worst). On smooth images the RGB → yuv420p conversion alone costs
# ~1.2/255 mean |error|; crf 12 adds little to that and keeps fine texture.
MP4_CRF = 12


class VideoIOError(OSError, ValueError):
    """A file could not be written or read; the message names the path. Both an OSError and a ValueError."""


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """float (..., H, W, 3) in [0, 1] → uint8 array (..., H, W, 3)."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def atomic_path(path: Path):
    """A temporary path in the target's folder (same file system, so the final rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the permissions open() would
    return Path(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` to `path` atomically: a temporary file beside it, then one rename."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside `path`; on success rename it onto `path`; always remove it at the end.

    File-system failures (unwritable folder, a folder where the file should be, encoder I/O) become VideoIOError.
    """
    if path.is_dir():
        raise VideoIOError(f"cannot write {path}: it is a folder; give a file path")
    try:
        tmp = atomic_path(path)
    except OSError as e:
        raise VideoIOError(f"cannot write {path}: {e.strerror or e}; choose a writable folder") from e
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, VideoIOError):
            raise
        reason = e.strerror or str(e).strip().splitlines()[0]
        raise VideoIOError(f"cannot write {path}: {reason}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _as_frames(frames) -> torch.Tensor:
    """float tensor or uint8 array (f, h, w, 3) → float tensor (f, h, w, 3) in [0, 1]; ValueError on bad shapes."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    shape = tuple(frames.shape)
    if frames.ndim != 4 or shape[-1] != 3 or min(shape) == 0:
        raise ValueError(f"frames must have shape (F, H, W, 3) with F, H, W > 0, got {shape}")
    return frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], compressed: bool = False) -> Path:
    """`arrays` into an .npz at `path` (zip-deflated with `compressed`), written atomically."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        (np.savez_compressed if compressed else np.savez)(fh, **arrays)
    return path


def write_image(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """image (H, W, 3) float in [0, 1] → PNG at `path`, written atomically."""
    import imageio.v3 as iio

    path = Path(path)
    with atomic_file(path) as tmp:
        iio.imwrite(tmp, to_uint8(image), extension=".png")
    return path


def _encode_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    """uint8 (f, h, w, 3), h and w even → H.264 yuv420p mp4 at `path`."""
    import imageio_ffmpeg

    f, h, w, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None, macro_block_size=1,
        ffmpeg_log_level="error", output_params=["-crf", str(MP4_CRF), "-movflags", "+faststart"])
    writer.send(None)  # starts ffmpeg
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()  # waits for ffmpeg to finish the file (or stops it on failure)


def write_video(path: str | os.PathLike, frames, fps: float = 4.0) -> Path:
    """frames (f, h, w, 3) → `.mp4` or `.gif` at `path` (format from the suffix), written atomically.

    mp4: yuv420p needs even h and w, so an odd size is padded by repeating the last row / column (the file is
    then one pixel taller / wider). gif: 256-colour palette per frame, looping forever; pillow merges identical
    consecutive frames into one longer frame (plays the same, but reads back as fewer frames).
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"unsupported video suffix {path.suffix!r} in {path}; supported: "
                         f"{', '.join('.' + s for s in VIDEO_FORMATS)}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    video = to_uint8(_as_frames(frames))
    with atomic_file(path) as tmp:
        if fmt == "mp4":
            _, h, w, _ = video.shape
            video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            _encode_mp4(tmp, video, fps)
        else:
            import imageio.v3 as iio

            iio.imwrite(tmp, video, extension=".gif", plugin="pillow", duration=1000 / fps, loop=0)
    return path


def contact_sheet(frames, columns: int | None = None, pad: int = 2) -> torch.Tensor:
    """frames (f, h, w, 3) → one image (rows·h + (rows-1)·pad, cols·w + (cols-1)·pad, 3) float in [0, 1].

    Tiles row-major; `pad` white pixels between tiles (no outer border); unused cells of the last row are white.
    cols = `columns` (capped at f) or ceil(sqrt(f)); rows = ceil(f / cols).
    """
    frames = _as_frames(frames)
    f, h, w, _ = frames.shape
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    cols = min(columns, f) if columns else math.ceil(math.sqrt(f))
    rows = math.ceil(f / cols)
    sheet = frames.new_ones(rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3)
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        sheet[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = frame
    return sheet


def write_contact_sheet(path: str | os.PathLike, frames, columns: int | None = None) -> Path:
    """frames (f, h, w, 3) → contact-sheet PNG at `path` (see `contact_sheet`), written atomically."""
    return write_image(path, contact_sheet(frames, columns))


def write_outputs(folder: str | os.PathLike, frames, stem: str = "video", fps: float = 4.0,
                  formats: tuple[str, ...] = VIDEO_FORMATS) -> dict[str, Path]:
    """frames (f, h, w, 3) → `{stem}.{fmt}` for each format and `{stem}_sheet.png` in `folder` (created if missing).

    Returns {fmt: path, ..., "sheet": path}.
    """
    unknown = [fmt for fmt in formats if fmt not in VIDEO_FORMATS]
    if unknown:
        raise ValueError(f"unsupported formats {unknown}; supported: {list(VIDEO_FORMATS)}")
    frames, folder = _as_frames(frames), Path(folder)
    paths = {fmt: write_video(folder / f"{stem}.{fmt}", frames, fps) for fmt in formats}
    paths["sheet"] = write_contact_sheet(folder / f"{stem}_sheet.png", frames)
    return paths


def _read_ffmpeg(path: Path, max_frames: int | None) -> list[np.ndarray]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        w, h = next(reader)["size"]
        return [np.frombuffer(raw, np.uint8).reshape(h, w, 3) for raw in islice(reader, max_frames)]
    finally:
        reader.close()


def _read_folder(path: Path, max_frames: int | None) -> list[np.ndarray]:
    import imageio.v3 as iio

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    frames = [iio.imread(p, plugin="pillow", mode="RGB") for p in files[:max_frames]]
    for p, frame in zip(files, frames):
        if frame.shape != frames[0].shape:
            raise VideoIOError(f"cannot read {path}: {p.name} is {frame.shape[:2]}, "
                               f"{files[0].name} is {frames[0].shape[:2]}; frames must share one size")
    return frames


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> torch.Tensor:
    """A video (`.gif` via pillow, anything else ffmpeg reads: `.mp4`, …) or a folder of images (sorted by name:
    .png .jpg .jpeg .bmp) → float tensor (f, h, w, 3) in [0, 1], at most `max_frames` frames.
    """
    import imageio.v3 as iio

    path = Path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    if not path.exists():
        raise VideoIOError(f"cannot read {path}: no such file or folder")
    try:
        if path.is_dir():
            frames = _read_folder(path, max_frames)
        elif path.suffix.lower() == ".gif":
            frames = list(islice(iio.imiter(path, plugin="pillow", mode="RGB"), max_frames))
        else:
            frames = _read_ffmpeg(path, max_frames)
    except VideoIOError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VideoIOError(f"cannot read {path}: {reason}") from e
    if not frames:
        raise VideoIOError(f"cannot read {path}: no frames found")
    return torch.from_numpy(np.stack(frames)).float() / 255


def load_frames(source, name: str = "video", max_frames: int | None = None) -> torch.Tensor:
    """A pipeline's video input → float tensor (f, h, w, 3) in [0, 1] on the CPU.

    `source`: a video file or a folder of frames (`read_video`), or frames (f, h, w, 3): a uint8 or float array or
    tensor (floats in [0, 1]), or a list of (h, w, 3) frames. `name` names the argument in errors."""
    if isinstance(source, (str, os.PathLike)):
        return read_video(source, max_frames)
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError(f"{name} is an empty list of frames")
        source = np.stack([np.asarray(frame) for frame in source])
    if not isinstance(source, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} must be a video path, a folder of frames or frames (F, H, W, 3); "
                         f"got {type(source).__name__}")
    try:
        frames = _as_frames(source)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if frames.numel() and not (0 <= frames.min() and frames.max() <= 1):  # uint8 is already scaled
        raise ValueError(f"{name} holds floats outside [0, 1] ({frames.min():.3g}..{frames.max():.3g}); "
                         "give floats in [0, 1] or uint8 in 0..255")
    return frames.cpu()[:max_frames]


def load_image(source, name: str = "image") -> torch.Tensor:
    """A pipeline's image input → float tensor (h, w, 3) in [0, 1] on the CPU.

    `source`: an image file (.png, .jpg, … anything pillow reads; an alpha channel is dropped), a PIL image, or
    an (h, w, 3) uint8 or float (in [0, 1]) array or tensor. ValueError (a `VideoIOError` for files) naming it."""
    if isinstance(source, (str, os.PathLike)):
        import imageio.v3 as iio

        path = Path(source)
        if not path.is_file():
            what = "a folder, not an image file" if path.is_dir() else "no such file"
            raise VideoIOError(f"cannot read {name} {path}: {what}")
        try:
            source = iio.imread(path, plugin="pillow", mode="RGB")
        except (OSError, ValueError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VideoIOError(f"cannot read {name} {path}: not an image ({reason})") from None
        if source.ndim != 3:  # an animated file: its first frame
            source = source[0]
    elif hasattr(source, "convert") and hasattr(source, "size"):  # a PIL image
        source = np.array(source.convert("RGB"))  # a writable copy
    if not isinstance(source, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} must be an image file, a PIL image or an (H, W, 3) array; got "
                         f"{type(source).__name__}")
    shape = tuple(source.shape)
    if len(shape) != 3 or shape[-1] != 3 or min(shape) == 0:
        raise ValueError(f"{name} must have shape (H, W, 3) with H, W > 0, got {shape}")
    image = _as_frames(source[None])[0]
    if not (0 <= image.min() and image.max() <= 1):
        raise ValueError(f"{name} holds floats outside [0, 1] ({image.min():.3g}..{image.max():.3g}); give floats "
                         "in [0, 1] or uint8 in 0..255")
    return image.cpu()


def resized_shape(h: int, w: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(h, w) scaled so that the long side is `resolution`, each side rounded to the nearest multiple of `multiple`
    (at least one multiple): the Text2Video-Zero authors' `prepare_video` with multiple=64."""
    k = resolution / max(h, w)
    return (max(multiple, round(h * k / multiple) * multiple), max(multiple, round(w * k / multiple) * multiple))


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """frames (f, h, w, 3) → (f, *size, 3), bilinear with antialiasing (unchanged when already that size)."""
    if tuple(frames.shape[1:3]) == tuple(size):
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).permute(0, 2, 3, 1)
