"""Studio test fixtures: a tiny model folder, and run configs that train it in a few seconds on CPU."""
import pytest

from sloth_plugins.testing import DATA_FILE, save_tiny_model_folder

ALPACA = {"format": "alpaca", "instruction": "instruction", "input": None, "output": "response"}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return save_tiny_model_folder(str(tmp_path_factory.mktemp("studio") / "tiny-llama"))


@pytest.fixture
def run_config(model_dir):
    def make(**training):
        options = dict(max_steps=20, max_length=64, learning_rate=2e-3, save_steps=5)
        options.update(training)
        return {"model": model_dir, "dataset": {"mapping": dict(ALPACA)}, "training": options}
    return make


@pytest.fixture
def dataset_file():
    return DATA_FILE



@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, model_dir):
    """A real 10-step LoRA run of the tiny model (the worker subprocess): (manager, run_id)."""
    from sloth_plugins.studio.runs import RunManager
    manager = RunManager(str(tmp_path_factory.mktemp("finished") / "runs"))
    run_id = manager.create({"model": model_dir, "name": "tiny", "dataset": {"mapping": dict(ALPACA)},
                             "training": dict(max_steps=10, max_length=64, learning_rate=5e-3, save_steps=5)},
                            DATA_FILE)
    manager.start(run_id)
    status = manager.wait(run_id, timeout=300)
    assert status["state"] == "finished", manager.log_tail(run_id)
    return manager, run_id
