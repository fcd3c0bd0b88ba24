import pytest
import torch


@pytest.fixture(autouse=True)
def poisoned_empty():
    """torch.empty hands out NaN-filled memory, so any element a kernel forgets to write fails."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
