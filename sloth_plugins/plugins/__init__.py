"""Built-in plugins: the three levers (kernels, loss, gradient checkpointing) and attention."""
from __future__ import annotations


def builtin_plugins():
    from .attention import AttentionPlugin
    from .checkpointing import CheckpointingPlugin
    from .kernel_patching import KernelPlugin
    from .loss import LossPlugin
    return [("sloth.kernels", KernelPlugin()), ("sloth.loss", LossPlugin()),
            ("sloth.checkpointing", CheckpointingPlugin()), ("sloth.attention", AttentionPlugin())]
