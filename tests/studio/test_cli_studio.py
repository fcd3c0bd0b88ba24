"""`sloth studio` without the [studio] extra: one clear line, exit code 2 (runs with or without Gradio)."""
import subprocess
import sys


def test_cli_without_gradio_says_which_extra(tmp_path):
    code = ("import sys; sys.modules['gradio'] = None\n"   # what an environment without the extra sees
            "from sloth_plugins.cli import main; sys.exit(main(['studio', '--runs-dir', sys.argv[1]]))")
    out = subprocess.run([sys.executable, "-P", "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "pip install 'sloth_plugins[studio]'" in out.stderr
