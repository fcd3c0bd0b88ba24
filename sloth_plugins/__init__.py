"""sloth_plugins: faster, leaner LLM fine-tuning as plugins for the frameworks you already use.

    import sloth_plugins as sloth
    report = sloth.patch(model, sloth.SlothConfig())   # idempotent; returns a PatchReport
    sloth.unpatch(model)                                # exact inverse
    Trainer(..., callbacks=[sloth.SlothCallback()])     # HF Trainer / TRL SFTTrainer

Nothing is patched at import time.
"""
from .architectures import Architecture
from .config import SlothConfig, SlothConfigError, SlothUnsupported
from .hookspecs import hookimpl
from .manager import get_plugin_manager, get_state, patch, unpatch
from .report import PatchReport

__version__ = "0.1.0"

__all__ = ["Architecture", "PatchReport", "SlothCallback", "SlothConfig", "SlothConfigError", "SlothStrategy",
           "SlothUnsupported", "get_checkpoint_controller", "get_plugin_manager", "get_state", "hookimpl", "patch",
           "unpatch"]


def __getattr__(name):
    # Framework adapters import their framework; load them only when asked for.
    if name == "SlothCallback":
        from .integrations.hf import SlothCallback
        return SlothCallback
    if name == "SlothStrategy":
        from .integrations.lightning import SlothStrategy
        return SlothStrategy
    if name == "get_checkpoint_controller":   # loaded with the checkpointing package, on first use
        from .checkpointing import get_checkpoint_controller
        return get_checkpoint_controller
    raise AttributeError(f"module 'sloth_plugins' has no attribute {name!r}")
