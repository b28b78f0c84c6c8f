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


LAZY = """
import sys
import t2vz
print("AFTER_IMPORT", sorted(m for m in ("torch", "transformers") if m in sys.modules))
t2vz.TextToVideoZero, t2vz.load
print("AFTER_NAMES", "transformers" in sys.modules)
t2vz.load("toyworld")
print("AFTER_LOAD", "transformers" in sys.modules)
"""


def test_import_t2vz_is_lazy():
    """`import t2vz` loads neither torch nor transformers; the public names load torch but not transformers,
    which comes with the first text encoder built."""
    out = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "AFTER_IMPORT []" in out.stdout, out.stdout
    assert "AFTER_NAMES False" in out.stdout, out.stdout
    assert "AFTER_LOAD True" in out.stdout, out.stdout


def test_unknown_public_name_is_an_attribute_error():
    import pytest
    import t2vz
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        t2vz.NoSuchThing
    assert "TextToVideoZero" in dir(t2vz) and "sd" in dir(t2vz)
