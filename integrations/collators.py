"""Padding-free batches for the HF Trainer (and any loop that calls ``model(**batch)``).

``PaddingFreeCollator`` is transformers' ``DataCollatorWithFlattening`` with two defaults changed:

* the whole batch becomes one row ``[1, total_tokens]``; position ids restart at 0 for each
  sample; each sample's first label is -100, so no token is trained to predict the next
  sample's first token (the loss over the row equals the padded batch's loss, token for token);
* ``return_flash_attn_kwargs=True``: ``cu_seq_lens_q/k`` (int32 sample boundaries) and
  ``max_length_q/k`` (python ints) ride along in the batch. The model passes them to its
  attention function untouched: sloth's kernel and FlashAttention-2 read the samples from them
  without a device sync; SDPA / eager ignore them and get per-sample masks from the position ids;
* ``use_cache=False`` in every batch: with a KV cache (transformers' default, even in training)
  transformers does not look for packed samples in the position ids, and SDPA / eager attention
  would let samples see each other. Training never needs the cache.

    from sloth_plugins.integrations.collators import PaddingFreeCollator
    Trainer(model, args, train_dataset=tokenized, data_collator=PaddingFreeCollator(),
            callbacks=[SlothCallback(padding_free=True)])

Features need ``input_ids`` and may carry ``labels`` (e.g. -100 on the prompt); other keys
(``attention_mask``) are dropped: there is no padding.
"""
from __future__ import annotations

from transformers import DataCollatorWithFlattening

IGNORE_INDEX = -100


class PaddingFreeCollator(DataCollatorWithFlattening):
    def __init__(self, *args, return_flash_attn_kwargs: bool = True, disable_cache: bool = True, **kwargs):
        kwargs.setdefault("separator_id", IGNORE_INDEX)
        super().__init__(*args, return_flash_attn_kwargs=return_flash_attn_kwargs, **kwargs)
        self.disable_cache = disable_cache

    def __call__(self, features, return_tensors=None, separator_id=None):
        batch = super().__call__(features, return_tensors=return_tensors, separator_id=separator_id)
        if self.disable_cache:
            batch["use_cache"] = False
        return batch
