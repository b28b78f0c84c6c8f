"""Writing images and videos, atomically: into a temporary file beside the target, then one rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


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


def write_image(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """image (H, W, 3) float in [0, 1] → PNG at `path`, written atomically."""
    import imageio.v3 as iio

    path = Path(path)
    tmp = atomic_path(path)
    try:
        iio.imwrite(tmp, to_uint8(image), extension=".png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
