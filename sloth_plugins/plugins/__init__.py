"""Built-in plugins: the three levers (kernels, loss, gradient checkpointing), attention and padding-free."""
from __future__ import annotations


def builtin_plugins():
    from ..checkpointing.plugin import CheckpointingPlugin
    from .attention import AttentionPlugin
    from .kernel_patching import KernelPlugin
    from .loss import LossPlugin
    from .padding_free import PaddingFreePlugin
    # The padding-free plugin stays last (and its hook is trylast): it wraps the decoder forward
    # whatever other plugins, built-in or from an entry point, may have left there.
    return [("sloth.kernels", KernelPlugin()), ("sloth.loss", LossPlugin()),
            ("sloth.checkpointing", CheckpointingPlugin()), ("sloth.attention", AttentionPlugin()),
            ("sloth.padding_free", PaddingFreePlugin())]
