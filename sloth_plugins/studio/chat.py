"""Chat with a run: the base model with the run's adapter, and the same model with the adapter
disabled, streamed token by token (``transformers.TextIteratorStreamer``).

The prompt is built as the run's data was rendered for training: Alpaca runs get the Alpaca
prompt, chat runs (``messages`` / ShareGPT) the tokenizer's chat template with the generation
prompt, plain-text runs the text as typed. One model in memory per run (the last one asked for):
base and fine-tuned answers come from the same weights, ``disable_adapter()`` giving the base.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, Iterator, Optional, Tuple

from .datasets import ALPACA_PROMPT
from .runs import StudioError


def prompt_text(message: str, mapping: Dict[str, Any], tokenizer) -> str:
    fmt = mapping.get("format")
    if fmt == "alpaca":
        return ALPACA_PROMPT.format(instruction=message)
    if fmt in ("messages", "sharegpt") and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return message


class ChatModel:
    """A run's base model with its adapter loaded (PEFT), on the GPU when there is one."""

    def __init__(self, run_dir: str, config: Dict[str, Any]):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        adapter = os.path.join(run_dir, "adapter")
        if not os.path.isdir(adapter):
            raise StudioError("this run has no adapter yet (it is saved when the run finishes or is stopped)")
        if config["method"] == "full":
            raise StudioError("a full fine-tune has no adapter to switch off: chat compares LoRA / QLoRA runs")
        from peft import PeftModel
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if config["training"]["precision"] == "bf16" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(adapter if os.path.isfile(
            os.path.join(adapter, "tokenizer_config.json")) else config["model"])
        base = AutoModelForCausalLM.from_pretrained(config["model"], dtype=dtype)
        self.model = PeftModel.from_pretrained(base, adapter).to(self.device).eval()
        self.mapping = config["dataset"]["mapping"]
        self._lock = threading.Lock()   # one generation at a time: disable_adapter() switches shared weights

    def stream(self, message: str, adapter: bool = True, temperature: float = 0.0, top_p: float = 1.0,
               max_new_tokens: int = 64) -> Iterator[str]:
        """The answer so far, after each new piece of text."""
        import torch
        from transformers import TextIteratorStreamer

        prompt = prompt_text(message, self.mapping, self.tokenizer)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=True).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sample = float(temperature) > 0
        options = dict(**inputs, streamer=streamer, max_new_tokens=int(max_new_tokens), do_sample=sample,
                       pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if sample:
            options.update(temperature=float(temperature), top_p=float(top_p))
        failure = []

        def generate():
            try:
                with torch.no_grad():
                    if adapter:
                        self.model.generate(**options)
                    else:
                        with self.model.disable_adapter():
                            self.model.generate(**options)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)
                streamer.end()

        with self._lock:
            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            text = ""
            for piece in streamer:
                text += piece
                yield text
            worker.join()
        if failure:
            raise failure[0]


class ChatModels:
    """The last run's ChatModel, loaded on first use."""

    def __init__(self):
        self._key: Optional[Tuple[str, float]] = None
        self._model: Optional[ChatModel] = None

    def get(self, run_dir: str, config: Dict[str, Any]) -> ChatModel:
        adapter = os.path.join(run_dir, "adapter", "adapter_config.json")
        key = (run_dir, os.path.getmtime(adapter) if os.path.exists(adapter) else 0.0)
        if key != self._key:
            self._model, self._key = None, None
            self._model, self._key = ChatModel(run_dir, config), key
        return self._model

    def side_by_side(self, run_dir: str, config: Dict[str, Any], message: str,
                     **options) -> Iterator[Tuple[str, str]]:
        """(fine-tuned answer so far, base answer so far): the fine-tuned one streams first."""
        model = self.get(run_dir, config)
        tuned = ""
        for tuned in model.stream(message, adapter=True, **options):
            yield tuned, ""
        for base in model.stream(message, adapter=False, **options):
            yield tuned, base
