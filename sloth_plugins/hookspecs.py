"""The extension API: every hook sloth_plugins calls, and what it expects back.

Plugins implement these with ``@sloth_plugins.hookimpl`` and register through the
``sloth_plugins`` entry-point group (or ``get_plugin_manager().register(obj)``). The three
built-in plugins (kernels, loss, gradient checkpointing) are ordinary implementations.
"""
from __future__ import annotations

import pluggy

PROJECT = "sloth"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def sloth_architectures():
    """Return an iterable of ``Architecture`` entries this plugin knows about.

    Later registrations win for the same ``model_type``, so a plugin can refine a built-in.
    """


@hookspec
def sloth_patch_model(model, config, report, arch, patcher):
    """Patch the modules this plugin owns.

    model: the transformers CausalLM (PEFT wrappers already peeled off).
    config: the SlothConfig. report: the PatchReport to record into (``report.patched`` /
    ``report.fallback`` with a one-line reason). arch: the ``Architecture`` entry or None for
    an unknown family (only generic patches apply then). patcher: the ``InstancePatcher`` to
    make every change through, so ``unpatch`` can undo it exactly.
    Raise ``SlothUnsupported`` for a fall back that ``config.strict`` must turn into an error.
    """


@hookspec
def sloth_reassert(model, config):
    """``patch`` was called again with the same config: re-apply state a framework may have reset."""


@hookspec
def sloth_unpatch_model(model):
    """Release any state the plugin keeps outside the InstancePatcher (buffers, streams)."""


@hookspec(firstresult=True)
def sloth_causal_lm_loss(hidden_states, lm_head, labels, num_items_in_batch, config, softcap):
    """Return the scalar causal-LM loss without materialising full logits, or None to pass.

    hidden_states: [tokens, hidden] already aligned with ``labels`` [tokens] (shifted; -100
    ignored). Reduction: sum / num_items_in_batch when given, else mean over valid tokens.
    """


@hookspec(firstresult=True)
def sloth_checkpoint_plan(model, config, layers, budget_bytes):
    """Return one decision per decoder layer (a list as long as ``layers``), or None to pass.

    Each entry is one of:
      "keep"       no checkpointing: the layer holds its activations until its backward;
      "recompute"  checkpointed: holds only its input, re-runs its forward in backward;
      "offload"    checkpointed, and its input waits in host memory until the layer above starts
                   its backward (inputs under 1 MiB on CUDA stay on the device);
      "framework"  "recompute" while the framework has enabled gradient checkpointing
                   (``gradient_checkpointing_enable()``), "keep" otherwise;
      "auto"       plan it: measure the first training step, then keep / recompute / offload each
                   layer to fit ``budget_bytes`` ("auto" goes for every layer or none; with
                   ``budget_bytes`` None it behaves as "framework").
    Lists may mix "keep", "recompute", "offload" and "framework". The first non-None result wins;
    the built-in plugin answers last, from ``config.gradient_checkpointing``. Anything else, or
    a list of another length, raises ValueError at patch time.

    budget_bytes is the device memory the plan may fill (None when unknown, e.g. on CPU).
    """
