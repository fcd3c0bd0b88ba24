"""Hostile inputs to SlothConfig, ``sloth.patch`` and ``sloth doctor``: each is a clear error, never a crash."""
import json
import re
import subprocess
import sys

import pytest

import sloth_plugins as sloth
from sloth_plugins.cli import main
from sloth_plugins.config import KERNEL_NAMES
from sloth_plugins.testing import tiny_model

# ---- SlothConfig ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_memory_budget_must_be_finite(value):
    with pytest.raises(sloth.SlothConfigError, match="memory_budget_gb must be a positive number"):
        sloth.SlothConfig(memory_budget_gb=value)


def test_kernels_dict_switches_kernels_off_and_on():
    assert sloth.SlothConfig(kernels={"rms_norm": False}).enabled_kernels == tuple(
        k for k in KERNEL_NAMES if k != "rms_norm")
    assert sloth.SlothConfig(kernels={"rope": True, "mlp": False}).enabled_kernels == tuple(
        k for k in KERNEL_NAMES if k != "mlp")
    assert sloth.SlothConfig(kernels={}).enabled_kernels == KERNEL_NAMES
    assert not sloth.SlothConfig(kernels={"rms_norm": False}).kernel_enabled("rms_norm")


@pytest.mark.parametrize("kernels, message", [
    ({"rms_nrom": False}, "unknown kernel name(s) 'rms_nrom'; valid: rms_norm, rope"),
    ({"rms_norm": "no"}, "kernels['rms_norm'] must be true or false, got 'no'"),
    ({"rms_norm": 0}, "kernels['rms_norm'] must be true or false, got 0"),
])
def test_kernels_dict_rejects_unknown_names_and_non_bools(kernels, message):
    with pytest.raises(sloth.SlothConfigError, match=re.escape(message)):
        sloth.SlothConfig(kernels=kernels)


# ---- sloth.patch's config argument ------------------------------------------------------------

@pytest.mark.parametrize("config", ["recompute", 3, ["rms_norm"]])
def test_patch_with_a_non_config_is_a_clear_type_error(config):
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"SlothConfig\(\.\.\.\).*keyword options"):
        sloth.patch(model, config)
    assert sloth.get_state(model) is None


def test_patch_takes_a_dict_as_a_config():
    model = tiny_model("llama")
    report = sloth.patch(model, {"loss": "off", "kernels": {"rope": False}})
    assert sloth.get_state(model).config == sloth.SlothConfig(loss="off", kernels={"rope": False})
    assert report.count("loss") == 0 and report.count("rope") == 0 and report.count("rms_norm") > 0
    with pytest.raises(sloth.SlothConfigError, match="unknown SlothConfig key 'los'"):
        sloth.patch(model, {"los": "off"})


# ---- sloth doctor -----------------------------------------------------------------------------

def _doctor(capsys, *argv):
    code = main(["doctor", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_clear_line(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sloth doctor: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_doctor_folder_without_config_json(tmp_path, capsys):
    code, _, err = _doctor(capsys, str(tmp_path))
    assert code == 2
    _one_clear_line(err, "no config.json", str(tmp_path))


def test_doctor_config_json_that_is_not_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = _doctor(capsys, str(tmp_path))
    assert code == 2
    _one_clear_line(err, "config.json", "not a valid JSON file")


def test_doctor_unknown_model_type_in_config_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llamma"}))
    code, _, err = _doctor(capsys, str(tmp_path))
    assert code == 2
    _one_clear_line(err, "model_type 'llamma' is unknown to transformers")


def test_doctor_unknown_model_type_name(capsys):
    code, _, err = _doctor(capsys, "llamma")
    assert code == 2
    _one_clear_line(err, "neither a local model folder nor a transformers model_type")


def test_doctor_encoder_decoder_is_not_a_causal_lm(tmp_path, capsys):
    code, _, err = _doctor(capsys, "t5")
    assert code == 2
    _one_clear_line(err, "t5", "not a causal LM")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    code, _, err = _doctor(capsys, str(tmp_path))
    assert code == 2
    _one_clear_line(err, "t5", "not a causal LM")


def test_doctor_model_that_fails_to_build(capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    def broken(config, **kwargs):
        raise ImportError("this model needs the package foo:\npip install foo")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", broken)
    code, _, err = _doctor(capsys, "llama")
    assert code == 2
    _one_clear_line(err, "llama", "ImportError: this model needs the package foo")


@pytest.mark.parametrize("item, message", [
    ("kernal=true", "unknown SlothConfig key 'kernal'; valid keys: kernels"),
    ("loss=fused", "loss must be one of chunked, off; got 'fused'"),
    ("memory_budget_gb=nan", "memory_budget_gb must be a positive number"),
    ("kernels=rms_norm,flash", "unknown kernel name(s) 'flash'"),
    ("strict", "--set takes KEY=VALUE"),
])
def test_doctor_bad_set_is_one_clear_line(capsys, item, message):
    code, out, err = _doctor(capsys, "llama", "--set", item)
    assert code == 2 and out == ""
    _one_clear_line(err, message)


def test_doctor_set_parses_values():
    from sloth_plugins.cli import parse_set
    assert parse_set(["loss_chunk_size=64", "memory_budget_gb=1.5", "kernels=rms_norm,rope", "strict=True",
                      "return_logits=false", "memory_budget_gb=none", "loss=off", "kernels=null"]) == {
        "loss_chunk_size": 64, "memory_budget_gb": None, "kernels": None, "strict": True,
        "return_logits": False, "loss": "off"}
    assert parse_set(["kernels=rms_norm"]) == {"kernels": ["rms_norm"]}
    # typed by the key's Option (config.OPTIONS), not guessed from the text
    assert parse_set(["memory_budget_gb=40", "attention=sdpa", "kernels=true"]) == {
        "memory_budget_gb": 40.0, "attention": "sdpa", "kernels": True}
    assert isinstance(parse_set(["memory_budget_gb=40"])["memory_budget_gb"], float)
    assert parse_set(["activation_checkpointing=off"]) == {"activation_checkpointing": "off"}   # the alias


@pytest.mark.parametrize("item, message", [
    ("strict=yes", "--set strict=yes: strict takes true or false, got 'yes'"),
    ("loss_chunk_size=1.5", "loss_chunk_size takes a whole number (or none), got '1.5'"),
    ("memory_budget_gb=lots", "memory_budget_gb takes a number (or none), got 'lots'"),
    ("kernal=true", "unknown SlothConfig key 'kernal'; valid keys: kernels, loss,"),
])
def test_doctor_set_types_come_from_the_config_options(item, message):
    from sloth_plugins.cli import DoctorError, parse_set
    with pytest.raises(DoctorError, match=re.escape(message)):
        parse_set([item])


def test_doctor_set_reaches_the_report(capsys):
    code, out, _ = _doctor(capsys, "llama", "--set", "kernels=rms_norm,rope", "--set", "loss_chunk_size=64",
                           "--json")
    assert code == 0
    data = json.loads(out)
    assert data["config"]["kernels"] == ["rms_norm", "rope"] and data["config"]["loss_chunk_size"] == 64
    assert data["report"]["summary"]["rms_norm"]["patched"] > 0 and "mlp" not in data["report"]["summary"]


def test_doctor_json(capsys):
    code, out, _ = _doctor(capsys, "qwen2", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["report"]["model_type"] == "qwen2" and data["report"]["summary"]["loss"]["patched"] == 1
    assert data["machine"]["packages"]["torch"] and "triton" in data["machine"]
    code, out, _ = _doctor(capsys, "--json")
    assert code == 0 and set(json.loads(out)) == {"machine"}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"sloth_plugins {sloth.__version__}"


def test_doctor_errors_exit_2_without_traceback_from_the_console(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sloth_plugins.cli", "doctor", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sloth doctor: ")
