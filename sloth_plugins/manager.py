"""The plugin manager and the two public verbs, ``patch`` and ``unpatch``."""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import pluggy
import torch

from . import hookspecs
from .architectures import BUILTIN_ARCHITECTURES, ArchitectureTable
from .config import SlothConfig, SlothUnsupported
from .instance_patch import InstancePatcher
from .models import resolve_causal_lm
from .report import PatchReport
from .state import PatchContext, Stash, StashKey, attach_stash, detach_stash, model_stash

logger = logging.getLogger("sloth_plugins")

ENTRY_POINT_GROUP = hookspecs.PROJECT      # the same name as the pluggy project
_manager: Optional[pluggy.PluginManager] = None


class _PluginManager(pluggy.PluginManager):
    """pluggy's manager that also reads hookimpls marked for the project's old name,
    ``pluggy.HookimplMarker("sloth")``, with a DeprecationWarning naming ``sloth_plugins.hookimpl``."""

    def parse_hookimpl_opts(self, plugin, name):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None or not name.startswith("sloth_"):
            return opts
        method = getattr(plugin, name, None)
        legacy = getattr(method, hookspecs.LEGACY_PROJECT + "_impl", None) if callable(method) else None
        if not isinstance(legacy, dict):
            return None
        warnings.warn(f"{name} of {getattr(plugin, '__name__', type(plugin).__name__)} is marked with "
                      f"pluggy.HookimplMarker({hookspecs.LEGACY_PROJECT!r}); use @sloth_plugins.hookimpl "
                      f"(the project is now named {hookspecs.PROJECT!r})", DeprecationWarning, stacklevel=2)
        return dict(legacy)


class _BuiltinArchitectures:
    @hookspecs.hookimpl
    def sloth_architectures(self):
        return BUILTIN_ARCHITECTURES


def get_plugin_manager() -> pluggy.PluginManager:
    """The one PluginManager: built-in plugins plus the ``sloth_plugins`` entry-point group."""
    global _manager
    if _manager is None:
        from .plugins import builtin_plugins
        pm = _PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(_BuiltinArchitectures(), name="sloth.architectures")
        for name, plugin in builtin_plugins():
            pm.register(plugin, name=name)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _manager = pm
    return _manager


def architecture_table(pm: Optional[pluggy.PluginManager] = None) -> ArchitectureTable:
    pm = pm or get_plugin_manager()
    table = ArchitectureTable()
    # pluggy calls the most recently registered plugin first; apply oldest first so later ones win
    for entries in reversed(pm.hook.sloth_architectures()):
        for arch in entries or ():
            table.add(arch)
    return table


@dataclass
class SlothState:
    config: SlothConfig
    report: PatchReport
    patcher: InstancePatcher
    structure: tuple = ()     # _structure(lm) when patched


STATE = StashKey[SlothState]()   # the manager's own slot in each patched model's Stash


def _structure(lm: torch.nn.Module) -> tuple:
    """The module tree patch() saw: PEFT wrapping the model (LoRA layers in place of its Linears)
    or adding an adapter changes it, and then the patches must be decided again."""
    return tuple((name, id(module)) for name, module in lm.named_modules())


def get_state(model: Any) -> Optional[SlothState]:
    """The config, report and patcher of a patched model (PEFT / DDP wrappers peeled off), or None."""
    try:
        inner = resolve_causal_lm(model)
    except TypeError:
        return None
    return _state(inner)


def _state(lm: torch.nn.Module) -> Optional[SlothState]:
    stash = model_stash(lm)
    return stash.get(STATE, None) if stash is not None else None


def patch(model: Any, config: Optional[SlothConfig] = None, **options: Any) -> PatchReport:
    """Patch ``model`` in place and return the PatchReport. Idempotent.

    Patching again with the same config re-asserts the patches (e.g. the checkpointing plan
    after a framework called ``gradient_checkpointing_enable()``) and returns the same report;
    with another config, or after the module tree changed (PEFT wrapped the patched model), the
    old patches are undone first and the model patched afresh. ``config`` may also be a dict of
    SlothConfig keys (as read from YAML or JSON); keyword options override its values.
    """
    config = SlothConfig.resolve(config, "sloth_plugins.patch(model, config)", **options)
    lm = resolve_causal_lm(model)
    state = _state(lm)
    if state is not None and state.config == config and state.structure == _structure(lm):
        # Re-assert without re-patching: frameworks may have wrapped our forwards since (accelerate).
        hook = get_plugin_manager().hook
        hook.sloth_reassert(model=lm, config=config, context=PatchContext(hook, config, model_stash(lm)))
        return state.report
    if state is not None:
        unpatch(lm)

    from .kernels import triton_status
    pm = get_plugin_manager()
    model_type = getattr(lm.config, "model_type", "unknown")
    arch = architecture_table(pm).lookup(model_type, type(lm).__name__)
    device = next(lm.parameters()).device
    report = PatchReport(model_type=model_type, architecture=arch.name if arch else None, device=str(device),
                         triton=triton_status())
    if arch is None:
        message = (f"model_type {model_type!r} has no architecture entry (known: "
                   f"{', '.join(architecture_table(pm).model_types())}); only the generic loss and "
                   f"checkpointing patches apply")
        if config.strict:
            raise SlothUnsupported(message + " (strict=True)")
        warnings.warn(message, stacklevel=2)
        report.note(message)

    patcher = InstancePatcher()
    stash = Stash()
    context = PatchContext(pm.hook, config, stash)
    try:
        pm.hook.sloth_patch_model(model=lm, config=config, report=report, arch=arch, patcher=patcher,
                                  context=context)
    except BaseException:
        patcher.restore()
        raise
    if config.strict and report.fallbacks():
        patcher.restore()
        raise SlothUnsupported("strict=True and some modules fell back:\n" + str(report))
    patcher.after_copy(lm, _repatch_copies)
    stash[STATE] = SlothState(config=config, report=report, patcher=patcher, structure=_structure(lm))
    attach_stash(lm, stash)
    logger.debug("%s", report)   # the adapters announce it (verbose=True)
    return report


def _repatch_copies(lm: torch.nn.Module):
    """For a deep copy or pickle of the patched ``lm``: what patches the (unpatched) copy as ``lm`` is."""
    state = _state(lm)
    if state is None:
        return None
    from .checkpointing import get_checkpoint_controller
    controller = get_checkpoint_controller(lm)
    return functools.partial(_patch_copy, state.config, controller.framework_request if controller else None)


def _patch_copy(config: SlothConfig, framework_request, copy: torch.nn.Module) -> None:
    # The copy is the model before the patch: give it the gradient-checkpointing request a framework
    # made since (as unpatch would replay it), then patch it.
    if framework_request is not None:
        args, kwargs = framework_request
        copy._set_gradient_checkpointing(*args, **kwargs)
    try:
        patch(copy, config)
    except Exception as exc:   # noqa: BLE001 - an unpatched copy still computes the right thing
        warnings.warn(f"sloth_plugins: a copy of a patched {type(copy).__name__} could not be patched again, it "
                      f"runs unpatched: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)


def unpatch(model: Any) -> bool:
    """Undo every patch on ``model`` exactly. Returns False when it was not patched."""
    lm = resolve_causal_lm(model)
    stash = detach_stash(lm)
    state = stash.get(STATE, None) if stash is not None else None
    if state is None:
        return False
    state.patcher.restore()
    hook = get_plugin_manager().hook
    hook.sloth_unpatch_model(model=lm, context=PatchContext(hook, state.config, stash))
    return True
