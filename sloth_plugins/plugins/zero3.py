"""DeepSpeed ZeRO-3: the parameters a fused path reads outside their own module's forward.

Under ZeRO-3 every parameter is a partitioned placeholder (``shape [0]``) except while DeepSpeed
gathers it: its hooks gather a module's *own* parameters before that module's forward (and again
before its backward) and release them after. Sloth's fused paths read weights of modules whose
forward they do not call: the loss reads ``lm_head.weight`` from the CausalLM's forward, the fused
LoRA functions read the base weight and LoRA A/B of the projections (children of the layer, the
attention or the MLP they run in). Those weights are registered here as *external parameters*
of the module whose forward reads them (``deepspeed.zero.register_external_parameter``, DeepSpeed's
own mechanism for exactly this), so DeepSpeed gathers them with that module's parameters, in its
forward and in its backward, once per call of that module (never once per chunk), and releases
them after. The first call (registered now, after the module's pre-forward hook ran) gathers them
itself, in one coalesced all-gather. Gradients accumulate into the gathered parameters as they
would in the unpatched model, and DeepSpeed's own gradient hooks partition and reduce them.

ZeRO-1/2 leave parameters whole: nothing here applies to them. Looked up in ``sys.modules``: a
process that never imported DeepSpeed has no partitioned parameter.
"""
from __future__ import annotations

import sys
from typing import Iterable, List, Optional

import torch

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


class NotGathered(RuntimeError):
    """A partitioned parameter could not be made whole here; str() is the reason."""


def is_partitioned(tensor) -> bool:
    """A ZeRO-3 parameter (whole or not right now); ZeRO-1/2 parameters are plain."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_status")


def own_param(module, name: str):
    """``module.<name>`` read without DeepSpeed's parameter getter, which, inside an engine's forward,
    gathers a partitioned parameter and ties it to whatever module runs at that moment."""
    params = module.__dict__.get("_parameters")
    if isinstance(params, dict) and name in params:
        return dict.get(params, name)
    return getattr(module, name, None)


def full_shape(tensor) -> Optional[torch.Size]:
    """The parameter's real shape, also while ZeRO-3 holds only its partition."""
    if tensor is None:
        return None
    return tensor.ds_shape if is_partitioned(tensor) else tensor.shape


def partitioned_params(*modules) -> List[torch.nn.Parameter]:
    """The ZeRO-3 parameters of ``modules`` and their children (iterating does not gather them)."""
    seen, out = set(), []
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if is_partitioned(p) and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def under_zero3(module) -> bool:
    """Whether ``module``'s first parameter is a ZeRO-3 parameter (DeepSpeed converts all of a model's).
    Runs on every call of the fused paths: a dict lookup when DeepSpeed was never imported."""
    if "deepspeed" not in sys.modules:
        return False
    first = next(module.parameters(), None)
    return first is not None and is_partitioned(first)


def gather_for(owner: torch.nn.Module, params: Iterable[torch.nn.Parameter]) -> None:
    """Make ``params`` whole for the rest of ``owner``'s forward and for its backward (see the module
    docstring). Raises NotGathered, with nothing read, when one cannot be: the caller falls back."""
    params = list(params)
    if not params:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, register_external_parameter

    external = getattr(owner, "_external_params", None) or {}
    pending = []
    for p in params:
        if id(p) not in external:
            register_external_parameter(owner, p)
        if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            pending.append(p)
    if pending:
        pending[0].all_gather(param_list=pending)
    missing = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
    if missing:
        raise NotGathered(f"DeepSpeed ZeRO-3 parameter {missing[0].ds_id} is {missing[0].ds_status.name} "
                          f"where sloth needs it whole")


def only_zero3_hooks(module, names) -> bool:
    """Whether every hook on ``module``'s children ``names`` is DeepSpeed's (ZeRO-3 gathers parameters
    in them; a fused path does that by :func:`gather_for` on ``module``), none a user's or PEFT's."""
    children = module._modules
    for n in names:
        child = children[n]
        for attr in _HOOK_DICTS:
            for hook in getattr(child, attr).values():
                target = getattr(hook, "__wrapped__", hook)
                if not (getattr(target, "__module__", None) or "").startswith("deepspeed."):
                    return False
    return True

