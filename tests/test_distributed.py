"""Scale-out on CPU (gloo, 2 processes): the patches ride on DDP and FSDP2 unchanged.

* HF Trainer launched by torchrun (DDP, ``use_cpu``, ``ddp_backend="gloo"``) with SlothCallback:
  the per-step loss and gradient norm equal one process' on the same global batch
  (``average_tokens_across_devices``: ``num_items_in_batch`` summed over the ranks), and the
  PatchReport is the same on both ranks and in the single process.
* Lightning ``SlothStrategy("ddp")`` under torchrun, padded batches, each rank's loss divided by
  the label tokens of all ranks: the summed loss equals one process' on the global batch.
* FSDP2 (``fully_shard``) with the lm_head its own unit, so its weight is a sharded DTensor:
  loss and gradients equal the unsharded model's; a trainable head is gathered by one call of
  its unit per step, a frozen one by one ``full_tensor``; a tensor-parallel head (a DTensor
  outside any FSDP unit) gets the model's own forward. On GPUs (``-m gpu``) the same, plus FSDP1.
* An engine's own activation checkpointing around the decoder layers (torch's
  ``checkpoint_wrapper``, reentrant or not): one recompute per layer, never two.

The workers are this file, run by torchrun (``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_distributed.py {hf,lightning,fsdp} OUT_DIR``); each rank writes
what it measured to OUT_DIR and the tests compare.
"""
import os
import sys

if __name__ == "__main__":
    # Run as a script, this folder heads sys.path, and tests/kernels/ would be importable as
    # `kernels` (the name of Hugging Face's package, which transformers imports when it finds it).
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import copy  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sloth_plugins.testing import right_pad_collate  # noqa: E402

WORLD = 2
VOCAB = 256
PER_RANK_BATCH = 2
GRAD_ACCUM = 2
STEPS = 3
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# Shared by the tests and the workers
# ---------------------------------------------------------------------------------------------

def _rows(n, seed=0):
    """Rows of random token ids of different lengths (so batches pad); labels = input_ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, 33, (n,), generator=g)
    return [dict(input_ids=torch.randint(3, VOCAB, (int(k),), generator=g)) for k in lengths]




def _lora_model():
    from peft import LoraConfig, get_peft_model

    from sloth_plugins.testing import tiny_model
    model = tiny_model("llama", seed=0, vocab_size=VOCAB)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def _rank():
    return int(os.environ.get("RANK", "0"))


def _write(out, name, payload):
    with open(os.path.join(out, name), "w") as f:
        json.dump(payload, f)


def _read_ranks(out, prefix):
    return [json.load(open(os.path.join(out, f"{prefix}{r}.json"))) for r in range(WORLD)]


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _torchrun(what, out, timeout=180, nproc=WORLD):
    """Run this file under torchrun (2 processes); fail with the workers' output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), what, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # the repo root (our kernels/ folder) must not be importable; other entries (a GPU bundle) stay
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                        if p and os.path.abspath(p) != root)
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun {what} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


# ---------------------------------------------------------------------------------------------
# (a) HF Trainer + SlothCallback under torchrun
# ---------------------------------------------------------------------------------------------

def _hf_train(out, per_device_batch):
    """Train STEPS steps; write this rank's logged losses, grad norms and PatchReport to ``out``."""
    from transformers import Trainer, TrainingArguments

    import sloth_plugins as sloth
    model = _lora_model()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"), max_steps=STEPS, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=GRAD_ACCUM, learning_rate=2e-3, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, ddp_backend="gloo" if distributed else None, seed=0, data_seed=0,
        dataloader_num_workers=0, train_sampling_strategy="sequential", average_tokens_across_devices=True,
        disable_tqdm=True)
    callback = sloth.SlothCallback(verbose=False)
    rows = _rows(STEPS * GRAD_ACCUM * PER_RANK_BATCH * WORLD)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=right_pad_collate, callbacks=[callback])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = dict(world=args.world_size, loss=[h["loss"] for h in logs], grad_norm=[h["grad_norm"] for h in logs],
                  report=callback.report.to_dict())
    _write(out, f"hf_rank{_rank()}.json", result)
    if _rank() == 0:
        torch.save(_trainable(model), os.path.join(out, "hf_trainable.pt"))
    return result


@pytest.mark.slow
def test_hf_trainer_torchrun_ddp_matches_one_process_on_the_global_batch(tmp_path):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = _hf_train(str(ref_dir), PER_RANK_BATCH * WORLD)
    ref_trainable = torch.load(ref_dir / "hf_trainable.pt")
    _torchrun("hf", tmp_path)
    ranks = _read_ranks(tmp_path, "hf_rank")

    assert ref["world"] == 1 and all(r["world"] == WORLD for r in ranks)
    assert len(ref["loss"]) == STEPS
    for r in ranks:   # the Trainer logs the mean over ranks: each rank logs the global value
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    # the same patches on both ranks, and the same as without distribution
    assert ranks[0]["report"] == ranks[1]["report"] == ref["report"]
    assert ref["report"]["summary"]["loss"]["patched"] == 1
    got = torch.load(tmp_path / "hf_trainable.pt")
    assert got.keys() == ref_trainable.keys() and got
    for name, value in ref_trainable.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# (b) Lightning SlothStrategy("ddp") under torchrun
# ---------------------------------------------------------------------------------------------

def _lightning_module_class():
    import lightning as L

    class TokenSummedLoRA(L.LightningModule):
        """Each rank's loss is its label tokens' sum over the tokens of all ranks, times the world
        size (DDP averages gradients): the global batch's mean loss and gradient, padding or not."""

        def __init__(self):
            super().__init__()
            self.model, self.losses = _lora_model(), []

        def training_step(self, batch, batch_idx):
            tokens = (batch["labels"][:, 1:] != -100).sum()
            all_tokens = self.all_gather(tokens).sum()
            loss = self.model(**batch, num_items_in_batch=all_tokens).loss
            self.losses.append(loss.item())
            return loss * self.trainer.world_size

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-3)

    return TokenSummedLoRA


def _user_sharded_module_class():
    """The module shards itself in configure_model, as Lightning's FSDP2 examples do."""
    base = _lightning_module_class()

    class UserSharded(base):
        def configure_model(self):
            from torch.distributed.fsdp import fully_shard
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    return UserSharded


def _lightning_fit(out, devices, strategy, module_class=None):
    import lightning as L
    module = (module_class or _lightning_module_class)()()
    rows = _rows(STEPS * PER_RANK_BATCH * WORLD)
    # rank r of w takes the rows r, r + w, ... in order: together the ranks' step k is the single
    # process' batch k (Lightning's own distributed sampler would shuffle)
    sampler = torch.utils.data.DistributedSampler(rows, num_replicas=devices, rank=_rank(), shuffle=False)
    loader = torch.utils.data.DataLoader(rows, batch_size=PER_RANK_BATCH * WORLD // devices, sampler=sampler,
                                         collate_fn=right_pad_collate)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module, loader)
    report = getattr(trainer.strategy, "sloth_report", None)
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in frozen)
    result = dict(world=trainer.world_size, loss=module.losses, report=report.to_dict() if report else None,
                  frozen_numel=sum(p.numel() for p in frozen), frozen_local_numel=local,
                  strategy=type(trainer.strategy).__name__)
    _write(out, f"lightning_rank{trainer.global_rank}.json", result)
    return result


@pytest.mark.slow
def test_lightning_ddp_torchrun_token_summed_loss_matches_one_process(tmp_path):
    pytest.importorskip("lightning")
    import sloth_plugins as sloth
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = _lightning_fit(str(ref_dir), 1, sloth.SlothStrategy(verbose=False))
    _torchrun("lightning", tmp_path)
    ranks = _read_ranks(tmp_path, "lightning_rank")
    assert ref["world"] == 1 and all(r["world"] == WORLD for r in ranks)
    assert all(len(r["loss"]) == STEPS for r in ranks + [ref])
    summed = [sum(step) for step in zip(*(r["loss"] for r in ranks))]
    assert summed == pytest.approx(ref["loss"], rel=1e-5)
    assert ranks[0]["report"] == ranks[1]["report"]
    assert ranks[0]["report"]["summary"]["loss"]["patched"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("who_shards", ["strategy", "configure_model"])
def test_lightning_fsdp2_shards_the_frozen_weights_and_matches_one_process(tmp_path, who_shards):
    """SlothStrategy("fsdp2"): Lightning's ModelParallelStrategy, fully_shard applied per decoder
    layer by the strategy (or by the module's own configure_model, patched afterwards); each rank
    holds about half of the frozen base weights, and the token-summed loss equals one process'
    on the global batch."""
    pytest.importorskip("lightning")
    import sloth_plugins as sloth
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = _lightning_fit(str(ref_dir), 1, sloth.SlothStrategy(verbose=False))
    _torchrun("lightning-fsdp2" if who_shards == "strategy" else "lightning-fsdp2-user", tmp_path)
    ranks = _read_ranks(tmp_path, "lightning_rank")
    assert all(r["world"] == WORLD and r["strategy"] == "SlothFSDP2Strategy" for r in ranks)
    summed = [sum(step) for step in zip(*(r["loss"] for r in ranks))]
    assert summed == pytest.approx(ref["loss"], rel=1e-5)
    assert ranks[0]["report"] == ranks[1]["report"] == ref["report"]
    for r in ranks:
        assert r["frozen_numel"] == ref["frozen_numel"]
        assert r["frozen_local_numel"] < 0.6 * r["frozen_numel"], r


# ---------------------------------------------------------------------------------------------
# FSDP: a sharded lm_head
# ---------------------------------------------------------------------------------------------

FSDP_CASES = {
    # name: the engine, whether the lm_head is a unit of its own, how it is trained, checkpointing
    "own_unit_trainable": dict(engine="fsdp2", own_unit=True, head="trainable", checkpointing="recompute"),
    "own_unit_frozen": dict(engine="fsdp2", own_unit=True, head="frozen", checkpointing="offload"),
    "own_unit_lora_on_head": dict(engine="fsdp2", own_unit=True, head="lora", checkpointing="off"),
    "root_unit_trainable": dict(engine="fsdp2", own_unit=False, head="trainable", checkpointing="off"),
}
# FSDP1 (Lightning's FSDPStrategy) refuses CPU-only machines: GPU test only.
FSDP1_CASES = {
    "fsdp1_own_unit_trainable": dict(engine="fsdp1", own_unit=True, head="trainable", checkpointing="recompute"),
    "fsdp1_own_unit_frozen": dict(engine="fsdp1", own_unit=True, head="frozen", checkpointing="offload"),
    "fsdp1_root_unit_trainable": dict(engine="fsdp1", own_unit=False, head="trainable", checkpointing="auto"),
}


def _shard(model, lm, engine, own_unit, device):
    """Layers, (the lm_head,) then the root: each its own unit. Returns the model to call."""
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for layer in lm.model.layers:
            fully_shard(layer)
        if own_unit:
            fully_shard(lm.lm_head)
        fully_shard(model)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    wrap = dict(use_orig_params=True, device_id=device)
    for i, layer in enumerate(lm.model.layers):
        lm.model.layers[i] = FSDP(layer, **wrap)
    if own_unit:
        lm.lm_head = FSDP(lm.lm_head, **wrap)
    return FSDP(model, **wrap)


def _full_grads(model, engine):
    if engine == "fsdp2":
        return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    with FSDP.summon_full_params(model, with_grads=True):
        return {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()
                if p.grad is not None}


def _fsdp_case(engine, own_unit, head, checkpointing, rank, world, device):
    from peft import LoraConfig, get_peft_model

    import sloth_plugins as sloth
    from sloth_plugins.models import resolve_causal_lm
    from sloth_plugins.testing import tiny_model

    model = tiny_model("llama", seed=0, vocab_size=VOCAB).to(device)
    model.lm_head.weight.requires_grad_(head == "trainable")
    if head == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], lora_dropout=0.0,
                                                 init_lora_weights=False))
    ref = copy.deepcopy(model)
    report = sloth.patch(model, sloth.SlothConfig(loss_chunk_size=8, gradient_checkpointing=checkpointing))
    lm = resolve_causal_lm(model)
    model = _shard(model, lm, engine, own_unit, device)
    head_calls, full_tensor_calls = [], []
    lm.lm_head.register_forward_pre_hook(lambda module, args: head_calls.append(1))
    from torch.distributed.tensor import DTensor
    original_full_tensor = DTensor.full_tensor

    def counting_full_tensor(self, *args, **kwargs):
        full_tensor_calls.append(1)
        return original_full_tensor(self, *args, **kwargs)

    DTensor.full_tensor = counting_full_tensor
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    result = dict(sharded=[type(p).__name__ for p in lm.lm_head.parameters()],
                  loss_report=report.summary()["loss"]["how"], steps=[])
    try:
        for step in range(2):
            batch = {k: v.to(device) for k, v in right_pad_collate(_rows(2 * world, seed=10 + step)).items()}
            all_tokens = (batch["labels"][:, 1:] != -100).sum()
            mine = {k: v[2 * rank:2 * rank + 2] for k, v in batch.items()}
            head_calls.clear()
            full_tensor_calls.clear()
            loss = model(**mine, num_items_in_batch=all_tokens).loss * world   # FSDP averages gradients
            loss.backward()
            calls = (len(head_calls), len(full_tensor_calls))
            ref_loss = ref(**batch).loss
            ref_loss.backward()
            total = loss.detach().clone()
            torch.distributed.all_reduce(total)
            grads = _full_grads(model, engine)
            ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
            assert grads.keys() == ref_grads.keys(), (sorted(grads), sorted(ref_grads))
            grad_err = max(((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12)).item()
                           for n in grads)
            result["steps"].append(dict(loss=(total / world).item(), ref_loss=ref_loss.item(), grad_rel_err=grad_err,
                                        head_grads=sorted(n for n in grads if "lm_head" in n),
                                        tokens=int((mine["labels"][:, 1:] != -100).sum()),
                                        head_calls=calls[0], full_tensor_calls=calls[1]))
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad(set_to_none=True)
    finally:
        DTensor.full_tensor = original_full_tensor
    return result


def _tensor_parallel_head_case(world, device):
    """A DTensor head outside any FSDP unit (tensor parallel): sloth steps aside, the model's loss runs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import sloth_plugins as sloth
    from sloth_plugins.testing import tiny_model
    model = tiny_model("llama", seed=0, vocab_size=VOCAB).to(device)
    ref = copy.deepcopy(model)
    sloth.patch(model, sloth.SlothConfig(gradient_checkpointing="off"))
    mesh = init_device_mesh(device.type, (world,))
    parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Replicate()))
    batch = {k: v.to(device) for k, v in right_pad_collate(_rows(4, seed=20)).items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [model(**batch).loss.item() for _ in range(2)]
    messages = [str(w.message) for w in caught if "DTensor outside any FSDP unit" in str(w.message)]
    return dict(losses=losses, ref_loss=ref(**batch).loss.item(), warnings=len(messages))


def _fsdp_worker(out, cuda):
    import torch.distributed as dist
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = {**FSDP_CASES, **(FSDP1_CASES if cuda else {})}
    try:
        result = {name: _fsdp_case(**case, rank=rank, world=world, device=device) for name, case in cases.items()}
        result["tensor_parallel"] = _tensor_parallel_head_case(world, device)
        _write(out, f"fsdp_rank{rank}.json", result)
    finally:
        dist.destroy_process_group()


def _check_fsdp_results(ranks, cases, rel, grad_tol):
    for name, case in cases.items():
        for rank, result in enumerate(ranks):
            got, where = result[name], f"{name} rank {rank}"
            if case["engine"] == "fsdp2":   # FSDP1 shards flat parameters, not DTensors
                assert got["sharded"] and set(got["sharded"]) == {"DTensor"}, (where, got["sharded"])
            impl = "chunked CE (module head)" if case["head"] == "lora" else "fused linear CE"
            assert got["loss_report"] == [f"{impl}, chunk=8"], where
            assert len(got["steps"]) == 2, where
            for step in got["steps"]:
                assert step["loss"] == pytest.approx(step["ref_loss"], rel=rel), (where, step)
                assert step["grad_rel_err"] < grad_tol, (where, step)
                assert bool(step["head_grads"]) == (case["head"] != "frozen"), (where, step)
                calls = (step["head_calls"], step["full_tensor_calls"])
                if case["own_unit"] and case["head"] == "frozen" and case["engine"] == "fsdp2":
                    assert calls == (0, 1), (where, step)   # gathered once; the unit's forward never ran
                elif case["own_unit"]:
                    assert calls == (1, 0), (where, step)   # the loss ran as one call of the head's unit
                else:
                    assert calls == (0, 0), (where, step)   # inside the root unit's forward the weight is whole
        if len(ranks) == 2:
            # the ranks' token counts differ, so calls of the unit per chunk would differ too (and hang)
            chunks = [-(-r[name]["steps"][0]["tokens"] // 8) for r in ranks]
            assert chunks[0] != chunks[1], chunks
    for result in ranks:
        tp = result["tensor_parallel"]
        assert tp["losses"] == pytest.approx([tp["ref_loss"]] * 2, rel=rel) and tp["warnings"] == 1, tp


@pytest.mark.slow
def test_fsdp2_sharded_lm_head_loss_and_gradients_match_the_unsharded_model(tmp_path):
    _torchrun("fsdp", tmp_path)
    _check_fsdp_results(_read_ranks(tmp_path, "fsdp_rank"), FSDP_CASES, rel=1e-5, grad_tol=1e-4)


@pytest.mark.gpu
def test_gpu_fsdp1_and_fsdp2_sharded_lm_head(tmp_path):
    """The same on GPUs (NCCL, Triton kernels), plus FSDP1 (Lightning's FSDPStrategy): 2 GPUs when there are."""
    world = min(2, torch.cuda.device_count())
    _torchrun("fsdp-cuda", tmp_path, nproc=world)
    ranks = [json.load(open(tmp_path / f"fsdp_rank{r}.json")) for r in range(world)]
    _check_fsdp_results(ranks, {**FSDP_CASES, **FSDP1_CASES}, rel=1e-4, grad_tol=1e-3)


# ---------------------------------------------------------------------------------------------
# An engine's own activation checkpointing (FSDP's apply_activation_checkpointing, accelerate's
# fsdp activation_checkpointing, Lightning's activation_checkpointing_policy) around layers that
# sloth also checkpoints: one recompute per layer, never two; no offload copies for nothing;
# auto plans only the layers the engine leaves to sloth.
# ---------------------------------------------------------------------------------------------

def _engine_ac_run(engine, mode, steps=2, wrapped=None, n_layers=4):
    """Steps of a tiny Llama whose decoder layers ``wrapped`` (default: all) an engine checkpoints,
    patched by sloth in ``mode`` first (None: the engine alone). Returns, per step, the forward
    calls of each layer's MLP, the losses, the gradients and the controller (None unpatched)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    import sloth_plugins as sloth
    from sloth_plugins.checkpointing import get_checkpoint_controller
    from sloth_plugins.testing import tiny_model

    model = tiny_model("llama", seed=0, vocab_size=VOCAB, layers=n_layers)
    layers = list(model.model.layers)
    wrapped = set(range(len(layers))) if wrapped is None else set(wrapped)
    if mode is not None:
        options = dict(memory_budget_gb=1e-6) if mode == "auto" else {}   # the tightest plan: offload
        sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing=mode, **options))
    impl = CheckpointImpl.REENTRANT if engine == "reentrant" else CheckpointImpl.NO_REENTRANT
    apply_activation_checkpointing(model, check_fn=lambda m: any(m is layers[i] for i in wrapped),
                                   checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl))
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    per_step, losses = [], []
    for _ in range(steps):
        calls[:] = [0] * len(layers)
        # no KV cache: a reentrant engine recompute would append to it a second time (transformers)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
        per_step.append(list(calls))
    grads = {n: p.grad for n, p in model.named_parameters()}
    return per_step, losses, grads, get_checkpoint_controller(model)


@functools.lru_cache(maxsize=None)
def _engine_ac_reference(engine, wrapped=None, steps=2, n_layers=4):
    return _engine_ac_run(engine, None, steps=steps, wrapped=wrapped, n_layers=n_layers)


def _assert_same_training(got, ref):
    (_, losses, grads, _), (_, ref_losses, ref_grads, _) = got, ref
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert grad is not None and not torch.isnan(grads[name]).any(), name
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)


def _engine_notes(report):
    return [n for n in report.notes if "engine already checkpoints" in n]


@pytest.mark.parametrize("mode", ["recompute", "offload", "auto"])
@pytest.mark.parametrize("engine", ["non_reentrant", "reentrant"])
def test_engine_activation_checkpointing_is_not_doubled(engine, mode):
    from sloth_plugins.checkpointing.engines import ENGINE_DETAIL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _engine_ac_reference(engine)
        got = _engine_ac_run(engine, mode)
    assert ref[0] == [[2] * 4] * 2          # the engine alone: the forward and one recompute per layer
    _assert_same_training(got, ref)
    steps, _, _, controller = got
    # the first step included (auto measures there): no probe, no second recompute, nothing parked
    assert steps == [[2] * 4] * 2 and controller.offloader.parked_count == 0
    assert controller.engine_layers == {0, 1, 2, 3}
    report = controller.report
    assert [e.detail for e in report.entries if e.kind == "gradient_checkpointing"] == [ENGINE_DETAIL] * 4
    assert len(_engine_notes(report)) == 1 and "every decoder layer" in _engine_notes(report)[0]
    if mode == "auto":
        # nothing seen, nothing planned: no measurement, no plan, and warm-up loops see it settled
        assert controller.meter.measurements == 0 and controller.plan is None and controller.settled
        assert "nothing left to plan" in _engine_notes(report)[0]


@pytest.mark.parametrize("engine", ["non_reentrant", "reentrant"])
def test_auto_plans_only_the_layers_an_engine_does_not_checkpoint(engine):
    from sloth_plugins.checkpointing.engines import ENGINE_DETAIL
    from sloth_plugins.checkpointing.plan import KEEP, OFFLOAD, RECOMPUTE

    wrapped = (0, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _engine_ac_reference(engine, wrapped, steps=3, n_layers=6)
        got = _engine_ac_run(engine, "auto", steps=3, wrapped=wrapped, n_layers=6)
    assert ref[0] == [[2, 1, 2, 1, 1, 1]] * 3
    _assert_same_training(got, ref)
    steps, _, _, controller = got
    # step 1 measures layers 1, 3, 4 and 5 (checkpointed, plus the probe's forward); then the
    # tightest plan of those four, as for any four layers: offload, offload, recompute, keep (the
    # last: its activations return at the start of the backward); the engine's layers: 2 always
    assert steps == [[2, 3, 2, 3, 3, 3]] + [[2, 2, 2, 2, 2, 1]] * 2
    assert controller.engine_layers == set(wrapped) and controller.meter.measurements == 1
    assert controller.plan.decisions == (OFFLOAD, OFFLOAD, RECOMPUTE, KEEP), "planned for the layers sloth runs"
    assert controller.decisions == (RECOMPUTE, OFFLOAD, RECOMPUTE, OFFLOAD, RECOMPUTE, KEEP)
    assert controller.offloader.parked_count == 2 * 2 and controller.offloader.live_parked() == 0
    details = [e.detail for e in controller.report.entries if e.kind == "gradient_checkpointing"]
    assert details == [ENGINE_DETAIL, "auto: offload", ENGINE_DETAIL, "auto: offload", "auto: recompute", "auto: keep"]
    notes = _engine_notes(controller.report)
    assert len(notes) == 1 and "2 of 6 decoder layers" in notes[0] and "auto plans the other 4" in notes[0]


# ---------------------------------------------------------------------------------------------

if __name__ == "__main__":
    what, out_dir = sys.argv[1], sys.argv[2]
    warnings.simplefilter("ignore")
    if what == "hf":
        _hf_train(out_dir, PER_RANK_BATCH)
    elif what in ("lightning", "lightning-fsdp2", "lightning-fsdp2-user"):
        import sloth_plugins as _sloth
        _lightning_fit(out_dir, WORLD, _sloth.SlothStrategy("ddp" if what == "lightning" else "fsdp2", verbose=False),
                       _user_sharded_module_class if what == "lightning-fsdp2-user" else None)
    elif what in ("fsdp", "fsdp-cuda"):
        _fsdp_worker(out_dir, cuda=what == "fsdp-cuda")
    else:
        raise SystemExit(f"unknown worker {what!r}: hf, lightning, lightning-fsdp2(-user), fsdp or fsdp-cuda")
    # Leave together: a rank that exits while its peer still holds gloo pairs can abort
    # ("terminate called without an active exception", seen once in CI).
    import torch.distributed as _dist
    if _dist.is_available() and _dist.is_initialized():
        _dist.barrier()
        _dist.destroy_process_group()
