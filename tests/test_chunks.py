"""The one chunk loop (t2vz/method/chunks.py): which frames each chunk holds, that frame 1 is kept once, and the
chunk_size checks; the pipelines' chunked-equals-unchunked tests live with each pipeline."""
from __future__ import annotations

import pytest
import torch

from t2vz.method.chunks import check_chunking, frame_chunks, generate_in_chunks
from t2vz.method.text2video_zero import VideoOptions


@pytest.mark.parametrize("f,size,expected", [
    (5, None, [[0, 1, 2, 3, 4]]),
    (5, 5, [[0, 1, 2, 3, 4]]),
    (5, 9, [[0, 1, 2, 3, 4]]),
    (5, 3, [[0, 1, 2], [0, 3, 4]]),
    (6, 3, [[0, 1, 2], [0, 3, 4], [0, 5]]),
    (4, 2, [[0, 1], [0, 2], [0, 3]]),
    (1, 2, [[0]]),
])
def test_frame_chunks(f, size, expected):
    assert frame_chunks(f, size) == expected


def test_generate_in_chunks_keeps_frame_1_once_and_frames_in_order():
    """Each chunk's frames carry their global id as a value: the result is frames 0..f−1, in order, once each."""
    seen = []

    def generate(ids):
        seen.append(list(ids))
        return torch.tensor(ids, dtype=torch.float32).reshape(1, len(ids), 1, 1, 1).expand(2, -1, 2, 2, 3)

    video = generate_in_chunks(7, 3, generate)
    assert seen == [[0, 1, 2], [0, 3, 4], [0, 5, 6]]
    assert video.shape == (2, 7, 2, 2, 3)
    assert video[:, :, 0, 0, 0].tolist() == [list(range(7))] * 2


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
