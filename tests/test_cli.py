import subprocess
import sys

from sloth_plugins.cli import main


def test_doctor_machine_and_model_report(capsys):
    assert main(["doctor", "qwen2", "--set", "gradient_checkpointing=recompute"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "Triton" in out and "bitsandbytes" in out
    assert "model_type=qwen2" in out and "rms_norm" in out and "rope" in out


def test_doctor_local_folder(tmp_path, capsys):
    from sloth_plugins.testing import tiny_model
    tiny_model("gemma2").save_pretrained(tmp_path)
    assert main(["doctor", str(tmp_path)]) == 0
    assert "model_type=gemma2" in capsys.readouterr().out


def test_doctor_bad_model_and_console_script():
    proc = subprocess.run([sys.executable, "-m", "sloth_plugins.cli", "doctor", "no-such-model"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "neither a local model folder nor" in proc.stderr
