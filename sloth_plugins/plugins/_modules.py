"""Small helpers for finding modules and rebuilding functions; no math here."""
from __future__ import annotations

import types
from typing import Any, Callable, Iterator, Optional, Tuple

import torch


def get_path(root: torch.nn.Module, path: Optional[str]) -> Optional[Any]:
    if not path:
        return None
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_prefix(model: torch.nn.Module) -> str:
    """The attribute of a Hugging Face CausalLM that holds its decoder (``base_model_prefix``)."""
    return getattr(model, "base_model_prefix", "model")


def decoder_path(model: torch.nn.Module, arch=None) -> str:
    """Where the decoder is: the table entry's ``decoder`` (vision-language models), else the model's
    ``base_model_prefix``."""
    return getattr(arch, "decoder", None) or decoder_prefix(model)


def find_decoder(model: torch.nn.Module, arch=None) -> Optional[Any]:
    """The decoder (``model.model`` for Llama; for a vision-language model the module that also runs
    the vision tower) of a CausalLM, or None when there is none."""
    return get_path(model, decoder_path(model, arch))


def decoder_layers(model: torch.nn.Module, layers_path: str) -> Iterator[Tuple[str, torch.nn.Module]]:
    layers = get_path(model, layers_path)
    if layers is None:
        return iter(())
    return ((f"{layers_path}.{i}", layer) for i, layer in enumerate(layers))


def _copy_function(fn: types.FunctionType, globals_: dict = None, closure: tuple = None) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, fn.__globals__ if globals_ is None else globals_, fn.__name__,
                             fn.__defaults__, fn.__closure__ if closure is None else closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    return new


def rebind_global(fn: Callable, name: str, original: Any, replacement: Any) -> Optional[types.FunctionType]:
    """A copy of ``fn`` whose reference to the global ``name`` resolves to ``replacement``.

    Follows decorator chains (``__wrapped__`` held in a closure cell) and rebuilds each level,
    so decorators keep working. Returns None when the chain cannot be rebuilt. The module the
    function lives in is not touched: only the copy sees the replacement.
    """
    if not isinstance(fn, types.FunctionType):
        return None
    if name in fn.__code__.co_names and fn.__globals__.get(name) is original:
        scope = dict(fn.__globals__)
        scope[name] = replacement
        return _copy_function(fn, globals_=scope)
    inner = getattr(fn, "__wrapped__", None)
    if inner is None or not fn.__closure__:
        return None
    new_inner = rebind_global(inner, name, original, replacement)
    if new_inner is None:
        return None
    cells, found = [], False
    for cell in fn.__closure__:
        try:
            contents = cell.cell_contents
        except ValueError:
            cells.append(cell)
            continue
        if contents is inner:
            cells.append(types.CellType(new_inner))
            found = True
        else:
            cells.append(cell)
    if not found:
        return None
    new = _copy_function(fn, closure=tuple(cells))
    new.__wrapped__ = new_inner
    return new
