"""docs/walkthrough.ipynb, Algorithm 1 one step per cell on the toy model: executed here (nbclient, a temporary
copy, a kernel running this interpreter), its frames equal the pipeline's for the same seed and options, the saved
notebook holds the outputs of every code cell (it renders without running), and those outputs are the current
code's.

`python tests/test_walkthrough.py` executes the notebook the same way and saves it with its outputs, in place."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "walkthrough.ipynb"
FRAMES_ENV = "T2VZ_WALKTHROUGH_FRAMES"  # the notebook's last cell saves its frames there (numpy.save)
KERNEL = "t2vz-walkthrough"
# what the notebook generates (its setup cell; test_the_notebook_generates_what_this_test_compares checks it)
PROMPT, SEED = "a red circle on grass", 1
OPTIONS = dict(num_frames=5, num_inference_steps=50, direction=(1.0, 0.0), delta_t=3)
MAX_BYTES = 256 * 1024


def execute(notebook: Path, folder: Path, frames: Path | None = None):
    """Run `notebook` in a kernel of this interpreter (`sys.executable`, so the venv that runs the tests) with one
    torch thread, from `folder`: its kernelspec is written there and found only there, so no installed kernelspec
    is needed or used (a fresh `pip install -e .[test]` suffices). `frames`: where the last cell saves the frames.
    Returns the executed notebook."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    env = {"OMP_NUM_THREADS": "1", "IPYTHONDIR": str(folder / "ipython"),  # this checkout's t2vz, installed or not
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if frames is not None:
        env[FRAMES_ENV] = str(frames)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "t2vz (this interpreter)", "language": "python", "env": env}))
    km = KernelManager(kernel_name=KERNEL, connection_file=str(folder / "connection.json"),
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder / "kernels")]))
    assert km.kernel_spec.argv[0] == sys.executable
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, km=km, timeout=600, record_timing=False, allow_errors=False,
                   resources={"metadata": {"path": str(folder)}}).execute()
    return nb


def code_outputs(nb) -> list[list[tuple[str, object]]]:
    """Per code cell, its outputs: ("text", the printed text) or ("png", the image as a uint8 array). Consecutive
    printed texts are joined: how the kernel splits them into messages depends on timing."""
    from PIL import Image

    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        got = []
        for out in cell.outputs:
            if out.output_type == "stream":
                if got and got[-1][0] == "text":
                    got[-1] = ("text", got[-1][1] + out.text)
                else:
                    got.append(("text", out.text))
            elif "image/png" in out.get("data", {}):
                png = base64.b64decode(out.data["image/png"])
                got.append(("png", np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))))
            else:
                got.append((out.output_type, out.get("data", {}).get("text/plain", "")))
        cells.append(got)
    return cells


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed in a temporary copy: (the executed notebook, its frames)."""
    folder = tmp_path_factory.mktemp("walkthrough")
    copy = folder / NOTEBOOK.name
    shutil.copyfile(NOTEBOOK, copy)
    nb = execute(copy, folder, folder / "frames.npy")
    return nb, torch.from_numpy(np.load(folder / "frames.npy"))


def test_the_saved_notebook_renders_without_running():
    """Every code cell of the saved notebook has its outputs, from one run in order and without errors; every step
    shows an image; the file stays small."""
    size = NOTEBOOK.stat().st_size
    assert size <= MAX_BYTES, f"{NOTEBOOK.name} is {size / 1024:.0f} KiB"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    for cell in code[1:]:  # the first cell defines; every later one prints or shows something
        assert cell.outputs, cell.source[:80]
        assert all(out.output_type != "error" for out in cell.outputs)
    images = [sum(kind == "png" for kind, _ in outs) for outs in code_outputs(nb)]
    assert all(n >= 1 for n in images[2:-1]), images  # steps 1 to 6 each show what they made
    assert nb.cells[0].cell_type == "markdown"
    for cell_before, cell in zip(nb.cells, nb.cells[1:]):  # a markdown cell explains each step's code cell
        if cell.cell_type == "code" and cell is not nb.cells[1]:
            assert cell_before.cell_type == "markdown"


def test_the_notebook_generates_what_this_test_compares():
    source = "\n".join(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells)
    assert f'PROMPT, SEED = "{PROMPT}", {SEED}' in source
    assert f"OPTIONS = dict({', '.join(f'{k}={v!r}' for k, v in OPTIONS.items())})" in source
    for step in ("draw_first_frame_noise(", "pipe.first_frame_trajectory(", "pipe.warp_first_frame(",
                 "pipe.noise_to_T1(", "pipe.denoise_frames(", "decode_video("):  # Algorithm 1, in order
        assert step in source
    positions = [source.index(step) for step in ("draw_first_frame_noise(shape", "pipe.first_frame_trajectory(",
                                                "pipe.warp_first_frame(", "pipe.noise_to_T1(",
                                                "pipe.denoise_frames(", "decode_video(sd")]
    assert positions == sorted(positions)


def test_the_notebooks_frames_equal_the_pipelines(executed, one_thread):
    """The frames made step by step in the notebook (its kernel on one thread) equal `TextToVideoZero(...)` with
    the same seed and options here (one thread): bit for bit, as the notebook's own last cell asserts."""
    from t2vz.method.text2video_zero import TextToVideoZero

    _, frames = executed
    pipe = TextToVideoZero.from_pretrained("toyworld")
    reference = pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), progress=False, **OPTIONS)
    assert frames.shape == (OPTIONS["num_frames"], 64, 64, 3)
    assert torch.equal(frames, reference)


def test_the_saved_outputs_are_the_current_codes(executed):
    """The saved outputs are what the notebook prints and shows now: the same text, and images equal as uint8
    within 3 levels of 255 on at most 1% of their values. Not bit for bit, since another CPU (or another thread
    count) may round differently: on the 2-core Intel Xeon, torch 2.13.0+cpu, the toy model's frames made on 1 and
    on 2 threads differed by at most 1.5e-5, which moved at most 1 level of 255 on 0.007% of the values."""
    fresh, saved = code_outputs(executed[0]), code_outputs(nbformat.read(NOTEBOOK, as_version=4))
    assert len(fresh) == len(saved)
    for i, (now, then) in enumerate(zip(fresh, saved)):
        assert [kind for kind, _ in now] == [kind for kind, _ in then], f"code cell {i + 1}"
        for (kind, a), (_, b) in zip(now, then):
            if kind != "png":
                assert a == b, f"code cell {i + 1}: {a!r} != saved {b!r}"
                continue
            assert a.shape == b.shape, f"code cell {i + 1}: image {a.shape} != saved {b.shape}"
            diff = np.abs(a.astype(int) - b.astype(int))
            assert diff.max() <= 3 and (diff > 0).mean() <= 0.01, (i + 1, diff.max(), (diff > 0).mean())


def main() -> int:
    """Execute docs/walkthrough.ipynb (a temporary copy, as the tests do) and save it with its outputs, in place."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        nb = execute(NOTEBOOK, Path(tmp))
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK.relative_to(REPO)} ({NOTEBOOK.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
