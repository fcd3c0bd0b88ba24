"""What a mixture-of-experts CausalLM returns of its router, read from the installed model class.

The table says where a family's experts live and which load-balancing loss its forward adds; whether
the installed transformers' forward returns router logits at all is read here, from the output class
the CausalLM's forward (and its decoder's) declares. GLM-4.5 (``glm4_moe``) is the case in point:
transformers 5.16 returns ``CausalLMOutputWithPast`` (no router logits, ``output_router_logits`` has
no effect), later releases ``MoeCausalLMOutputWithPast`` with them.

Three outcomes, each exact:
* carried: the fast loss asks the decoder for the router logits when the call or config does, returns
  them in the model's own output class, and adds the table's load-balancing loss (if any) as the model does;
* none: the forward returns no router logits and the family adds no loss term from them, so asking for
  them changes nothing: the fast loss runs as for a dense model, in the model's own output class, and the
  report says router logits are unavailable;
* unknown (the output class is unreadable, or a loss function the table names is missing): calls asking
  for router logits run the model's own forward, and the report's loss line says so when one does.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from dataclasses import dataclass
from typing import Callable, FrozenSet, Optional

CARRIED, NONE, UNKNOWN = "carried", "none", "unknown"


@dataclass(frozen=True)
class RouterOutputs:
    state: str                               # CARRIED, NONE or UNKNOWN
    output_class: type                       # the ModelOutput class the fast forward returns
    aux: Optional[Callable] = None           # load-balancing loss added when router logits are asked (CARRIED)
    note: str = ""                           # what the report says of it

    @property
    def carried(self) -> bool:
        return self.state == CARRIED

    @property
    def asking_is_safe(self) -> bool:
        """Whether a call asking for router logits can take the fast loss (it gets what the model gives)."""
        return self.state in (CARRIED, NONE)

    def fields(self) -> FrozenSet[str]:
        return _fields(self.output_class)


def declared_output(forward) -> Optional[type]:
    """The ModelOutput dataclass a forward declares it returns (``-> X`` or ``-> tuple | X``), or None."""
    try:
        annotation = inspect.signature(forward).return_annotation
        if isinstance(annotation, str):
            annotation = typing.get_type_hints(forward).get("return")
    except (NameError, TypeError, ValueError, AttributeError):
        return None
    candidates = typing.get_args(annotation) or (annotation,)
    classes = [c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)]
    return classes[0] if len(classes) == 1 else None


def _fields(cls) -> FrozenSet[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def router_outputs(model, arch, decoder) -> Optional[RouterOutputs]:
    """What ``model`` (a CausalLM of table entry ``arch``; ``decoder`` the module its loss runs) returns of
    its router; None for a family without experts (the plain path)."""
    if arch is None or arch.experts is None:
        return None
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast
    cls = type(model).__name__
    declared = declared_output(type(model).forward)
    if declared is None or not {"loss", "logits"} <= _fields(declared):
        return RouterOutputs(UNKNOWN, MoeCausalLMOutputWithPast,
                             note=f"{cls}.forward declares no output class sloth can read: calls asking for router "
                                  f"logits run the model's own forward")
    inner = declared_output(type(decoder).forward) if decoder is not None else None
    returns_logits = "router_logits" in _fields(declared) and (inner is None or "router_logits" in _fields(inner))
    aux = _router_aux_loss(model, arch) if "aux_loss" in _fields(declared) else None
    if arch.router_aux_loss and (aux is None or not returns_logits):
        return RouterOutputs(UNKNOWN, declared,
                             note=f"the installed {cls} lacks what its load-balancing loss "
                                  f"({arch.router_aux_loss}) needs: calls asking for router logits run the "
                                  f"model's own forward")
    if returns_logits:
        return RouterOutputs(CARRIED, declared, aux)
    import transformers
    return RouterOutputs(NONE, declared,
                         note=f"router logits unavailable: {cls} of the installed transformers "
                              f"({transformers.__version__}) returns {declared.__name__}, without router logits "
                              f"(output_router_logits has no effect on it); sloth's loss runs as for a dense model")


def _router_aux_loss(model, arch) -> Optional[Callable]:
    """The table's load-balancing loss function of a MoE family, from the model's own module, when the
    CausalLM carries what its forward passes to it; else None."""
    fn = getattr(sys.modules.get(type(model).__module__), arch.router_aux_loss or "", None)
    if not callable(fn) or any(not hasattr(model, a) for a in ("num_experts", "num_experts_per_tok",
                                                               "router_aux_loss_coef")):
        return None
    return fn
