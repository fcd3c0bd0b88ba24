"""Reversible, per-instance patching.

Every change sloth_plugins makes to a model goes through an ``InstancePatcher``: it sets an
attribute on one object (usually ``forward`` on one module) and remembers what was there, so
``restore()`` puts back exactly the previous state, in reverse order. Classes and modules
are never modified.

Copies: the patched forwards are closures over the original modules, so a plain
``copy.deepcopy`` or pickle of a patched module would run the original's weights (and the
per-model state holds locks no pickler takes). The first patch on a ``torch.nn.Module``
therefore also sets ``__deepcopy__`` and ``__reduce_ex__`` on that instance (``copy`` and both
picklers look these up on the instance): they copy the module as it was before the patches,
without sloth's per-model state (its one Stash attribute, see ``state.without_state``). The
object ``patch`` was applied to can have an ``after_copy`` callback, which patches its deep or
unpickled copy again. ``restore()`` removes the two hooks like every other attribute.
"""
from __future__ import annotations

import copy
import functools
import sys
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .state import without_state

_MISSING = object()
_CLEAN_ONLY = object()     # a deepcopy memo key: build the unpatched copy and do not patch it again


class InstancePatcher:
    def __init__(self) -> None:
        self._records: List[Tuple[Any, str, Any, Any]] = []
        self._hooked: Dict[int, Any] = {}    # id -> the modules carrying our copy hooks
        self._after_copy: Dict[int, Callable[[Any], Optional[Callable[[Any], None]]]] = {}

    def set(self, obj: Any, name: str, value: Any) -> None:
        if isinstance(obj, torch.nn.Module) and id(obj) not in self._hooked:
            self._hooked[id(obj)] = obj
            self._set(obj, "__deepcopy__", functools.partial(self._deepcopy, obj))
            self._set(obj, "__reduce_ex__", functools.partial(self._reduce_ex, obj))
        self._set(obj, name, value)

    def after_copy(self, obj: Any, callback: Callable[[Any], Optional[Callable[[Any], None]]]) -> None:
        """``callback(obj)``, when ``obj`` is deep-copied or pickled, returns what to call with the
        finished copy (picklable: it runs at unpickling), or None."""
        self._after_copy[id(obj)] = callback

    def _set(self, obj: Any, name: str, value: Any) -> None:
        previous = obj.__dict__.get(name, _MISSING)
        setattr(obj, name, value)
        self._records.append((obj, name, previous, obj.__dict__.get(name, _MISSING)))

    def bind(self, obj: Any, name: str, fn: Callable, wraps: Callable = None) -> None:
        """Bind ``fn(self, ...)`` as an instance method ``obj.name``.

        ``wraps`` (the method being replaced) keeps its signature visible to ``inspect``:
        Trainer and PEFT read forward signatures to decide which batch columns to pass.
        """
        if wraps is not None:
            # wrap the underlying function (with self), so binding drops exactly one parameter
            fn = functools.wraps(getattr(wraps, "__func__", wraps))(fn)
        self.set(obj, name, types.MethodType(fn, obj))

    def owns(self, obj: Any, name: str) -> bool:
        """True when ``obj.name`` is, right now, a value this patcher set."""
        current = obj.__dict__.get(name, _MISSING)
        return current is not _MISSING and any(o is obj and n == name and ours is current
                                               for o, n, _, ours in self._records)

    def restore(self) -> None:
        self._hooked.clear()
        self._after_copy.clear()
        while self._records:
            obj, name, previous, ours = self._records.pop()
            if obj.__dict__.get(name, _MISSING) is not ours:
                # Someone wrapped our attribute after we set it (accelerate does this to forward):
                # removing ours would remove theirs too. Leave both and say so.
                warnings.warn(f"{type(obj).__name__}.{name} was replaced by another library after sloth_plugins "
                              f"patched it; leaving it in place", stacklevel=3)
                continue
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, previous)

    def __len__(self) -> int:
        return len(self._records)

    # ---- copies -------------------------------------------------------------------------------
    def _unpatched_state(self, obj: Any, state: Any) -> Any:
        """``obj``'s state (from ``__getstate__``) as it was before our patches."""
        if not isinstance(state, dict):
            return state
        state = without_state(state)
        chains: Dict[str, list] = {}
        for o, name, previous, ours in self._records:
            if o is obj:
                chains.setdefault(name, [previous, ours])[1] = ours
        for name, (previous, ours) in chains.items():
            if state.get(name, _MISSING) is not ours:
                continue          # replaced by another library since: kept, as restore() keeps it
            if previous is _MISSING:
                state.pop(name, None)
            else:
                state[name] = previous
        return state

    def _deepcopy(self, obj: Any, memo: dict) -> Any:
        caller = sys._getframe(1)
        if caller.f_code is copy.deepcopy.__code__ and caller.f_locals.get("x", obj) is not obj:
            # A wrapper that forwards unknown attributes to obj (PeftModel, FSDP) handed copy.deepcopy
            # our hook: copy the wrapper as copy.deepcopy would have.
            wrapper = caller.f_locals["x"]
            return copy._reconstruct(wrapper, memo, *_class_reduce(wrapper, 4))
        func, args, state, listiter, dictiter = _class_reduce(obj, 4)
        dup = copy._reconstruct(obj, memo, func, args, self._unpatched_state(obj, state), listiter, dictiter)
        # objects we patched that carry no hooks (a model config) and were copied along
        for o, name, previous in self._first_previous():
            twin = memo.get(id(o))
            if id(o) not in self._hooked and twin is not None and twin is not o:
                if previous is _MISSING:
                    twin.__dict__.pop(name, None)
                else:
                    setattr(twin, name, copy.deepcopy(previous, memo))
        if _CLEAN_ONLY not in memo:
            after = self._after(obj)
            if after is not None:
                after(dup)
        return dup

    def _reduce_ex(self, obj: Any, protocol: int):
        func, args, state, listiter, dictiter = _class_reduce(obj, protocol)
        if sys._getframe(1).f_code is copy.copy.__code__:
            # copy.copy: a shallow copy, unpatched at this level (its children are shared, and stay patched)
            return func, args, self._unpatched_state(obj, state), listiter, dictiter
        # Pickle the unpatched deep copy, its tensors shared with obj rather than duplicated.
        memo = {id(t): t for t in _tensors(obj)}
        memo[_CLEAN_ONLY] = True
        clean = copy.deepcopy(obj, memo)
        func, args, state, listiter, dictiter = _class_reduce(clean, protocol)
        after = self._after(obj)
        if after is None:
            return func, args, state, listiter, dictiter
        return func, args, state, listiter, dictiter, functools.partial(_set_state_then, after)

    def _after(self, obj: Any) -> Optional[Callable[[Any], None]]:
        callback = self._after_copy.get(id(obj))
        return callback(obj) if callback is not None else None

    def _first_previous(self) -> List[Tuple[Any, str, Any]]:
        """(object, name, the value before our first set) for every attribute we set."""
        first: Dict[Tuple[int, str], Tuple[Any, str, Any]] = {}
        for o, name, previous, _ in self._records:
            first.setdefault((id(o), name), (o, name, previous))
        return list(first.values())


def _class_reduce(obj: Any, protocol: int) -> tuple:
    """What ``__reduce_ex__`` of obj's class returns, padded to five items."""
    rv = type(obj).__reduce_ex__(obj, protocol)
    return tuple(rv) + (None,) * (5 - len(rv))


def _tensors(module: torch.nn.Module) -> List[torch.Tensor]:
    found = list(module.parameters()) + list(module.buffers())
    for m in module.modules():
        found.extend(v for v in m.__dict__.values() if isinstance(v, torch.Tensor))
    return found


def _set_state_then(after: Callable[[Any], None], obj: Any, state: Any) -> None:
    """An unpickler's state_setter: set the state as pickle would, then ``after(obj)``."""
    setstate = getattr(obj, "__setstate__", None)
    if setstate is not None:
        setstate(state)
    else:
        obj.__dict__.update(state)
    after(obj)


def has_instance_override(obj: Any, name: str = "forward") -> bool:
    """True when someone else already replaced ``name`` on this instance (e.g. accelerate hooks)."""
    return name in getattr(obj, "__dict__", {})
