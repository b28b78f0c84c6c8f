"""The one chunk loop (t2vz/method/chunks.py): which frames each chunk holds, that each chunk's ε lands in place,
frame 1's keys and values shared, and the chunk_size checks; the pipelines' chunked-equals-unchunked tests live with
each pipeline."""
from __future__ import annotations

import pytest
import torch
from conftest import OpNames

from t2vz.method.chunks import check_chunking, eps_by_chunks, frame_chunks
from t2vz.method.text2video_zero import VideoOptions
from t2vz.sd.attention import CrossFrame


@pytest.mark.parametrize("f,size,expected", [
    (5, None, [[0, 1, 2, 3, 4]]),
    (5, 5, [[0, 1, 2, 3, 4]]),
    (5, 9, [[0, 1, 2, 3, 4]]),
    (5, 3, [[0, 1, 2], [3, 4]]),
    (6, 3, [[0, 1, 2], [3, 4, 5]]),
    (4, 2, [[0, 1], [2, 3]]),
    (1, 2, [[0]]),
])
def test_frame_chunks(f, size, expected):
    assert frame_chunks(f, size) == expected


def test_eps_by_chunks_puts_each_chunk_in_place_and_shares_frame_1():
    """Each chunk's rows are its frames of every video (video-major); the result puts them back in order; the
    first chunk records frame 1's keys and values and the later ones replay them."""
    g, f = 2, 7
    x = torch.arange(g * f, dtype=torch.float32).reshape(g * f, 1, 1, 1).expand(-1, 4, 2, 2).clone()
    seen = []

    def predict_chunk(rows, t, ids, frames):
        seen.append((list(ids), rows[:, 0, 0, 0].tolist(), frames.num_frames, frames.anchor.replaying))
        return rows * 10

    eps = eps_by_chunks(predict_chunk, CrossFrame(f), 3)(x, torch.tensor(1))
    assert torch.equal(eps, x * 10)
    assert seen == [([0, 1, 2], [0, 1, 2, 7, 8, 9], 3, False), ([3, 4, 5], [3, 4, 5, 10, 11, 12], 3, True),
                    ([6], [6, 13], 1, True)]
    whole = CrossFrame(f)  # one chunk: the video's own CrossFrame, no anchor
    assert eps_by_chunks(lambda rows, t, ids, frames: rows + (frames is whole), whole, None)(x, 1).equal(x + 1)


@pytest.mark.parametrize("size,mode,message", [
    (1, "first", "chunk_size=1 must be an integer >= 2"),
    (2.5, "first", "must be an integer >= 2"),
    (True, "first", "must be an integer >= 2"),
    (3, "first+previous", "needs cross_frame 'first' or 'off'"),
])
def test_check_chunking_names_the_problem(size, mode, message):
    with pytest.raises(ValueError, match=message):
        check_chunking(size, mode, 8)


def test_chunking_first_plus_previous_in_one_chunk_is_fine():
    check_chunking(8, "first+previous", 8)
    check_chunking(None, "first+previous", 8)


def test_video_options_refuse_an_unknown_name():
    with pytest.raises(TypeError, match="unknown option.*num_frame\\b.*the options are num_frames"):
        VideoOptions.of({"num_frame": 4})
    assert VideoOptions.of({"num_frames": 4}).num_frames == 4


def test_eps_by_chunks_takes_and_puts_each_chunk_by_a_slice():
    """A chunk's frames are consecutive: read and written as slices of the latents, not through an index built from
    its id list (which torch makes on the host and copies to the latents' device, twice per chunk and step).
    Indexed by the lists, the loop ran aten::index and aten::index_put_ once per chunk."""
    g, f = 2, 5
    x = torch.randn(g * f, 4, 2, 2)
    with OpNames() as ops:
        eps = eps_by_chunks(lambda rows, t, ids, frames: rows * 2, CrossFrame(f), 2)(x, torch.tensor(1))
    assert torch.equal(eps, x * 2)
    assert not [name for name in ops.names if name.startswith(("aten::index", "aten::_index_put"))], ops.names
