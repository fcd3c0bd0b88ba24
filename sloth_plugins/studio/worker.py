"""A studio run's training process: ``python -m sloth_plugins.studio.worker RUN_DIR [--resume]``.

TRL ``SFTTrainer`` + ``SlothCallback``, configured from RUN_DIR/config.json, exactly as a script
would do it (``export.py`` prints that script). Two more callbacks serve the studio: one appends
each logged step to metrics.jsonl, one ends training cleanly when RUN_DIR/STOP appears.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
import traceback

from transformers import TrainerCallback

from .runs import last_checkpoint, read_json, write_status


class MetricsCallback(TrainerCallback):
    """Appends loss, learning rate, grad norm, tokens/s and peak memory to metrics.jsonl at each log."""

    def __init__(self, path: str):
        self.path = path
        self._last = None   # (time, tokens seen)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        then, tokens_then = self._last or (now, tokens)
        self._last = (now, tokens)
        row = {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"],
               "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
               "tokens_per_s": (tokens - tokens_then) / (now - then) if now > then else None,
               "time": time.time(), **peak_memory()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def peak_memory() -> dict:
    import torch
    if torch.cuda.is_available():
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "memory_kind": "cuda"}
    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "memory_kind": "rss"}


class StopFileCallback(TrainerCallback):
    """A clean stop: when ``path`` exists, save a checkpoint (to resume from) and end training."""

    def __init__(self, path: str):
        self.path = path
        self.stopped = False

    def _check(self, control):
        if os.path.exists(self.path):
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._check(control)


def build_trainer(run_dir: str, config: dict):
    """The SFTTrainer for ``config`` (a checked run config), with SlothCallback."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from ..config import SlothConfig
    from ..integrations.hf import SlothCallback
    from . import datasets as studio_datasets
    from .config import lora_config_kwargs, sft_config_kwargs

    train = config["training"]
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = studio_datasets.load_rows(os.path.join(run_dir, config["dataset"]["file"]))
    texts = studio_datasets.to_texts(rows, config["dataset"]["mapping"], tokenizer)
    dataset = Dataset.from_dict({"text": texts})
    with open(os.path.join(run_dir, "data", "train_text.jsonl"), "w") as f:   # the strings trained on
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)

    bf16 = train["precision"] == "bf16"
    model_kwargs = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if config["method"] == "qlora":
        from transformers import BitsAndBytesConfig
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16)
    model = AutoModelForCausalLM.from_pretrained(config["model"], **model_kwargs)
    peft_config = None
    if config["method"] in ("lora", "qlora"):
        from peft import LoraConfig
        peft_config = LoraConfig(**lora_config_kwargs(config["lora"]))
    args = SFTConfig(output_dir=os.path.join(run_dir, "checkpoints"), use_cpu=not torch.cuda.is_available(),
                     save_strategy="steps", save_steps=train["save_steps"], include_num_input_tokens_seen=True,
                     disable_tqdm=True, **sft_config_kwargs(train))
    sloth = SlothCallback(SlothConfig(**config["sloth"]), verbose=False)
    stop = StopFileCallback(os.path.join(run_dir, "STOP"))
    # PEFT draws LoRA A at random when SFTTrainer wraps the model: TRL >= 1.16 seeds first, older TRL
    # (1.9, the Axolotl environment) does not, so seed here (the exported script does the same)
    set_seed(train["seed"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config,
                         callbacks=[sloth, MetricsCallback(os.path.join(run_dir, "metrics.jsonl")), stop])
    return trainer, sloth, stop


def run(run_dir: str, resume: bool) -> str:
    from .config import check_run_config
    config = check_run_config(read_json(os.path.join(run_dir, "config.json")))
    trainer, sloth, stop = build_trainer(run_dir, config)
    with open(os.path.join(run_dir, "patch_report.txt"), "w") as f:
        f.write(str(sloth.report))
    trainer.train(resume_from_checkpoint=last_checkpoint(run_dir) if resume else None)
    with open(os.path.join(run_dir, "patch_report.txt"), "w") as f:
        f.write(str(sloth.report))   # as re-asserted when training began
    trainer.save_model(os.path.join(run_dir, "adapter"))
    state = "stopped" if stop.stopped else "finished"
    write_status(run_dir, state, step=trainer.state.global_step, pid=os.getpid(), error=None)
    return state


def _terminated(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sloth_plugins.studio.worker")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    run_dir = os.path.abspath(args.run_dir)
    signal.signal(signal.SIGTERM, _terminated)
    write_status(run_dir, "running", pid=os.getpid(), started=time.time())
    try:
        state = run(run_dir, args.resume)
    except BaseException as exc:  # noqa: BLE001 - every end of the process is recorded
        traceback.print_exc()
        text = str(exc).strip().splitlines()
        write_status(run_dir, "failed", error=f"{type(exc).__name__}: {text[0] if text else ''}")
        return 1
    print(f"sloth studio: run {state}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
