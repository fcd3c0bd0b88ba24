"""Test environment: no hub, no telemetry, Triton interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is decided here,
before test modules import the kernels.
"""
import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false", "UNSLOTH_DISABLE_STATISTICS": "1",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on the H200")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _sloth_logger_enabled():
    """Axolotl configures logging with disable_existing_loggers=True, which silences our logger
    for every later test in the same process; the tests that read our log lines need it back."""
    import logging
    logging.getLogger("sloth_plugins").disabled = False
    yield
