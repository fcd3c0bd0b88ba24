"""Checkpointed layers' inputs parked in host memory between their forward and their backward.

``ActivationOffloader.park`` is called by ``layer_node`` for the layer's inputs. Where that
is not usable (torch.distributed, torch.compile, trainable tensors among the layer's bound
arguments) the plugin uses torch's checkpoint instead, and
``ActivationOffloader.hooks(generation, index)`` is a ``saved_tensors_hooks`` context put around a
non-reentrant ``torch.utils.checkpoint`` call. Inside the checkpoint the layer's own saves go
to the checkpoint (and are recomputed); the only tensors that reach our hooks are the
checkpoint's inputs, i.e. the layer's input hidden states. Those are copied to a pooled host
buffer on a side CUDA stream (the device copy is freed as soon as the copy is done) and
copied back, again on the side stream, when ``prefetch`` asks for them: the plugin does
that when the layer above starts its backward, so the copy overlaps that layer's compute.

On a CPU "device" the same path runs with plain synchronous copies, which is what the CPU
tests exercise. Pinned host memory is used when available; if pinning fails the pool warns
once and uses pageable memory (the copies then stall the host).
"""
from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Tuple

import torch

# Inputs below this size stay on the accelerator: a host round trip costs more than it frees.
CUDA_OFFLOAD_MIN_BYTES = 1 << 20
_MIN_BUFFER_BYTES = 1 << 12


def offload_min_bytes(device: torch.device) -> int:
    return CUDA_OFFLOAD_MIN_BYTES if torch.device(device).type == "cuda" else 0


def _bucket(nbytes: int) -> int:
    return max(_MIN_BUFFER_BYTES, 1 << (max(nbytes, 1) - 1).bit_length())


@dataclass
class PoolStats:
    total_bytes: int        # host bytes the pool holds (in use + free)
    in_use_bytes: int
    high_water_bytes: int   # the most ever in use at once; the pool trims its free list down to it
    buffers: int
    allocations: int        # host allocations made so far (constant once a loop reaches steady state)
    pinned: bool


class HostBufferPool:
    """Host byte buffers reused across steps.

    A request takes the smallest free buffer that is large enough and whose last copy has
    completed; otherwise a new power-of-two sized buffer is allocated and free buffers are
    dropped (least recently released first) until the pool is no larger than the most it
    ever had in use at once. Constant shapes therefore allocate only in the first step, and
    varying shapes cannot make it grow without bound.
    """

    def __init__(self, pin: bool):
        self.pinned = bool(pin)
        self._lock = threading.RLock()
        self._free: "OrderedDict[int, Tuple[torch.Tensor, Optional[object]]]" = OrderedDict()
        self._in_use: Dict[int, torch.Tensor] = {}
        self._total = 0
        self._high_water = 0
        self._allocations = 0
        self._warned = False

    def acquire(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            buffer = self._take_free(nbytes)
            if buffer is None:
                buffer = self._allocate(_bucket(nbytes))
                self._total += buffer.numel()
            self._in_use[id(buffer)] = buffer
            in_use = sum(b.numel() for b in self._in_use.values())
            self._high_water = max(self._high_water, in_use)
            self._trim()
            return buffer

    def release(self, buffer: torch.Tensor, ready_event: Optional[object] = None) -> None:
        """Give a buffer back; ``ready_event`` (a CUDA event) marks the end of its last copy."""
        with self._lock:
            if self._in_use.pop(id(buffer), None) is None:
                return
            self._free[id(buffer)] = (buffer, ready_event)

    def stats(self) -> PoolStats:
        with self._lock:
            in_use = sum(b.numel() for b in self._in_use.values())
            return PoolStats(self._total, in_use, self._high_water, len(self._in_use) + len(self._free),
                             self._allocations, self.pinned)

    def clear(self) -> None:
        """Drop the free buffers (buffers still in use are dropped when given back)."""
        with self._lock:
            for buffer, event in self._free.values():
                _wait(event)
                self._total -= buffer.numel()
            self._free.clear()

    def _take_free(self, nbytes: int) -> Optional[torch.Tensor]:
        best = None
        for key, (buffer, _event) in self._free.items():
            if buffer.numel() >= nbytes and (best is None or buffer.numel() < self._free[best][0].numel()):
                best = key
        if best is None:
            return None
        buffer, event = self._free.pop(best)
        _wait(event)
        return buffer

    def _trim(self) -> None:
        while self._free and self._total > self._high_water:
            _, (buffer, event) = self._free.popitem(last=False)
            _wait(event)
            self._total -= buffer.numel()

    def _allocate(self, nbytes: int) -> torch.Tensor:
        self._allocations += 1
        if self.pinned:
            try:
                return self._allocate_pinned(nbytes)
            except RuntimeError as exc:
                self.pinned = False
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"sloth_plugins offload: pinning host memory failed ({exc}); using pageable "
                                  f"memory, so the copies to and from the device will stall the host",
                                  RuntimeWarning, stacklevel=4)
        return torch.empty(nbytes, dtype=torch.uint8)

    @staticmethod
    def _allocate_pinned(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _wait(event: Optional[object]) -> None:
    if event is not None:
        event.synchronize()


class ParkedTensor:
    """One tensor waiting in host memory; returns its buffer to the pool when garbage-collected."""

    __slots__ = ("_offloader", "_buffer", "host", "device", "key", "_device_tensor", "_ready", "_fetch_stream",
                 "__weakref__")

    def __init__(self, offloader: "ActivationOffloader", buffer: torch.Tensor, host: torch.Tensor,
                 device: torch.device, key: Tuple[Hashable, int]):
        self._offloader, self._buffer, self.host, self.device, self.key = offloader, buffer, host, device, key
        self._device_tensor: Optional[torch.Tensor] = None
        self._ready = None
        self._fetch_stream = None

    @property
    def fetching(self) -> bool:
        return self._device_tensor is not None

    def fetch_async(self) -> bool:
        """Start the copy back to the device; False when it was already started."""
        if self._device_tensor is not None:
            return False
        self._device_tensor, self._ready, self._fetch_stream = self._offloader._to_device(self)
        return True

    def take(self) -> torch.Tensor:
        if self.fetch_async():
            self._offloader.fetched_on_demand += 1
        tensor, ready, stream = self._device_tensor, self._ready, self._fetch_stream
        self._device_tensor = self._ready = self._fetch_stream = None
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            if current != stream:
                tensor.record_stream(current)
        return tensor

    def __del__(self):
        try:
            self._offloader._release(self._buffer, self.device, self.key)
        except Exception:  # interpreter shutdown; nothing to give back to
            pass


class ActivationOffloader:
    """Pack/unpack hooks that park checkpoint inputs in host memory, with prefetch by key.

    Keys are ``(generation, layer_index)``: the plugin bumps the generation each forward, so a
    prefetch finds the layer of the same forward.
    """

    def __init__(self, min_bytes: Optional[int] = None):
        self.min_bytes = min_bytes
        self._pools: Dict[str, HostBufferPool] = {}
        self._streams: Dict[torch.device, object] = {}
        self._parked: Dict[Hashable, Dict[int, "weakref.ref[ParkedTensor]"]] = {}
        self._lock = threading.RLock()
        self.parked_count = 0        # tensors sent to the host so far
        self.kept_count = 0          # tensors left on the device (too small, non-contiguous, ...)
        self.prefetched = 0          # copies back started ahead of the backward that needs them
        self.fetched_on_demand = 0   # copies back started only when the backward asked (a stall on CUDA)

    # ---- hooks -------------------------------------------------------------------------
    def hooks(self, generation: Hashable, index: int) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, generation, index), self._unpack)

    def should_park(self, tensor: torch.Tensor) -> bool:
        minimum = offload_min_bytes(tensor.device) if self.min_bytes is None else self.min_bytes
        # exact type: no Parameters, no subclasses (DTensor, quantized wrappers) whose copy means something else
        return (type(tensor) is torch.Tensor and tensor.layout == torch.strided and not tensor.is_quantized
                and tensor.is_contiguous() and tensor.numel() * tensor.element_size() >= max(minimum, 1))

    def _pack(self, tensor: torch.Tensor, generation: Hashable, index: int):
        parked = self.park(tensor, generation, index)
        return tensor if parked is None else parked

    def park(self, tensor: torch.Tensor, generation: Hashable, index: int) -> Optional[ParkedTensor]:
        """The tensor sent to host memory under ``(generation, index)``; None when it stays (``should_park``)."""
        if not self.should_park(tensor):
            self.kept_count += 1
            return None
        parked = self._to_host(tensor, (generation, index))
        with self._lock:
            self._parked.setdefault(generation, {})[index] = weakref.ref(parked)
        self.parked_count += 1
        return parked

    @staticmethod
    def _unpack(packed):
        return packed.take() if isinstance(packed, ParkedTensor) else packed

    # ---- prefetch ----------------------------------------------------------------------
    def prefetch(self, generation: Hashable, index: int) -> bool:
        parked = self._lookup(generation, index)
        if parked is not None and parked.fetch_async():
            self.prefetched += 1
        return parked is not None

    def _lookup(self, generation: Hashable, index: int) -> Optional[ParkedTensor]:
        with self._lock:
            ref = self._parked.get(generation, {}).get(index)
            return ref() if ref is not None else None

    def live_parked(self) -> int:
        """Tensors parked and not yet garbage-collected (0 between steps: nothing leaks)."""
        with self._lock:
            return sum(len(layers) for layers in self._parked.values())

    # ---- copies ------------------------------------------------------------------------
    def pool(self, device: torch.device) -> HostBufferPool:
        kind = torch.device(device).type
        with self._lock:
            if kind not in self._pools:
                self._pools[kind] = HostBufferPool(pin=kind == "cuda")
            return self._pools[kind]

    def pool_stats(self) -> Dict[str, PoolStats]:
        with self._lock:
            return {kind: pool.stats() for kind, pool in self._pools.items()}

    def _side_stream(self, device: torch.device):
        with self._lock:
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            return self._streams[device]

    def _to_host(self, tensor: torch.Tensor, key: Tuple[Hashable, int]) -> ParkedTensor:
        nbytes = tensor.numel() * tensor.element_size()
        pool = self.pool(tensor.device)
        buffer = pool.acquire(nbytes)
        host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        if tensor.device.type == "cuda":
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))   # the tensor is produced there
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=pool.pinned)
            tensor.record_stream(stream)    # its device memory is reused only once the copy is done
        else:
            host.copy_(tensor)
        return ParkedTensor(self, buffer, host, tensor.device, key)

    def _to_device(self, parked: ParkedTensor):
        host, device = parked.host, parked.device
        if device.type != "cuda":
            return host.to(device, copy=True), None, None
        current = torch.cuda.current_stream(device)
        tensor = torch.empty(host.shape, dtype=host.dtype, device=device)    # allocated for `current`
        stream = self._side_stream(device)
        stream.wait_stream(current)         # the block may still be read by work queued on `current`
        with torch.cuda.stream(stream):
            tensor.copy_(host, non_blocking=self.pool(device).pinned)
            ready = torch.cuda.Event()
            ready.record(stream)
        return tensor, ready, current

    def _release(self, buffer: torch.Tensor, device: torch.device, key: Tuple[Hashable, int]) -> None:
        generation, index = key
        with self._lock:
            layers = self._parked.get(generation)
            if layers is not None:
                layers.pop(index, None)
                if not layers:
                    del self._parked[generation]
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record(self._side_stream(device))     # after every copy queued on this buffer
        self.pool(device).release(buffer, event)

    def clear(self) -> None:
        with self._lock:
            self._parked.clear()
            for pool in self._pools.values():
                pool.clear()
