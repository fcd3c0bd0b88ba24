"""Lightning adapter: ``lightning.Trainer(strategy=SlothStrategy())``.

``SlothStrategy()`` is a real ``SingleDeviceStrategy`` (on the device Lightning's automatic
choice would use), ``SlothStrategy("ddp")`` a real ``DDPStrategy`` and ``SlothStrategy("fsdp")``
a real ``FSDPStrategy``: Lightning picks precision plugins and launchers by strategy class,
so each one is a subclass of the strategy it extends and changes nothing but one step of
``setup()``: the Hugging Face causal LMs held by the LightningModule are patched after the
module is converted to its precision and moved to its device, and before it is wrapped (DDP,
FSDP, DeepSpeed) and before the optimizers exist. ``SlothStrategy("deepspeed", stage=3)`` is a real
``DeepSpeedStrategy``. ``SlothStrategy("fsdp2")`` is a real
``ModelParallelStrategy`` that also applies FSDP2's ``fully_shard`` itself (per decoder layer,
then the model), unless the LightningModule's ``configure_model`` does. The names ``"sloth"``,
``"sloth_ddp"``, ``"sloth_fsdp"``, ``"sloth_fsdp2"`` and ``"sloth_deepspeed"`` are registered in Lightning's strategy
registry once this module is imported (``import sloth_plugins.integrations.lightning``, or
touching ``sloth_plugins.SlothStrategy``).

Lightning ships twice (``lightning.pytorch`` and ``pytorch_lightning``) and each Trainer only
accepts strategies of its own namespace. Classes exist for both; ``SlothStrategy`` picks the
namespace that is imported (``lightning.pytorch`` when both are), or ``namespace=`` says which.

Metrics: the strategy adds a callback that logs, through the LightningModule's loggers
(``self.log`` on each training step, at ``log_every_n_steps``), ``sloth/tokens_per_s`` (tokens
the patched models' training forwards received, padding included, per second since the previous
step), ``sloth/peak_memory_gib`` (CUDA only) and ``sloth/checkpoint_{kept,recomputed,offloaded}_layers``;
the PatchReport goes once into each logger's hyperparameters as ``sloth/patch_report``.

Padding-free training: ``SlothStrategy(padding_free=True)``; the ``training_step`` keeps calling
``self.model(**batch)`` with padded batches, and the patched model packs them into one row.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..config import ALIASES, SlothConfig, SlothConfigError
from ..logs import logger, show_info
from ..manager import patch
from ..models import resolve_causal_lm
from ..report import PatchReport

KINDS = ("single", "ddp", "fsdp", "fsdp2", "deepspeed")
REGISTRY_NAMES = {"single": "sloth", "ddp": "sloth_ddp", "fsdp": "sloth_fsdp", "fsdp2": "sloth_fsdp2",
                  "deepspeed": "sloth_deepspeed"}
NAMESPACES = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}
_FABRIC = {"lightning.pytorch": "lightning.fabric", "pytorch_lightning": "lightning_fabric"}
_KIND_ALIASES = {"single": "single", "single_device": "single", "auto": "single", "sloth": "single",
                 "ddp": "ddp", "sloth_ddp": "ddp", "fsdp": "fsdp", "sloth_fsdp": "fsdp", "fsdp1": "fsdp",
                 "fsdp2": "fsdp2", "sloth_fsdp2": "fsdp2", "deepspeed": "deepspeed", "sloth_deepspeed": "deepspeed"}
_CLASS_NAMES = {"single": "SlothSingleDeviceStrategy", "ddp": "SlothDDPStrategy", "fsdp": "SlothFSDPStrategy",
                "fsdp2": "SlothFSDP2Strategy", "deepspeed": "SlothDeepSpeedStrategy"}
_BASES = {"single": "SingleDeviceStrategy", "ddp": "DDPStrategy", "fsdp": "FSDPStrategy",
          "fsdp2": "ModelParallelStrategy", "deepspeed": "DeepSpeedStrategy"}
_CONFIG_KEYS = (*SlothConfig().to_dict(), *ALIASES)


_SLOTH_STRATEGY_ARGS = ("config", "model_attr", "verbose")
# Lightning passes DDPStrategy's / FSDPStrategy's extra keyword arguments on to these at fit().
_WRAPPERS = {"ddp": ("torch.nn.parallel", "DistributedDataParallel"),
             "fsdp": ("torch.distributed.fsdp", "FullyShardedDataParallel")}


def _split_sloth_options(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {key: kwargs.pop(key) for key in list(kwargs) if key in _CONFIG_KEYS}


def _named_parameters(fn) -> List[str]:
    return [name for name, p in inspect.signature(fn).parameters.items()
            if name not in ("self", "module") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _check_arguments(kind: str, given, strategy_args: Sequence[str], wrapper: Optional[str] = None) -> None:
    """Refuse unknown keyword arguments when the strategy is built, naming the valid ones."""
    unknown = sorted(set(given) - set(_CONFIG_KEYS) - set(strategy_args))
    if not unknown:
        return
    wrapper_args: List[str] = []
    if wrapper is not None:
        module, name = _WRAPPERS[wrapper]
        wrapper_args = _named_parameters(getattr(importlib.import_module(module), name).__init__)
        unknown = [key for key in unknown if key not in wrapper_args]
        if not unknown:
            return
    close = difflib.get_close_matches(unknown[0], [*_CONFIG_KEYS, *strategy_args, *wrapper_args], n=1)
    raise SlothConfigError(
        f"SlothStrategy({kind!r}) got unknown argument{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(map(repr, unknown))}{f' (did you mean {close[0]!r}?)' if close else ''}; "
        f"sloth options: {', '.join(_CONFIG_KEYS)}; strategy options: {', '.join(strategy_args)}"
        + (f"; and {_WRAPPERS[wrapper][1]}'s keyword arguments" if wrapper else ""))


def _make_config(config: Optional[SlothConfig], options: Dict[str, Any]) -> SlothConfig:
    return SlothConfig.resolve(config, "SlothStrategy(config)", **options)


def find_hf_models(root: torch.nn.Module, model_attr: Union[str, Sequence[str], None] = None
                   ) -> List[Tuple[str, torch.nn.Module]]:
    """The Hugging Face causal LMs (or PEFT models wrapping one) held by ``root``, outermost first.

    With ``model_attr`` (a dotted attribute path or a list of them) only those are taken.
    Raises RuntimeError naming what was found when there is nothing to patch.
    """
    if model_attr is not None:
        names = [model_attr] if isinstance(model_attr, str) else list(model_attr)
        out = []
        for name in names:
            obj: Any = root
            for part in name.split("."):
                obj = getattr(obj, part, None)
            if not isinstance(obj, torch.nn.Module):
                raise RuntimeError(f"SlothStrategy(model_attr={name!r}): {type(root).__name__}.{name} is "
                                   f"{type(obj).__name__ if obj is not None else 'missing'}, not a model")
            _check_causal_lm(name, obj)
            out.append((name, obj))
        return out

    candidates: List[Tuple[str, torch.nn.Module]] = []
    for name, module in root.named_modules():
        if name and _is_hf_model(module) and not any(name.startswith(c + ".") for c, _ in candidates):
            candidates.append((name, module))
    found, rejected = [], []
    for name, module in candidates:
        try:
            resolve_causal_lm(module)
        except TypeError as exc:
            rejected.append(f"{name} ({type(module).__name__}: {exc})")
        else:
            found.append((name, module))
    if not found:
        seen = "; ".join(rejected) if rejected else (
            "children: " + (", ".join(f"{n} ({type(m).__name__})" for n, m in root.named_children()) or "none"))
        raise RuntimeError(
            f"SlothStrategy found no Hugging Face causal LM in {type(root).__name__} ({seen}). It patches "
            f"transformers *ForCausalLM models, or PEFT models wrapping one, held as attributes of the "
            f"LightningModule: assign the model in __init__ or configure_model(), or name it with "
            f"SlothStrategy(model_attr='...')")
    return found


def _is_hf_model(module: torch.nn.Module) -> bool:
    # Only what is already imported can be an instance: no heavy imports here.
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(module, peft.PeftModel):
        return True
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def _check_causal_lm(name: str, module: torch.nn.Module) -> None:
    try:
        resolve_causal_lm(module)
    except TypeError as exc:
        raise RuntimeError(f"SlothStrategy(model_attr={name!r}): {exc}") from None


class _SlothStrategyMixin:
    """What every Sloth strategy adds to its Lightning base class: the patch step in ``setup``."""

    _sloth_namespace = "lightning.pytorch"
    # FSDP places (and shards) parameters itself while wrapping: patch before, where they are.
    _sloth_patch_after_device_move = True

    def _sloth_init(self, config: Optional[SlothConfig], options: Dict[str, Any],
                    model_attr: Union[str, Sequence[str], None], verbose: bool) -> None:
        self.sloth_config = _make_config(config, options)
        self.sloth_reports: Dict[str, PatchReport] = {}
        self._sloth_models: List[Tuple[str, torch.nn.Module]] = []   # (attribute path, model) patched
        self._sloth_model_attr = model_attr
        self._sloth_verbose = verbose
        self._sloth_logged = False
        self._sloth_pending = False
        if verbose:
            show_info()        # auto's decisions, logged on the sloth_plugins logger

    def _sloth_add_metrics(self, trainer) -> None:
        if not any(isinstance(c, _SlothMetricsBase) for c in trainer.callbacks):
            trainer.callbacks.append(_metrics_callback_class(self._sloth_namespace)(self))

    @property
    def sloth_report(self) -> Optional[PatchReport]:
        """The PatchReport of the (first) patched model, None before ``setup``."""
        return next(iter(self.sloth_reports.values()), None)

    def setup(self, trainer) -> None:
        self._sloth_add_metrics(trainer)
        self._sloth_pending = True
        if not self._sloth_patch_after_device_move:
            self._sloth_patch_models()
        super().setup(trainer)
        self._sloth_patch_models()  # only if no step below ran (a base class that skips them)

    def model_to_device(self) -> None:
        super().model_to_device()
        self._sloth_patch_models()

    # Safety nets: whichever of these runs first during setup patches, still before wrapping
    # and before the optimizers; later calls are no-ops until the next setup.
    def _setup_model(self, model):
        self._sloth_patch_models()
        return super()._setup_model(model)

    def setup_optimizers(self, trainer) -> None:
        self._sloth_patch_models()
        super().setup_optimizers(trainer)

    def _sloth_patch_models(self) -> None:
        if not self._sloth_pending:
            return
        self._sloth_pending = False
        module = self.lightning_module
        if module is None:
            raise RuntimeError("SlothStrategy.setup ran without a LightningModule attached")
        self._sloth_models = find_hf_models(module, self._sloth_model_attr)
        self.sloth_reports = {name: patch(model, self.sloth_config) for name, model in self._sloth_models}
        if not self._sloth_logged:
            self._sloth_logged = True
            text = "\n".join(f"sloth_plugins patched {type(module).__name__}.{name}:\n{report}"
                             for name, report in self.sloth_reports.items())
            if self._sloth_verbose:
                importlib.import_module(self._sloth_namespace + ".utilities").rank_zero_info(text)
            else:
                logger.debug("%s", text)

    def __repr__(self) -> str:
        # Shown by the other namespace's Trainer when it rejects this instance.
        other = "pytorch_lightning" if self._sloth_namespace == "lightning.pytorch" else "lightning"
        return (f"<{type(self).__name__} for {self._sloth_namespace}.Trainer; with a {NAMESPACES[other]}.Trainer "
                f"use sloth_plugins.SlothStrategy(..., namespace={other!r})>")


class _SlothMetricsBase:
    """Logs sloth's metrics through the LightningModule (``self.log``); built per namespace."""

    def __init__(self, strategy: _SlothStrategyMixin):
        self.strategy, self.tokens, self.since, self.hooks = strategy, 0, 0.0, []

    def _count(self, module, args, kwargs) -> None:
        if module.training and torch.is_grad_enabled():
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                self.tokens += ids.numel()

    def on_train_start(self, trainer, pl_module) -> None:
        self.hooks = [m.register_forward_pre_hook(self._count, with_kwargs=True)
                      for _, m in self.strategy._sloth_models]
        self.tokens, self.since = 0, time.perf_counter()
        text = "\n".join(str(r) for r in self.strategy.sloth_reports.values())
        for lightning_logger in trainer.loggers:
            lightning_logger.log_hyperparams({"sloth/patch_report": text})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        metrics = {"sloth/tokens_per_s": self.tokens / max(now - self.since, 1e-9)}
        self.tokens, self.since = 0, now
        device = self.strategy.root_device
        if device.type == "cuda":
            metrics["sloth/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        from ..checkpointing import get_checkpoint_controller
        counts: Counter = Counter()
        for _, model in self.strategy._sloth_models:
            controller = get_checkpoint_controller(model)
            counts.update(controller.decisions if controller is not None else ())
        if counts:
            for decision, key in (("keep", "kept"), ("recompute", "recomputed"), ("offload", "offloaded")):
                metrics[f"sloth/checkpoint_{key}_layers"] = float(counts[decision])
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def _metrics_callback_class(namespace: str) -> type:
    base = importlib.import_module(namespace + ".callbacks").Callback
    name = f"_SlothMetrics_{namespace.replace('.', '_')}"
    if name not in globals():
        globals()[name] = type(name, (_SlothMetricsBase, base), {"__module__": __name__, "__qualname__": name})
    return globals()[name]


class _SingleDeviceMixin(_SlothStrategyMixin):
    def __init__(self, device: Union[str, torch.device, None] = None, accelerator=None, checkpoint_io=None,
                 precision_plugin=None, *, config: Optional[SlothConfig] = None,
                 model_attr: Union[str, Sequence[str], None] = None, verbose: bool = True, **sloth_options: Any):
        _check_arguments("single", sloth_options, ["device", "accelerator", "checkpoint_io", "precision_plugin",
                                                   *_SLOTH_STRATEGY_ARGS])
        if device is not None:
            device = torch.device(device)
            if device.type != "cpu" and device.index is None:
                device = torch.device(device.type, 0)  # what Lightning's own device parsing gives
        super().__init__(device=device if device is not None else "cpu", accelerator=accelerator,
                         checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        self._sloth_device_given = device is not None
        self._sloth_init(config, sloth_options, model_attr, verbose)

    # The accelerator connector hands its device list to strategies that have this attribute
    # (after choosing the accelerator); an explicit ``device=`` is handed the other way.
    @property
    def parallel_devices(self) -> List[torch.device]:
        return [self._root_device] if self._sloth_device_given else []

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[List[torch.device]]) -> None:
        if self._sloth_device_given or not devices:
            return
        root = devices[0] if isinstance(devices[0], torch.device) else torch.device(devices[0])
        if len(devices) > 1:
            importlib.import_module(self._sloth_namespace + ".utilities").rank_zero_warn(
                f"SlothStrategy() trains on one device ({root}) but the Trainer was given {len(devices)}; "
                f"use SlothStrategy('ddp') (or strategy='sloth_ddp') to use all of them")
        self._root_device = root


class _DDPMixin(_SlothStrategyMixin):
    _sloth_own_args: Tuple[str, ...] = ()   # a subclass's own keyword arguments, for the error message

    def __init__(self, *args: Any, config: Optional[SlothConfig] = None,
                 model_attr: Union[str, Sequence[str], None] = None, verbose: bool = True, **kwargs: Any):
        options = _split_sloth_options(kwargs)
        base = self._sloth_base.__init__
        wrapper = self._sloth_kind if self._sloth_kind in _WRAPPERS and any(
            p.kind is p.VAR_KEYWORD for p in inspect.signature(base).parameters.values()) else None
        _check_arguments(self._sloth_kind, kwargs, [*_named_parameters(base), *self._sloth_own_args,
                                                    *_SLOTH_STRATEGY_ARGS], wrapper)
        super().__init__(*args, **kwargs)
        self._sloth_init(config, options, model_attr, verbose)


class _FSDPMixin(_DDPMixin):
    _sloth_patch_after_device_move = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._activation_checkpointing_kwargs and self.sloth_config.gradient_checkpointing in ("recompute",
                                                                                                   "offload"):
            raise SlothConfigError(
                f"FSDP activation_checkpointing(_policy) and gradient_checkpointing="
                f"{self.sloth_config.gradient_checkpointing!r} would checkpoint the same layers twice: drop the FSDP "
                f"argument, or pass gradient_checkpointing='off' (or 'auto': a plan measured under the memory budget, "
                f"which leaves the layers FSDP checkpoints to FSDP)")

    def _sloth_patch_models(self) -> None:
        pending = self._sloth_pending
        super()._sloth_patch_models()
        if not pending:
            return
        params = [p for _, m in self._sloth_models for p in m.parameters()]
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        if frozen and frozen < sum(p.numel() for p in params):
            importlib.import_module(self._sloth_namespace + ".utilities").rank_zero_warn(
                "SlothStrategy('fsdp') is FSDP1: it flattens each layer's frozen and trainable (LoRA) parameters "
                "into one tensor and keeps a gradient for all of it, so sharding saves little memory here; "
                "SlothStrategy('fsdp2') shards per parameter and keeps no gradients for frozen weights")

    def setup_environment(self) -> None:
        # Lightning refuses FSDPStrategy off CUDA by exact type, which a subclass slips past
        if self.root_device.type != "cuda":
            raise ValueError(f"SlothStrategy('fsdp') needs CUDA devices, as Lightning's FSDPStrategy does; got "
                             f"{self.root_device}. On CPU use SlothStrategy('ddp')")
        super().setup_environment()


class _DeepSpeedMixin(_DDPMixin):
    """Lightning's ``DeepSpeedStrategy`` (ZeRO stage 1-3, offload, its config dict or file): the
    models are patched in ``setup`` before ``deepspeed.initialize`` wraps them. Under ZeRO-3 the
    patched code gathers the weights it reads outside their own module's forward through
    DeepSpeed (``sloth_plugins/plugins/zero3.py``). Lightning's ``activation_checkpointing``
    option only configures DeepSpeed's checkpoint function, which the module's own code calls:
    layers it checkpoints run plainly inside it (``checkpointing/engines.py``).

    ``config=``: a ``SlothConfig`` configures sloth; a dict or a path is DeepSpeed's own config, as
    for ``DeepSpeedStrategy(config=...)`` (sloth's options then go as keywords)."""

    def __init__(self, *args: Any, config: Any = None, model_attr: Union[str, Sequence[str], None] = None,
                 verbose: bool = True, **kwargs: Any):
        sloth_config = config if config is None or isinstance(config, SlothConfig) else None
        if config is not None and sloth_config is None:
            kwargs["config"] = config
        options = _split_sloth_options(kwargs)
        _check_arguments(self._sloth_kind, kwargs, [*_named_parameters(self._sloth_base.__init__),
                                                    *_SLOTH_STRATEGY_ARGS])
        super(_DDPMixin, self).__init__(*args, **kwargs)     # DeepSpeedStrategy's own
        self._sloth_init(sloth_config, options, model_attr, verbose)


def _module_classes(spec) -> Optional[Tuple[type, ...]]:
    if spec is None:
        return None
    classes = tuple(spec) if isinstance(spec, (set, frozenset, list, tuple)) else (spec,)
    bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, torch.nn.Module))]
    if bad:
        raise SlothConfigError(f"SlothStrategy('fsdp2', shard_modules=...) takes nn.Module classes (e.g. "
                               f"{{LlamaDecoderLayer}}); got {', '.join(map(repr, bad))}")
    return classes


class _FSDP2Mixin(_DDPMixin):
    """Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) over data parallelism only,
    with the sharding applied by the strategy: each decoder layer (``shard_modules``, default the
    classes the model lists in ``_no_split_modules``) is a unit, the HF model the root unit. The
    patches go in first, on the device, as for DDP. A LightningModule that overrides
    ``configure_model`` shards (and places) the model itself there; it is then patched as it is.

    FSDP2 shards every parameter on its own, so frozen base weights carry no gradients: with
    LoRA a GPU holds 1/world of the base weights. (FSDP1 flattens a layer's parameters into one
    tensor and, with frozen and trainable ones mixed, keeps a gradient for all of it.)
    """

    _sloth_own_args = ("shard_modules", "reshard_after_forward")

    def __init__(self, *args: Any, shard_modules=None, reshard_after_forward: bool = True, **kwargs: Any):
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(*args, **kwargs)
        self._sloth_shard_classes = _module_classes(shard_modules)
        self._sloth_reshard = reshard_after_forward

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == 1:
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        ns = self._sloth_namespace
        is_overridden = importlib.import_module(ns + ".utilities.model_helpers").is_overridden
        self._sloth_add_metrics(trainer)
        if is_overridden("configure_model", self.lightning_module):
            self._sloth_pending = True
            self._sloth_patch_models()
            return super(_SlothStrategyMixin, self).setup(trainer)
        fitting = importlib.import_module(ns + ".trainer.states").TrainerFn.FITTING
        move = importlib.import_module(_FABRIC[ns] + ".utilities.optimizer")._optimizers_to_device
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self._sloth_pending = True
        self.model_to_device()        # patches (the mixin's model_to_device)
        self._sloth_fully_shard()
        self.barrier()
        if trainer.state.fn == fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == fitting:
            move(self.optimizers, self.root_device)

    def _sloth_fully_shard(self) -> None:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:              # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        mesh = self.device_mesh["data_parallel"]
        for _name, model in self._sloth_models:
            classes = self._sloth_shard_classes or _no_split_classes(model)
            if not classes:
                raise RuntimeError(
                    f"SlothStrategy('fsdp2') found no layer classes to shard in {type(model).__name__} (its "
                    f"_no_split_modules is empty): pass shard_modules={{YourDecoderLayer}}")
            for module in list(model.modules()):
                if isinstance(module, classes):
                    fully_shard(module, mesh=mesh, reshard_after_forward=self._sloth_reshard)
            fully_shard(model, mesh=mesh, reshard_after_forward=self._sloth_reshard)


def _no_split_classes(model: torch.nn.Module) -> Tuple[type, ...]:
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


_MIXINS = {"single": _SingleDeviceMixin, "ddp": _DDPMixin, "fsdp": _FSDPMixin, "fsdp2": _FSDP2Mixin,
           "deepspeed": _DeepSpeedMixin}
_CLASSES: Dict[str, Dict[str, type]] = {}


def strategy_classes(namespace: str = "lightning") -> Dict[str, type]:
    """``{"single": cls, "ddp": cls, "fsdp": cls, "fsdp2": cls}`` for ``"lightning"`` or ``"pytorch_lightning"``."""
    if namespace not in NAMESPACES:
        raise ValueError(f"namespace must be one of {', '.join(NAMESPACES)} (or 'auto'); got {namespace!r}")
    if namespace not in _CLASSES:
        package = NAMESPACES[namespace]
        try:
            strategies = importlib.import_module(package + ".strategies")
        except ImportError as exc:
            pip_name = "lightning" if namespace == "lightning" else "pytorch-lightning"
            raise ImportError(f"SlothStrategy(namespace={namespace!r}) needs {package}: "
                              f"pip install {pip_name}") from exc
        prefix = "" if namespace == "lightning" else "PL"
        classes = {}
        for kind in KINDS:
            if not hasattr(strategies, _BASES[kind]):     # ModelParallelStrategy: Lightning >= 2.4
                continue
            name = prefix + _CLASS_NAMES[kind]
            cls = type(name, (_MIXINS[kind], getattr(strategies, _BASES[kind])),
                       {"strategy_name": REGISTRY_NAMES[kind], "_sloth_namespace": package, "_sloth_kind": kind,
                        "_sloth_base": getattr(strategies, _BASES[kind]),
                        "__module__": __name__, "__qualname__": name,
                        "__doc__": f"{_BASES[kind]} that patches the LightningModule's HF models in setup() "
                                   f"({package} namespace). Build it with sloth_plugins.SlothStrategy."})
            globals()[name] = cls  # importable by name, so instances pickle (ddp_spawn)
            classes[kind] = cls
        _CLASSES[namespace] = classes
        _register(strategies.StrategyRegistry, classes)
    return _CLASSES[namespace]


def _register(registry, classes: Dict[str, type]) -> None:
    for kind, cls in classes.items():
        name = REGISTRY_NAMES[kind]
        if name not in registry:
            registry.register(name, cls, description=f"sloth_plugins: {_BASES[kind]} that patches HF models in setup")


def _detect_namespace() -> str:
    if "lightning.pytorch" in sys.modules:
        return "lightning"
    if "pytorch_lightning" in sys.modules:
        return "pytorch_lightning"
    if importlib.util.find_spec("lightning") is None and importlib.util.find_spec("pytorch_lightning") is not None:
        return "pytorch_lightning"
    return "lightning"


def SlothStrategy(kind: str = "single", *, namespace: str = "auto", config: Optional[SlothConfig] = None,
                  **options: Any):
    """A Lightning strategy that patches the LightningModule's Hugging Face causal LMs in ``setup()``.

    kind: ``"single"`` (default; one device, chosen as Lightning's automatic strategy would,
    or ``device=``), ``"ddp"``, ``"fsdp"`` (Lightning's ``FSDPStrategy``, FSDP1), ``"fsdp2"``
    (Lightning's ``ModelParallelStrategy`` with ``fully_shard`` applied per decoder layer: the one
    that saves memory with LoRA; ``shard_modules=``, ``reshard_after_forward=``) or ``"deepspeed"``
    (Lightning's ``DeepSpeedStrategy``: ``stage=``, ``offload_optimizer=``, ``offload_parameters=``,
    ``config=`` a DeepSpeed config dict or file; needs DeepSpeed installed and CUDA devices, as
    Lightning's own does).
    options: ``SlothConfig`` keys (``kernels``, ``loss``, ``gradient_checkpointing``, ...) plus the
    base strategy's own arguments (e.g. ``find_unused_parameters`` for DDP,
    ``auto_wrap_policy`` for FSDP), ``model_attr`` (which attribute(s) hold the model; found
    automatically otherwise) and ``verbose`` (log the PatchReport once, on rank 0).
    namespace: ``"lightning"`` (``import lightning``) or ``"pytorch_lightning"``; ``"auto"``
    takes the one that is imported (``lightning`` when both are).
    """
    key = _KIND_ALIASES.get(str(kind).lower())
    if key is None:
        raise ValueError(f"SlothStrategy kind must be one of {', '.join(KINDS)}; got {kind!r}")
    classes = strategy_classes(_detect_namespace() if namespace == "auto" else namespace)
    if key not in classes:
        raise ImportError(f"SlothStrategy({kind!r}) builds on Lightning's {_BASES[key]}, which this Lightning "
                          f"lacks: pip install -U 'lightning>=2.4'")
    return classes[key](config=config, **options)


def _register_imported_namespaces() -> None:
    loaded = [ns for ns, package in NAMESPACES.items() if package in sys.modules]
    for namespace in loaded or [_detect_namespace()]:
        try:
            strategy_classes(namespace)
        except ImportError:
            if loaded:
                raise


_register_imported_namespaces()


def __getattr__(name: str):
    # the metrics callbacks, by name, so that a pickled Trainer (ddp_spawn) finds them
    for package in NAMESPACES.values():
        if name == f"_SlothMetrics_{package.replace('.', '_')}":
            return _metrics_callback_class(package)
    # PLSloth*Strategy for pytorch_lightning users who import the classes by name
    for namespace, prefix in (("lightning", ""), ("pytorch_lightning", "PL")):
        for kind, class_name in _CLASS_NAMES.items():
            if name == prefix + class_name:
                return strategy_classes(namespace)[kind]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
