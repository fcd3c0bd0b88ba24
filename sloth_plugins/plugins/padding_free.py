"""Built-in plugin: ordinary padded batches trained padding-free (``SlothConfig(padding_free=True)``).

The decoder (the CausalLM's ``model``, on this instance) takes a training batch with a 2-D
padding mask, drops the pad tokens and runs its layers on one row ``[1, N]`` of the real
tokens: position ids restart at 0 for each sample (the caller's own position ids are kept
when given), ``cu_seq_lens_q/k`` and ``max_length_q/k`` mark the samples (what
``integrations.collators.PaddingFreeCollator`` puts in a batch) and the KV cache is off. The
attention (the model's, or sloth's kernel) keeps the samples apart, RoPE reads the restarting
positions, and no layer spends work on padding. The final hidden states are scattered back to
``[batch, seq, hidden]`` (zeros at the pad positions) before the head, so whatever computes the
loss next sees the padded layout it expects: sloth's chunked loss and TRL's fused LM head (both
skip ignored labels before the head's matmul), the model's own loss and logits, ``logits_to_keep``,
``num_items_in_batch``. Labels are never touched; with labels -100 at padding (what every padding
collator produces) the loss and gradients of a right-padded batch equal the padded batch's, token
for token.

Only families of the architecture table are packed: their attention is tested to keep the samples
of a packed row apart. Any other family falls back (PatchReport) and its batches stay padded.

Why the decoder and not the CausalLM forward: every head calls it, including TRL's fused head,
which replaces the CausalLM forward after the callback patched it and runs the decoder itself.

Which tokens are real is read from the attention mask. Axolotl's multipack mask (each sample's
index within the row, 0 on padding) is split into its samples the same way.

Everything else reaches the decoder untouched, with a one-time note in the PatchReport where a
padded batch was not packed: eval mode, a left-padded batch (the padded model predicts a row's
first real token from the pad position before it: a loss term a packed row cannot reproduce), a
batch without padding, a batch already packed
(``cu_seq_lens_q`` present, position ids restarting inside a sample), a KV cache or
``use_cache=True``, ``output_hidden_states`` / ``output_attentions`` / ``output_router_logits`` (a MoE
load-balancing loss reads the router logits against the padded attention mask), a 4-D or holed mask,
per-token tensors the plugin does not know.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..instance_patch import InstancePatcher
from ..report import PatchReport
from ._modules import decoder_path, find_decoder

KIND = "padding_free"
_CACHE_ARGS = ("past_key_values", "cache")
_PACKED_ARGS = ("input_ids", "inputs_embeds", "position_ids", "attention_mask", "cache_position")


class PaddingFreePlugin:
    # trylast: wrap the decoder forward other plugins leave (none of the built-in ones replaces it)
    @hookimpl(trylast=True)
    def sloth_patch_model(self, model, config, report: PatchReport, arch, patcher: InstancePatcher):
        if not config.padding_free:
            return
        decoder = find_decoder(model, arch)
        reason = _why_not(model, decoder, arch)
        if reason:
            report.fallback(KIND, reason)
            return
        _patch_decoder(decoder, report, patcher)
        report.patched(KIND, "", "padded training batches run the decoder as one packed row (pad tokens dropped, "
                                 "position ids restarting per sample, cu_seq_lens); hidden states scattered back")


def _why_not(model, decoder, arch) -> Optional[str]:
    if arch is None:
        # Declaring FlashAttention support does not prove that the family's SDPA / eager masks
        # read restarting position ids (issue #15: OPT's packed samples attended to each other).
        return (f"model_type {getattr(model.config, 'model_type', None)!r} is not in the architecture table: "
                f"nothing proves its attention keeps the samples of a packed row apart; padded batches stay padded")
    if arch.vision:
        return (f"{type(model).__name__} is a vision-language model: its position ids (multimodal RoPE) and "
                f"image-token attention are built from the whole padded batch, which nothing here proves a packed "
                f"row keeps; padded batches stay padded")
    if not isinstance(decoder, torch.nn.Module):
        return f"{type(model).__name__} has no decoder at .{decoder_path(model, arch)}"
    if not getattr(model, "_supports_flash_attn", False):
        return (f"{type(model).__name__} does not declare FlashAttention support, whose padding-free contract "
                f"(restarting position ids, cu_seq_lens) a packed row relies on; padded batches stay padded")
    parameters = inspect.signature(decoder.forward).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        return f"{type(decoder).__name__}.forward takes no **kwargs, so it cannot be given cu_seq_lens"
    return None


def _patch_decoder(decoder, report: PatchReport, patcher: InstancePatcher) -> None:
    original = decoder.forward
    signature = inspect.signature(original)
    var_kw = next(p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD)
    noted = set()

    def forward(self, *args, **kwargs):
        if not self.training:
            return original(*args, **kwargs)
        arguments = signature.bind_partial(*args, **kwargs).arguments
        arguments.update(arguments.pop(var_kw, {}))
        packing = _packing(self, arguments)
        if not isinstance(packing, _Packing):
            if packing and packing not in noted:
                noted.add(packing)
                report.note(f"padding_free: a padded training batch was passed through unpacked: {packing}")
            return original(*args, **kwargs)
        return packing.unpack(original(**packing.pack(arguments)))

    patcher.bind(decoder, "forward", forward, wraps=original)


def _packing(decoder, arguments: Dict[str, Any]) -> Union["_Packing", str, None]:
    """How to pack this call, a reason (noted once) why a padded batch is not packed, or None."""
    mask = arguments.get("attention_mask")
    if not isinstance(mask, torch.Tensor):
        return None
    if any(arguments.get(key) is not None for key in ("cu_seq_lens_q", "cu_seq_lens_k")):
        return None                                      # already packed by a collator
    if mask.dim() != 2:
        return f"a {mask.dim()}-D attention mask (only 2-D padding masks are packed)"
    if bool((mask == 1).all()):
        return None                                      # nothing to drop
    if any(arguments.get(key) is not None for key in _CACHE_ARGS):
        return "a KV cache was passed (generation)"
    if arguments.get("use_cache"):
        return "use_cache=True was asked for"
    for key in ("output_hidden_states", "output_attentions", "output_router_logits"):
        value = arguments.get(key)
        if value or (value is None and getattr(decoder.config, key, False)):
            return f"{key} was asked for (per-layer outputs keep the padded shape)"
    batch, seq = mask.shape
    ids = arguments.get("input_ids") if arguments.get("input_ids") is not None else arguments.get("inputs_embeds")
    if ids is None or tuple(ids.shape[:2]) != (batch, seq):
        return "input_ids / inputs_embeds do not have the attention mask's shape"
    unknown = sorted(k for k, v in arguments.items() if k not in _PACKED_ARGS and isinstance(v, torch.Tensor)
                     and v.dim() >= 2 and tuple(v.shape[:2]) == (batch, seq))
    if unknown:
        return f"per-token argument(s) {', '.join(unknown)} that padding-free packing does not know"
    position_ids = arguments.get("position_ids")
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[-1] != seq):
        return f"position_ids of shape {tuple(position_ids.shape)} (only [batch, seq] ones are packed)"
    return _Packing.build(mask, position_ids)


class _Packing:
    """Where the real tokens of a padded batch go in the packed row, and how to come back."""

    def __init__(self, batch: int, seq: int, index: torch.Tensor, positions: torch.Tensor,
                 cu_seq_lens: torch.Tensor, max_length: int):
        self.batch, self.seq = batch, seq
        self.index = index              # [N] flat positions of the real tokens in the padded batch
        self.positions = positions      # [1, N] position ids of the packed row
        self.cu_seq_lens = cu_seq_lens  # [samples + 1] int32
        self.max_length = max_length

    @classmethod
    def build(cls, mask: torch.Tensor, position_ids: Optional[torch.Tensor]) -> Union["_Packing", str]:
        batch, seq = mask.shape
        values = mask.long()
        real = values != 0
        # A sample is a run of one non-zero mask value: 1 for a padding mask, the sample's index in
        # Axolotl's multipack mask. A value coming back after another run is a mask with holes.
        run_starts = real & (values != F.pad(values[:, :-1], (1, 0)))
        start_values = torch.where(run_starts, values, torch.zeros_like(values))
        holed = run_starts & (start_values <= F.pad(start_values.cummax(dim=1).values[:, :-1], (1, 0)))
        left_padded = ~real[:, 0] & real.any(dim=1)
        index = real.reshape(-1).nonzero().squeeze(1)
        if index.numel() == 0:
            return "every token of the batch is padding"
        starts = run_starts.reshape(-1)[index]
        sample = starts.long().cumsum(0) - 1
        lengths = torch.bincount(sample)
        cu_seq_lens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        restarted = joined = torch.zeros((), dtype=torch.bool, device=index.device)
        if position_ids is None:
            positions = torch.arange(index.numel(), device=index.device) - cu_seq_lens.long()[sample]
        else:
            positions = position_ids.to(index.device).expand(batch, seq).reshape(-1)[index]
            follows = F.pad(positions[1:] == positions[:-1] + 1, (1, 0), value=False)
            restarted, joined = (~starts & ~follows).any(), (starts & follows).any()
        holed, left_padded, restarted, joined = torch.stack(
            [holed.any().to(index.device), left_padded.any().to(index.device), restarted, joined]).tolist()
        if left_padded:
            # The padded model predicts a row's first real token from the pad position before it
            # (a loss term when that token is labelled); a packed row has no such position.
            return "left padding (the padded model predicts each row's first real token from a pad position)"
        if holed:
            return "an attention mask with holes (padding between the tokens of one sample)"
        if restarted:
            return "position_ids restart inside a sample (the rows are already packed)"
        if joined:
            # Attention implementations that read samples from position ids (SDPA, eager) would merge them.
            return "position_ids continue from one sample into the next"
        return cls(batch, seq, index, positions.unsqueeze(0), cu_seq_lens, int(lengths.max()))

    def pack(self, arguments: Dict[str, Any]) -> Dict[str, Any]:
        packed = dict(arguments)
        packed.pop("attention_mask")
        packed.pop("cache_position", None)
        for key in ("input_ids", "inputs_embeds"):
            value = packed.get(key)
            if value is not None:
                flat = value.reshape(self.batch * self.seq, *value.shape[2:])
                packed[key] = flat[self.index.to(flat.device)].unsqueeze(0)
        packed["position_ids"] = self.positions
        packed["cu_seq_lens_q"] = packed["cu_seq_lens_k"] = self.cu_seq_lens
        packed["max_length_q"] = packed["max_length_k"] = self.max_length
        packed["use_cache"] = False
        return packed

    def unpack(self, outputs):
        """The packed row's final hidden states back in the padded layout, zeros at the padding."""
        hidden = outputs[0]
        full = hidden.new_zeros(self.batch * self.seq, hidden.shape[-1])
        full = full.index_copy(0, self.index.to(full.device), hidden[0]).view(self.batch, self.seq, -1)
        if isinstance(outputs, tuple):
            return (full,) + tuple(outputs[1:])
        outputs["last_hidden_state"] = full
        return outputs
