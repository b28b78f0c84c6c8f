"""A torch.compile'd UNet (`compile=true`, t2vz/experiment/run.py `compiled`) gives the eager UNet's frames, with no
graph break and a few graphs, one per kind of UNet call, and keeps giving them to a second generation in the same
process (a sweep reuses one compiled pipeline for all its jobs): with background smoothing (the cross-attention
recorder), token merging (its random stream) and chunks (frame 1's keys and values, and the merging's destination
choices, recorded by the first chunk and replayed by the later ones).

Dynamo traces the UNet as `torch.compile` does and hands each graph to a counting backend that runs it as traced
(as backend="eager" does), so no code is generated and the frames are bit-identical to the eager ones (tolerance 0).
The toy model, 4 frames of 64×64, 2 DDIM steps, without motion dynamics: every UNet call then holds all frames (or a
chunk of them), and frame 1's loops add no graph of their own.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from t2vz import TextToVideoZero

RUN = dict(num_frames=4, num_inference_steps=2, motion_dynamics=False, progress=False)
PROMPTS = ("a red circle on grass", "a small blue square on sand at dusk")  # the job of a sweep, then the next


@pytest.fixture(scope="module")
def pipe():
    return TextToVideoZero.from_pretrained("toyworld")


@pytest.fixture
def compiled(pipe):
    """`compiled()`: the pipeline with its UNet torch.compile'd afresh, the graphs dynamo makes from now on listed in
    `compiled.graphs`; the eager UNet is put back afterwards and dynamo's caches and counters are cleared."""
    graphs, eager = [], pipe.sd.unet
    torch._dynamo.reset()
    counters.clear()

    def backend(gm: torch.fx.GraphModule, example_inputs) -> callable:
        graphs.append(gm)
        return gm.forward

    def compile_unet() -> TextToVideoZero:
        pipe.sd.unet = torch.compile(eager, backend=backend)
        return pipe

    compile_unet.graphs = graphs
    yield compile_unet
    pipe.sd.unet = eager
    torch._dynamo.reset()
    counters.clear()


def generate(pipe, prompt: str, **options) -> torch.Tensor:
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **RUN, **options)


def check_two_generations(pipe, compiled, options: dict, max_graphs: int) -> None:
    """Eager frames of both prompts, then a compiled generation of each: bit-identical to them, no graph break, at
    most `max_graphs` graphs after the first and none more for the second (another prompt, of another length)."""
    references = [generate(pipe, prompt, **options) for prompt in PROMPTS]
    pipe = compiled()
    first = generate(pipe, PROMPTS[0], **options)
    made = len(compiled.graphs)
    second = generate(pipe, PROMPTS[1], **options)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= made <= max_graphs, f"{made} graphs for {options}"
    assert len(compiled.graphs) == made, f"the second generation compiled {len(compiled.graphs) - made} more"
    assert torch.equal(first, references[0]) and torch.equal(second, references[1])


@torch.no_grad()
def test_background_smoothing_records_into_every_generations_recorder(pipe, compiled):
    """The masks' recording pass and the denoising pass: 2 graphs, the second prompt's recorder (other token
    positions) included. With forward hooks as the recorder, the second generation raised "no cross-attention was
    recorded" (the graph kept calling the first generation's hook)."""
    check_two_generations(pipe, compiled, dict(smooth_bg=True), max_graphs=2)


@torch.no_grad()
def test_token_merging_draws_inside_the_graph(pipe, compiled):
    """Merging at levels 1 and 2 (the toy UNet has no attention at level 0): 1 graph. With the draws made by
    `torch.randint(generator=…)` the graph broke in every merging block and dynamo compiled the blocks one by one
    (37 graphs over a generation with motion dynamics, until its recompile limit)."""
    check_two_generations(pipe, compiled, dict(merging_ratio=0.5, merging_max_downsample=2), max_graphs=1)


@torch.no_grad()
def test_chunks_record_and_replay_inside_the_graph(pipe, compiled):
    """Chunks of 2 frames with token merging: the first chunk records frame 1's keys and values and its destination
    choices in `AnchorKeys`, the second replays them: 2 graphs (recording, replaying)."""
    check_two_generations(pipe, compiled, dict(chunk_size=2, merging_ratio=0.5, merging_max_downsample=2),
                          max_graphs=2)
