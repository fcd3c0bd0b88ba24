"""The run manager with real training subprocesses (TRL SFTTrainer + SlothCallback on a tiny model)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from sloth_plugins.studio.datasets import DatasetError
from sloth_plugins.studio.runs import RunManager, StudioError, last_checkpoint

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def two_finished_runs(tmp_path_factory, model_dir):
    """Two runs started together, trained to the end: (manager, [id_a, id_b])."""
    from sloth_plugins.testing import DATA_FILE
    manager = RunManager(str(tmp_path_factory.mktemp("runs")))
    mapping = {"format": "alpaca", "instruction": "instruction", "input": None, "output": "response"}
    ids = [manager.create({"model": model_dir, "name": f"seed {seed}", "dataset": {"mapping": mapping},
                           "training": dict(max_steps=20, max_length=64, learning_rate=2e-3, save_steps=10,
                                            seed=seed)}, DATA_FILE) for seed in (0, 1)]
    for run_id in ids:
        manager.start(run_id)
    assert {manager.status(i)["state"] for i in ids} <= {"starting", "running"}   # both at once
    for run_id in ids:
        manager.wait(run_id, timeout=300)
    return manager, ids


def test_two_runs_at_once_train_to_the_end(two_finished_runs):
    manager, ids = two_finished_runs
    for run_id in ids:
        status = manager.status(run_id)
        assert status["state"] == "finished", manager.log_tail(run_id)
        metrics = manager.metrics(run_id)
        assert [m["step"] for m in metrics] == list(range(1, 21))
        assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 and m["peak_memory_gb"] > 0 for m in metrics)
        assert metrics[-1]["loss"] < metrics[0]["loss"]
        run_dir = manager.run_dir(run_id)
        assert os.path.isfile(os.path.join(run_dir, "adapter", "adapter_config.json"))
        assert "loss" in manager.patch_report(run_id) and "rms_norm" in manager.patch_report(run_id)
    # different seeds, different runs: each wrote its own metrics
    assert manager.metrics(ids[0])[0]["loss"] != manager.metrics(ids[1])[0]["loss"]


def test_runs_list_survives_a_new_manager(two_finished_runs):
    manager, ids = two_finished_runs
    listed = RunManager(manager.runs_dir).list()   # as after a restart of the app
    assert sorted(r["id"] for r in listed) == sorted(ids)
    assert {r["name"] for r in listed} == {"seed 0", "seed 1"}
    assert all(r["state"] == "finished" for r in listed)


def test_clean_stop_saves_adapter_and_resume_finishes(tmp_path, run_config, dataset_file):
    manager = RunManager(str(tmp_path / "runs"))
    run_id = manager.create(run_config(max_steps=40, save_steps=100), dataset_file)
    manager.start(run_id)
    wait_for(lambda: manager.metrics(run_id), what="the first logged step")
    manager.stop(run_id)
    status = manager.wait(run_id, timeout=120)
    assert status["state"] == "stopped", manager.log_tail(run_id)
    stopped_at = status["step"]
    assert 1 <= stopped_at < 40
    run_dir = manager.run_dir(run_id)
    assert os.path.isfile(os.path.join(run_dir, "adapter", "adapter_config.json"))
    assert last_checkpoint(run_dir).endswith(f"checkpoint-{stopped_at}")   # saved on stop, not on schedule

    manager.start(run_id, resume=True)
    status = manager.wait(run_id, timeout=180)
    assert status["state"] == "finished", manager.log_tail(run_id)
    steps = [m["step"] for m in manager.metrics(run_id)]
    assert steps == list(range(1, 41))   # the resumed run continues the stopped one, no step twice


def test_resume_without_checkpoint_is_refused(tmp_path, run_config, dataset_file):
    manager = RunManager(str(tmp_path / "runs"))
    run_id = manager.create(run_config(), dataset_file)
    with pytest.raises(StudioError, match="no checkpoint"):
        manager.start(run_id, resume=True)


def test_killed_worker_is_marked_failed(tmp_path, run_config, dataset_file):
    manager = RunManager(str(tmp_path / "runs"))
    run_id = manager.create(run_config(max_steps=500), dataset_file)
    manager.start(run_id)
    wait_for(lambda: manager.status(run_id)["state"] == "running", what="the worker to start")
    manager.kill(run_id)
    status = manager.wait(run_id, timeout=30)
    assert status["state"] == "failed" and "killed" in status["error"]
    # recorded in the folder: a new manager (an app restart) sees the same
    assert RunManager(manager.runs_dir).status(run_id)["state"] == "failed"


def test_bad_dataset_writes_nothing(tmp_path, run_config):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"}\n'
                   '{"instruction": "e", "response": "f",}\n')
    runs = tmp_path / "runs"
    manager = RunManager(str(runs))
    with pytest.raises(DatasetError, match=r"line 3, column 38"):
        manager.create(run_config(), str(bad))
    assert not runs.exists() or os.listdir(runs) == []


def test_mapping_to_missing_column_writes_nothing(tmp_path, run_config, dataset_file):
    runs = tmp_path / "runs"
    config = run_config()
    config["dataset"]["mapping"]["output"] = "answer"
    with pytest.raises(DatasetError, match="'answer', which is not a column"):
        RunManager(str(runs)).create(config, dataset_file)
    assert not runs.exists() or os.listdir(runs) == []


def test_read_only_runs_dir_gives_clear_error_and_keeps_runs(tmp_path, run_config, dataset_file):
    """Root ignores file modes, so as root the manager runs in a child without CAP_DAC_OVERRIDE."""
    runs = tmp_path / "runs"
    kept = RunManager(str(runs)).create(run_config(), dataset_file)
    (tmp_path / "config.json").write_text(json.dumps(run_config()))
    code = textwrap.dedent(f"""
        import json
        from sloth_plugins.studio.runs import RunManager, StudioError
        manager = RunManager({str(runs)!r})
        try:
            manager.create(json.load(open({str(tmp_path / "config.json")!r})), {dataset_file!r})
        except StudioError as exc:
            print("ERROR", exc)
        print("LISTED", [r["id"] for r in manager.list()])
    """)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv (util-linux): cannot make a directory read-only to root")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    os.chmod(runs, 0o555)
    try:
        out = subprocess.run(prefix + [sys.executable, "-P", "-c", code], capture_output=True, text=True,
                             timeout=120)
    finally:
        os.chmod(runs, 0o755)
    assert out.returncode == 0, out.stderr
    assert "ERROR cannot create a run in" in out.stdout and "Permission denied" in out.stdout
    assert f"LISTED ['{kept}']" in out.stdout
    assert os.listdir(runs) == [kept]
    assert os.path.isfile(os.path.join(runs, kept, "config.json"))


def test_loss_curves_of_two_runs_are_two_series(two_finished_runs):
    manager, ids = two_finished_runs
    rows = manager.loss_curves(ids)
    series = {}
    for row in rows:
        series.setdefault(row["run"], []).append((row["step"], row["loss"]))
    assert sorted(series) == sorted(f"seed {s} ({i})" for s, i in zip((0, 1), ids))
    for label, run_id in zip(sorted(series), sorted(ids, key=lambda i: manager.config(i)["name"])):
        assert series[label] == [(m["step"], m["loss"]) for m in manager.metrics(run_id)]
