"""The wheel ships kernels/ and integrations/ as sloth_plugins.* and never as top-level packages."""
import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_file_list(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), ROOT], check=True)
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"sloth_plugins"}, top_levels
    for expected in ("sloth_plugins/kernels/rms_norm.py", "sloth_plugins/kernels/_cross_entropy_triton.py",
                     "sloth_plugins/kernels/lora.py", "sloth_plugins/integrations/hf.py",
                     "sloth_plugins/plugins/loss.py", "sloth_plugins/hookspecs.py", "sloth_plugins/cli.py"):
        assert expected in names, expected
    entry_points = zipfile.ZipFile(tmp_path / wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "sloth = sloth_plugins.cli:main" in entry_points


def test_installed_import_names():
    import sloth_plugins.integrations.hf
    import sloth_plugins.kernels
    assert os.path.samefile(os.path.dirname(sloth_plugins.kernels.__file__), os.path.join(ROOT, "kernels"))
    assert sloth_plugins.integrations.hf.SlothCallback
    # `kernels` may be Hugging Face's package (axolotl installs it) but never our folder
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin:
        assert not os.path.realpath(spec.origin).startswith(os.path.join(ROOT, "kernels"))
    assert importlib.util.find_spec("integrations") is None


def test_import_patches_nothing():
    code = ("import torch.nn as nn, transformers; before = dict(vars(nn.Module)); import sloth_plugins, "
            "sloth_plugins.kernels, sloth_plugins.integrations.hf; "
            "from transformers.models.llama import modeling_llama as m; "
            "assert dict(vars(nn.Module)) == before; assert m.apply_rotary_pos_emb.__module__.startswith('transformers') "
            "or type(m.apply_rotary_pos_emb).__module__.startswith('kernels')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
