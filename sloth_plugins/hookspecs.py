"""The extension API: every hook sloth_plugins calls, and what it expects back.

Plugins implement these with ``@sloth_plugins.hookimpl`` and register through the
``sloth_plugins`` entry-point group (or ``get_plugin_manager().register(obj)``). The built-in
plugins (kernels, loss, gradient checkpointing, attention, padding-free) are ordinary
implementations.

An implementation may take any subset of a spec's arguments (pluggy passes those it names), so
arguments added here later never break an existing plugin. The patch-time hooks
(``sloth_patch_model``, ``sloth_reassert``, ``sloth_unpatch_model``) receive ``context``, a
``sloth_plugins.state.PatchContext``, as pytest hands ``config`` to its plugins:

* ``context.hook``: the hook relay, to call other hooks (``context.hook.sloth_checkpoint_plan(...)``);
  plugins never import the plugin manager.
* ``context.config``: the SlothConfig.
* ``context.stash``: the model's per-model ``Stash``. Keep what you need for one model in your own
  slot, ``context.stash[KEY]`` with ``KEY = sloth_plugins.state.StashKey[YourState]()`` created at
  module level: it lives exactly as long as the patch (``unpatch`` drops it; a copy of a patched
  model gets a fresh one when it is patched again), instead of module-level tables keyed by
  ``id()`` of a model, config or layer.
"""
from __future__ import annotations

import pluggy

# One name for the whole extension surface: the distribution, the import name, the entry-point
# group third-party plugins register under, and the pluggy project (``@sloth_plugins.hookimpl``).
PROJECT = "sloth_plugins"
LEGACY_PROJECT = "sloth"   # the pluggy project's name before 0.1.1: its hookimpl markers still load
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def sloth_architectures():
    """Return an iterable of ``Architecture`` entries this plugin knows about.

    Later registrations win for the same ``model_type``, so a plugin can refine a built-in.
    """


@hookspec
def sloth_patch_model(model, config, report, arch, patcher, context):
    """Patch the modules this plugin owns.

    model: the transformers CausalLM (PEFT wrappers already peeled off).
    config: the SlothConfig. report: the PatchReport to record into (``report.patched`` /
    ``report.fallback`` with a one-line reason). arch: the ``Architecture`` entry or None for
    an unknown family (only generic patches apply then). patcher: the ``InstancePatcher`` to
    make every change through, so ``unpatch`` can undo it exactly. context: the PatchContext
    (hook relay, config, the model's Stash; see the module docstring).
    Raise ``SlothUnsupported`` for a fall back that ``config.strict`` must turn into an error.
    """


@hookspec
def sloth_reassert(model, config, context):
    """``patch`` was called again with the same config: re-apply state a framework may have reset."""


@hookspec
def sloth_unpatch_model(model, context):
    """Release any state the plugin keeps outside the InstancePatcher (buffers, streams).

    Called after the patcher restored every attribute; ``context.stash`` is the model's stash,
    already detached from the model (it is dropped after this hook).
    """


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
