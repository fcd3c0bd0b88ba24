"""Per-model state: one ``Stash`` on each patched model, one typed slot per plugin.

Modelled on pytest's ``Stash``: a plugin creates a module-level ``StashKey[T]()`` and keeps
whatever it needs for one model in ``stash[key]``. The stash is created by ``patch`` and handed
to every hook through the ``PatchContext``; it lives in one instance attribute of the causal LM
(``STATE_ATTR``), which ``unpatch`` removes and which copies of a patched model (``deepcopy``,
pickle, see ``instance_patch``) leave behind. Only this module touches that attribute: everyone
else goes through ``model_stash`` (or a plugin's own public accessor built on it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Generic, Optional, TypeVar, Union, cast

T = TypeVar("T")
D = TypeVar("D")

STATE_ATTR = "_sloth_state"     # the one attribute sloth keeps on a patched model


class StashKey(Generic[T]):
    """A typed slot in a ``Stash``; compare by identity. Create one per plugin, at module level."""

    __slots__ = ()


class Stash:
    """A typed per-model store: ``stash[key] = value``; ``stash[key]``; ``stash.get(key, default)``."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: Dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def get(self, key: StashKey[T], default: D) -> Union[T, D]:
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        try:
            return self[key]
        except KeyError:
            self[key] = default
            return default

    def pop(self, key: StashKey[T], default: D) -> Union[T, D]:
        return cast(Union[T, D], self._data.pop(key, default))

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._data[key]

    def __contains__(self, key: StashKey[T]) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<Stash of {len(self._data)} slots>"


@dataclass
class PatchContext:
    """What every patch-time hook receives as ``context`` (as pytest hands ``config`` to its plugins).

    hook: the plugin manager's hook relay (to call other hooks, e.g. ``sloth_checkpoint_plan`` or
    ``sloth_causal_lm_loss``). config: the SlothConfig. stash: the model's ``Stash``.
    """
    hook: Any
    config: Any
    stash: Stash


def model_stash(model: Any) -> Optional[Stash]:
    """The stash of a patched causal LM (already resolved: no PEFT / DDP wrappers), or None."""
    stash = getattr(model, "__dict__", {}).get(STATE_ATTR)
    return stash if isinstance(stash, Stash) else None


def attach_stash(model: Any, stash: Stash) -> None:
    model.__dict__[STATE_ATTR] = stash


def detach_stash(model: Any) -> Optional[Stash]:
    """Remove and return the model's stash (None when it had none)."""
    return model.__dict__.pop(STATE_ATTR, None)


def without_state(attributes: Dict[str, Any]) -> Dict[str, Any]:
    """A new dict: an instance ``__dict__`` without sloth's per-model state (what a copy starts from)."""
    return {k: v for k, v in attributes.items() if k != STATE_ATTR}
