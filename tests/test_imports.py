"""t2vz never imports diffusers at run time: importing it and a full generation leave `diffusers` unloaded."""
import subprocess
import sys

CODE = """
import sys, torch
import t2vz, weights_convert.__main__
from weights_convert.random_model import write_random_model
sd = t2vz.load(write_random_model(sys.argv[1]))
image = t2vz.text_to_image(sd, "a cat", height=16, width=16, num_inference_steps=2, progress=False,
                           generator=torch.Generator().manual_seed(0))
assert image.shape == (16, 16, 3), image.shape
leaked = sorted(m for m in sys.modules if m == "diffusers" or m.startswith("diffusers."))
print("LEAKED", leaked)
"""


def test_import_and_generation_do_not_import_diffusers(tmp_path):
    out = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "m")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "LEAKED []" in out.stdout, out.stdout
