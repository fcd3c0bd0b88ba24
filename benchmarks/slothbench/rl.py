"""Trainer-driven scenarios: TRL's DPO / GRPO trainer (``run: "dpo"`` / ``"grpo"``), or the HF Trainer under
DeepSpeed (``run: "sft"`` with a ``deepspeed`` scenario key), runs the steps.

Every implementation is TRL's trainer on the same HF + PEFT model (slothbench.models.load, LoRA r16,
PEFT reference: TRL disables the adapter); what differs is TRL's ``use_liger_kernel`` (spec
``liger``) or ``callbacks=[SlothCallback(**spec["sloth"])]`` (spec ``sloth``). ``trainer.train()``
runs warmup + timed steps; a callback synchronizes and times each optimizer step.

* DPO: ``batch`` pairs a step, each row ``seq`` tokens (half prompt, half completion; chosen and
  rejected rows alike), random token ids: the dataset TRL tokenized at init is replaced by these
  ids before training. Processed tokens a step: 2 x batch x seq.
* GRPO: one prompt a micro-batch, ``generations`` completions of exactly ``completion`` tokens
  (``min_new_tokens``), a python reward. Generation (transformers' ``generate``) is timed apart;
  ``train_s`` is the rest of the step: old/ref log-probs, rewards, the loss and backward.
* SFT under DeepSpeed: ``batch`` rows of ``seq`` random token ids a step (labels = inputs) through
  ``Trainer(args=TrainingArguments(deepspeed=...))``, one process (world size 1; ZeRO-3 still partitions
  and, with ``offload``, keeps parameters and optimizer state on the CPU). The model is loaded on the CPU
  and DeepSpeed places it. ``peak_gib`` is the whole run's, which includes DeepSpeed's conversion of that
  model (it passes through the GPU once); ``peak_timed_gib`` is the timed steps' alone.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

IMPLS = {
    "trl": {"base": "hf"},
    "trl_liger": {"base": "hf", "liger": True},
    "trl_sloth": {"base": "hf", "sloth": {}},
    "trl_sloth_offload": {"base": "hf", "sloth": {"gradient_checkpointing": "offload"}},
    # Unsloth's preference path: FastLanguageModel + get_peft_model, TRL's trainer as `import unsloth` patches it
    # (PatchDPOTrainer is a no-op in 2026.10); "fused": its opt-in chunked preference loss
    "trl_unsloth": {"base": "unsloth"},
    "trl_unsloth_fused": {"base": "unsloth", "env": {"UNSLOTH_FUSED_PREFERENCE_LOSS": "1"}},
}
# the HF Trainer under DeepSpeed: alone, with SlothCallback (default), and with sloth's auto checkpointing held
# to DeepSpeed-alone's measured peak (run "ds" first)
DS_IMPLS = {
    "ds": {"base": "hf"},
    "ds_sloth": {"base": "hf", "sloth": {}},
    "ds_sloth_at_ds_peak": {"base": "hf", "sloth": {"gradient_checkpointing": "auto"}, "budget_from": "ds"},
}


def deepspeed_config(stage: int, offload: bool) -> dict:
    """A ZeRO config as HF's docs and Axolotl's deepspeed_configs/zero3_bf16_cpuoffload_all.json write it,
    with the Trainer's torch AdamW (DeepSpeedCPUAdam needs DeepSpeed's compiled ops)."""
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(sub_group_size=1e9, stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9,
                    stage3_gather_16bit_weights_on_model_save=True)
    if offload:
        zero.update(offload_optimizer={"device": "cpu", "pin_memory": True},
                    offload_param={"device": "cpu", "pin_memory": True})
    return {"bf16": {"enabled": "auto"}, "zero_optimization": zero, "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}


def _single_process_rank(cuda: bool) -> None:
    """DeepSpeed initializes a process group even for one process: rank 0 of 1 (gloo on the CPU accelerator)."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def run(job: dict, spec: dict, scn: dict, device, dtype, load, emit, sloth_options) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from .meter import PeakMemory

    cuda, d = device.type == "cuda", scn["data"]
    ds = scn.get("deepspeed")
    if ds:
        _single_process_rank(cuda)
    model_dir = Path(job["model_dir"])
    cfg = json.loads((model_dir / "config.json").read_text())
    t0 = time.perf_counter()
    base = {"base": spec["base"]}      # TRL / the callback apply Liger and sloth, not the loader
    os.environ.update(spec.get("env") or {})
    max_seq = d["prompt"] + d["completion"] if scn["run"] == "grpo" else d["seq"]
    model, info = load(base, model_dir, torch.device("cpu") if ds else device, dtype, qlora=scn["mode"] == "qlora",
                       grad_ckpt=scn["grad_ckpt"], seed=job["seed"], max_seq=max_seq)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    memory = PeakMemory(device)
    memory.start()
    steps = scn["warmup"] + scn["steps"]
    gen = torch.Generator().manual_seed(job["seed"])

    def ids(n):
        return torch.randint(3, cfg["vocab_size"], (n,), generator=gen).tolist()

    callbacks = []
    if spec.get("sloth") is not None:
        import sloth_plugins as sloth
        options = sloth_options(spec, job.get("sloth_extra"))
        callbacks.append(sloth.SlothCallback(verbose=False, **options))
        info["sloth_config"] = options
    common = dict(output_dir=str(model_dir.parent / f"trl-{scn['name']}"), max_steps=steps, learning_rate=job["lr"],
                  logging_steps=1, save_strategy="no", report_to=[], bf16=cuda and dtype == torch.bfloat16,
                  use_cpu=not cuda, gradient_checkpointing=scn["grad_ckpt"], seed=job["seed"], disable_tqdm=True,
                  use_liger_kernel=bool(spec.get("liger")), dataloader_num_workers=0,
                  deepspeed=deepspeed_config(ds["stage"], ds.get("offload", False)) if ds else None)
    if ds:
        info["deepspeed"] = common["deepspeed"]
    times, gen_times, last_loss = [], [], [float("nan")]
    if scn["run"] == "dpo":
        tokens_per_step = 2 * d["batch"] * d["seq"]
    elif scn["run"] == "sft":
        tokens_per_step = d["batch"] * d["seq"]
    else:
        tokens_per_step = d["generations"] * (d["prompt"] + d["completion"])

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize(device)
            self.t = time.perf_counter()
            gen_times.append(0.0)

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - self.t)
            if len(times) == scn["warmup"]:
                memory.mark()
            emit("step", step=len(times) - 1, warmup=len(times) <= scn["warmup"], step_s=times[-1],
                 loss=last_loss[0], tok_s=tokens_per_step / times[-1], real_tok_s=tokens_per_step / times[-1])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                last_loss[0] = float(logs["loss"])      # the step before this one's (logs come after step end)

    if scn["run"] == "sft":
        from transformers import Trainer, TrainingArguments
        args = TrainingArguments(per_device_train_batch_size=d["batch"], remove_unused_columns=False, **common)
        rows = [{"input_ids": ids(d["seq"])} for _ in range(steps * d["batch"])]
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=_causal_batch,
                          callbacks=[Timer()] + callbacks)
    elif scn["run"] == "dpo":
        from trl import DPOConfig, DPOTrainer
        rows = steps * d["batch"]
        half = d["seq"] // 2
        dummy = Dataset.from_list([{"prompt": "The quick", "chosen": " fox", "rejected": " dog"}] * rows)
        args = DPOConfig(per_device_train_batch_size=d["batch"], max_length=d["seq"], beta=0.1, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tokenizer,
                             callbacks=[Timer()] + callbacks)
        trainer.train_dataset = Dataset.from_list([{"prompt_ids": ids(half), "chosen_ids": ids(d["seq"] - half),
                                                    "rejected_ids": ids(d["seq"] - half)} for _ in range(rows)])
    else:
        from trl import GRPOConfig, GRPOTrainer
        prompt = tokenizer.decode(ids(d["prompt"]))
        prompts = Dataset.from_list([{"prompt": prompt}] * (steps * 2))
        args = GRPOConfig(per_device_train_batch_size=d["generations"], num_generations=d["generations"],
                          max_completion_length=d["completion"], beta=0.04,
                          generation_kwargs={"min_new_tokens": d["completion"]}, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=_reward_length, args=args, train_dataset=prompts,
                              processing_class=tokenizer, callbacks=[Timer()] + callbacks)
        _time_generate(trainer.model, gen_times, cuda, device)
    load_s = time.perf_counter() - t0
    emit("loaded", load_s=round(load_s, 1), **info)
    trainer.train()

    timed = times[scn["warmup"]:]
    seconds = sum(timed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    gib = lambda b: b / 2 ** 30 if b is not None else None      # noqa: E731
    result = dict(ok=True, load_s=load_s, warmup_steps=scn["warmup"], step_s=times, losses=losses,
                  loss_step0=losses[0] if losses else None, loss_final=losses[-1] if losses else None,
                  tok_s=tokens_per_step * len(timed) / seconds if seconds else None,
                  step_s_mean=seconds / len(timed) if timed else None, tokens_per_step=[tokens_per_step] * len(times),
                  peak_gib=gib(memory.peak()), peak_timed_gib=gib(memory.window_peak()),
                  trl_metrics=[{k: v for k, v in h.items() if isinstance(v, (int, float))}
                               for h in trainer.state.log_history[-3:]], **info)
    result["real_tok_s"] = result["tok_s"]
    if scn["run"] == "grpo":
        train_s = [t - g for t, g in zip(times, gen_times)]
        result.update(generate_s=gen_times, train_s=train_s,
                      train_s_mean=sum(train_s[scn["warmup"]:]) / len(timed) if timed else None,
                      train_tok_s=tokens_per_step * len(timed) / sum(train_s[scn["warmup"]:]) if timed else None)
    if callbacks:
        report = callbacks[0].report
        result.update(patch_report=report.summary(), patch_notes=list(report.notes))
    emit("result", **result)


def _causal_batch(rows):
    import torch
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone()}


def _reward_length(completions, **kwargs):
    return [float(len(c)) / 100.0 for c in completions]


def _time_generate(peft_model, gen_times, cuda, device):
    """Time every ``generate`` of the trained model into the current step's slot."""
    import torch
    real = peft_model.generate

    def generate(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = real(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize(device)
        if gen_times:
            gen_times[-1] += time.perf_counter() - t
        return out

    peft_model.generate = generate
