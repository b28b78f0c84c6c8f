"""Video I/O: round trips through mp4 / gif / image folders, contact-sheet layout, atomic writes, clear errors."""
from __future__ import annotations

import os
import re

import imageio.v3 as iio
import imageio_ffmpeg
import pytest
import torch

from t2vz.video_io import (VideoIOError, contact_sheet, read_video, write_image, write_outputs,
                           write_video)

RED = torch.tensor([0.95, 0.1, 0.1])


def gradient(h: int = 64, w: int = 96) -> torch.Tensor:
    """A smooth colour gradient (h, w, 3) in [0.2, 0.8]."""
    y, x = torch.linspace(0, 1, h)[:, None].expand(h, w), torch.linspace(0, 1, w)[None, :].expand(h, w)
    return torch.stack([0.2 + 0.5 * x, 0.3 + 0.4 * y, 0.6 - 0.3 * x * y], -1)


def moving_square(f: int = 5, h: int = 64, w: int = 96, background: torch.Tensor | None = None) -> torch.Tensor:
    """(f, h, w, 3): a 16×16 red square moving 14 px right per frame over `background` (default: gradient)."""
    frames = (gradient(h, w) if background is None else background.expand(h, w, 3)).repeat(f, 1, 1, 1)
    for i in range(f):
        frames[i, 20:36, 8 + 14 * i:24 + 14 * i] = RED
    return frames


def assert_same_order(read: torch.Tensor, written: torch.Tensor) -> None:
    """Each read frame is nearest to the written frame of the same index, by a wide margin."""
    dist = (read[:, None] - written[None]).abs().mean(dim=(2, 3, 4))  # (f read, f written)
    assert dist.argmin(dim=1).tolist() == list(range(len(written))), dist
    off_diagonal = dist + torch.eye(len(dist)) * 1e9
    assert (dist.diagonal() < 0.25 * off_diagonal.min(dim=1).values).all(), dist


def test_mp4_round_trip(tmp_path):
    frames = moving_square()
    path = write_video(tmp_path / "v.mp4", frames, fps=8)
    read = read_video(path)
    assert read.shape == frames.shape and read.dtype == torch.float32
    err = (read - frames).abs()
    # lossy: yuv420p alone costs ~1.2/255 mean on smooth images; chroma subsampling blurs the square's edges
    assert err.mean() < 3 / 255, err.mean() * 255
    smooth = (read_video(write_video(tmp_path / "s.mp4", gradient()[None].repeat(3, 1, 1, 1))) - gradient()).abs()
    assert smooth.max() < 10 / 255, smooth.max() * 255
    assert_same_order(read, frames)
    assert len(read_video(path, max_frames=2)) == 2


def test_mp4_odd_size_is_padded_by_edge_replication(tmp_path):
    frames = torch.rand(2, 33, 47, 3, generator=torch.Generator().manual_seed(0))
    read = read_video(write_video(tmp_path / "odd.mp4", frames))
    assert read.shape == (2, 34, 48, 3)
    # the added row / column repeat their neighbour (up to codec error on noise)
    assert (read[:, -1] - read[:, -2]).abs().mean() < 0.1 < (read[:, 0] - read[:, 1]).abs().mean()


def test_gif_round_trip(tmp_path):
    # few colours (uint8 input): the palette holds them all, so the round trip is exact
    few = (moving_square(4, background=torch.tensor([0.2, 0.4, 0.6])) * 255).round().to(torch.uint8).numpy()
    read = read_video(write_video(tmp_path / "few.gif", few))
    assert read.shape == few.shape
    assert (read * 255 - torch.from_numpy(few).float()).abs().max() <= 1
    # a gradient has more than 256 colours: small palette error
    frames = moving_square()
    read = read_video(write_video(tmp_path / "v.gif", frames, fps=5))
    assert read.shape == frames.shape
    err = (read - frames).abs()
    assert err.mean() < 3 / 255 and err.max() < 16 / 255, (err.mean() * 255, err.max() * 255)
    assert_same_order(read, frames)
    assert iio.immeta(tmp_path / "v.gif", plugin="pillow")["duration"] == 200  # ms per frame = 1000 / fps


def test_read_folder_of_images_sorted_by_name(tmp_path):
    frames = moving_square(4)
    for i in (2, 0, 3, 1):  # creation order must not matter
        write_image(tmp_path / f"frame_{i:03d}.png", frames[i])
    (tmp_path / "notes.txt").write_text("not a frame")
    read = read_video(tmp_path)
    assert torch.equal(read * 255, (frames * 255).round())  # PNG is lossless
    assert torch.equal(read_video(tmp_path, max_frames=2), read[:2])


@pytest.mark.parametrize("f, columns, rows, cols", [
    (1, None, 1, 1), (5, None, 2, 3), (8, None, 3, 3),
    (1, 4, 1, 1), (5, 4, 2, 4), (8, 4, 2, 4), (5, 1, 5, 1),
])
def test_contact_sheet_size(f, columns, rows, cols):
    h, w, pad = 6, 10, 2
    sheet = contact_sheet(torch.zeros(f, h, w, 3), columns=columns, pad=pad)
    assert sheet.shape == (rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3)


def test_contact_sheet_places_tiles_row_major():
    f, h, w, pad = 7, 6, 10, 2
    colours = torch.stack([torch.full((3,), 0.0).index_fill(0, torch.tensor([i % 3]), (i + 1) / 8)
                           for i in range(f)])  # all distinct, none white
    sheet = contact_sheet(colours[:, None, None, :].expand(f, h, w, 3), columns=3, pad=pad)
    for i in range(f):
        r, c = divmod(i, 3)
        assert torch.equal(sheet[r * (h + pad) + h // 2, c * (w + pad) + w // 2], colours[i]), i
    assert torch.equal(sheet[h, 0], torch.ones(3))  # padding between rows is white
    assert torch.equal(sheet[-1, -1], torch.ones(3))  # empty cells (7 frames, 9 cells) are white


def test_write_outputs_writes_exactly_three_files(tmp_path):
    folder = tmp_path / "new" / "out"  # created if missing
    paths = write_outputs(folder, moving_square(3), stem="clip")
    assert paths == {"mp4": folder / "clip.mp4", "gif": folder / "clip.gif", "sheet": folder / "clip_sheet.png"}
    assert sorted(os.listdir(folder)) == ["clip.gif", "clip.mp4", "clip_sheet.png"]  # no temporary files
    assert read_video(paths["mp4"]).shape == (3, 64, 96, 3)
    assert iio.imread(paths["sheet"]).shape == (2 * 64 + 2, 2 * 96 + 2, 3)


_real_write_frames = imageio_ffmpeg.write_frames
_started: list[bool] = []  # one entry per failing mp4 write: did the temporary file exist?


def failing_ffmpeg_writer(*args, **kwargs):
    """imageio_ffmpeg.write_frames that really starts ffmpeg, passes on two frames, then fails."""
    real = _real_write_frames(*args, **kwargs)
    try:
        real.send(None)
        for _ in range(2):
            real.send((yield))
        yield
        _started.append(os.path.exists(args[0]))  # the temporary file ffmpeg is writing
        raise RuntimeError("encoder died")
    finally:
        real.close()


def failing_gif_writer(path, *args, **kwargs):
    """imageio.v3.imwrite that writes a partial file, then fails."""
    with open(path, "wb") as f:
        f.write(b"GIF89a partial")
    raise RuntimeError("encoder died")


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_no_trace(tmp_path, monkeypatch, suffix, existing):
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", failing_ffmpeg_writer)
    monkeypatch.setattr(iio, "imwrite", failing_gif_writer)
    target = tmp_path / f"v{suffix}"
    if existing:
        target.write_bytes(b"previous video")
    _started.clear()
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(target, moving_square(6))
    assert _started == ([True] if suffix == ".mp4" else [])
    assert os.listdir(tmp_path) == ([target.name] if existing else [])  # no temporary files
    if existing:
        assert target.read_bytes() == b"previous video"


def test_unwritable_path_names_the_path(tmp_path):
    (tmp_path / "a_folder.mp4").mkdir()
    (tmp_path / "a_file").write_text("")
    for path in (tmp_path / "a_folder.mp4", tmp_path / "a_file" / "v.mp4", tmp_path / "a_file" / "v.gif"):
        with pytest.raises(VideoIOError, match=re.escape(str(path))):
            write_video(path, moving_square(2))
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_folder.mp4"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_names_the_path(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(VideoIOError, match=re.escape(str(folder / "v.mp4"))):
            write_video(folder / "v.mp4", moving_square(2))
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("shape", [(5, 64, 64), (5, 64, 64, 4), (0, 64, 64, 3), (64, 64, 3), (2, 0, 8, 3)])
def test_bad_frame_shapes_name_the_shape(tmp_path, shape):
    with pytest.raises(ValueError, match=re.escape(repr(shape))):
        write_video(tmp_path / "v.mp4", torch.zeros(shape))
    with pytest.raises(ValueError, match="got"):
        contact_sheet(torch.zeros(shape))
    assert os.listdir(tmp_path) == []


def test_unsupported_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"'\.avi'.*\.mp4, \.gif"):
        write_video(tmp_path / "v.avi", moving_square(2))


def test_unreadable_input_names_the_path(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoIOError, match=re.escape(str(missing))):
        read_video(missing)
    for name in ("garbage.mp4", "garbage.gif"):
        (tmp_path / name).write_bytes(b"not a video at all" * 10)
        with pytest.raises(VideoIOError, match=re.escape(str(tmp_path / name))):
            read_video(tmp_path / name)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(VideoIOError, match="no frames"):
        read_video(empty)
