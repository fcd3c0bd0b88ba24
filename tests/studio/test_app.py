"""The Gradio app over real HTTP (gradio_client calls the same handlers the browser's buttons do),
the bind policy, and the form <-> run config mapping. Skipped without the [studio] extra."""
import socket
import time
import urllib.request

import pytest

gradio = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from sloth_plugins.cli import main as cli_main  # noqa: E402
from sloth_plugins.studio.app import check_bind, launch  # noqa: E402
from sloth_plugins.studio.config import default_run_config  # noqa: E402
from sloth_plugins.studio.form import config_to_fields, field_names, fields_to_config  # noqa: E402
from sloth_plugins.studio.runs import StudioError  # noqa: E402
from sloth_plugins.testing import DATA_FILE  # noqa: E402

ALPACA = {"format": "alpaca", "instruction": "instruction", "input": None, "output": "response"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_other_host_needs_auth():
    assert check_bind("127.0.0.1", None) is None
    assert check_bind("0.0.0.0", "ann:secret") == ("ann", "secret")
    with pytest.raises(StudioError, match="give --auth"):
        check_bind("0.0.0.0", None)
    with pytest.raises(StudioError, match="USER:PASSWORD"):
        check_bind("0.0.0.0", "ann")


def test_cli_refuses_public_host_without_auth(tmp_path, capsys):
    assert cli_main(["studio", "--host", "0.0.0.0", "--runs-dir", str(tmp_path)]) == 2
    assert "give --auth" in capsys.readouterr().err


def test_form_round_trip_keeps_every_setting(model_dir):
    config = default_run_config(model_dir, dict(ALPACA))
    config["lora"].update(r=4, target_modules=["q_proj", "v_proj"])
    config["sloth"].update(kernels=["rms_norm", "rope"], memory_budget_gb=12.5, gradient_checkpointing="recompute")
    config["training"].update(max_steps=7, report_to=["tensorboard"], packing=True)
    fields = config_to_fields(config)
    assert set(fields) == set(field_names())
    assert fields_to_config(fields) == config


def test_bad_sloth_value_is_named(model_dir):
    fields = config_to_fields(default_run_config(model_dir, dict(ALPACA)))
    fields["sloth.memory_budget_gb"] = "-3"
    with pytest.raises(ValueError, match="memory_budget_gb"):
        fields_to_config(fields)


@pytest.mark.slow
def test_app_loads_data_starts_a_run_and_shows_it_finish(tmp_path, model_dir):
    port = free_port()
    app = launch(str(tmp_path / "runs"), port=port, model=model_dir, block=False)
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/").status == 200
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        message, preview = client.predict(None, DATA_FILE, api_name="/on_load")[:2]   # the State output is not sent
        assert message.startswith("400 rows") and preview["headers"] == ["instruction", "response"]
        config = default_run_config(model_dir, dict(ALPACA))
        config["training"].update(max_steps=10, max_length=64, learning_rate=2e-3)
        fields = config_to_fields(config)
        values = [fields[n] for n in field_names()]
        assert "rows longer than max_length 64 are cut" in client.predict(*values, api_name="/on_check")[2]
        assert "PatchReport" in client.predict(*values, api_name="/on_report")
        picked, started = client.predict(*values, api_name="/on_start")
        run_id = picked["value"]
        assert started == f"run {run_id} started"
        deadline, losses = time.monotonic() + 180, []
        while time.monotonic() < deadline:
            status, loss = client.predict(run_id, api_name="/on_tick")[:2]
            losses.append(len(loss["data"]) if isinstance(loss, dict) and loss.get("data") else 0)
            if "finished" in status or "failed" in status:
                break
            time.sleep(0.5)
        assert "**finished**, step 10" in status
        assert max(losses) == 10 and min(losses) < 10   # the chart grew while the run trained
        script, yaml_text = client.predict(run_id, api_name="/on_export")
        assert "SFTTrainer(" in script and "SlothPlugin" in yaml_text
        assert (tmp_path / "runs" / run_id / "adapter" / "adapter_config.json").is_file()
    finally:
        app.close()



@pytest.mark.slow
def test_app_estimates_compares_chats_and_exports_a_finished_run(tmp_path, finished_run, model_dir):
    import zipfile
    manager, run_id = finished_run
    port = free_port()
    app = launch(manager.runs_dir, port=port, model=model_dir, block=False)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        fields = config_to_fields(default_run_config(model_dir, dict(ALPACA)))
        estimate, report, gpus = client.predict(*[fields[n] for n in field_names()], api_name="/on_estimate")
        assert "estimated peak" in estimate and "decoder layers" in estimate
        assert "lora_qkv" in report and "PatchReport" in report and gpus
        plot = client.predict(run_id, None, api_name="/on_compare")
        assert len(plot["data"]) == 10
        job = client.submit(run_id, "Name a colour.", 0.0, 1.0, 6, api_name="/on_send")
        tuned, base = job.result(timeout=120)
        assert tuned and base and len(job.outputs()) > 2     # streamed
        path = client.predict(run_id, api_name="/on_zip")
        assert "adapter_config.json" in zipfile.ZipFile(path).namelist()
        merged = client.predict(run_id, api_name="/on_merge")
        assert f"{manager.run_dir(run_id)}/merged" in merged
    finally:
        app.close()
