"""Reversible, per-instance patching.

Every change sloth_plugins makes to a model goes through an ``InstancePatcher``: it sets an
attribute on one object (usually ``forward`` on one module) and remembers what was there, so
``restore()`` puts back exactly the previous state, in reverse order. Classes and modules
are never modified.
"""
from __future__ import annotations

import functools
import types
import warnings
from typing import Any, Callable, List, Tuple

_MISSING = object()


class InstancePatcher:
    def __init__(self) -> None:
        self._records: List[Tuple[Any, str, Any, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
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


def has_instance_override(obj: Any, name: str = "forward") -> bool:
    """True when someone else already replaced ``name`` on this instance (e.g. accelerate hooks)."""
    return name in getattr(obj, "__dict__", {})
