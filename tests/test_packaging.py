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


@pytest.mark.slow
def test_the_wheel_alone_runs_the_quickstart(tmp_path):
    """Outside a checkout: build the wheel, install it (nothing else from this tree) into a fresh venv
    and run ``python -m sloth_plugins.quickstart``, whose data is package data now. The venv reuses
    this environment's installed dependencies through a .pth line (their folder only: the editable
    install's finder there is not activated), so nothing is downloaded and the package itself can
    only come from the wheel."""
    import sysconfig
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), ROOT],
                   check=True, capture_output=True)
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sloth_plugins/data/tiny_instructions.jsonl" in names and "sloth_plugins/quickstart.py" in names
    assert "sloth_plugins/integrations/README.md" in names          # the Axolotl plugin's page
    assert not [n for n in names if n.endswith("make_instructions.py")]     # the generator stays in the repo

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "zz_test_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # (without the launcher variables an earlier in-process distributed test may leave: the quickstart's
    # TrainingArguments would join that process group)
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "DO_NOT_TRACK": "1"}
    where = subprocess.run([python, "-c", "import sloth_plugins, sloth_plugins.testing as t; "
                                          "print(sloth_plugins.__file__); print(len(t.load_instructions()))"],
                           check=True, capture_output=True, text=True, cwd=work, env=env).stdout.split()
    assert where[0].startswith(site) and int(where[1]) > 100, where
    version = subprocess.run([str(venv / "bin" / "sloth"), "--version"], check=True, capture_output=True, text=True,
                             cwd=work, env=env)
    assert version.stdout.startswith("sloth_plugins ")
    run = subprocess.run([python, "-m", "sloth_plugins.quickstart", "--steps", "8", "--hidden", "32", "--layers", "2",
                          "--batch-size", "4", "--max-length", "48"], capture_output=True, text=True, cwd=work,
                         env=env, timeout=600)
    assert run.returncode == 0 and "loss went down: yes" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
    assert (work / "sloth-quickstart" / "adapter" / "adapter_config.json").exists()
