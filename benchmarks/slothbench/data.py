"""Token batches, the same for every implementation of a scenario.

fixed     every step bs x seq random token ids (torch.Generator seeded), labels = input_ids
          (the model shifts), no attention mask: ``model(input_ids, labels).loss``
longtail  seeded synthetic samples with long-tailed lengths (lognormal clipped to [min, max], mu
          solved so the clipped mean is ``mean_len``); each step takes the next ``samples``
          samples (or, with ``tokens``, as many as fit in that budget). Padded layout:
          micro-batches of ``micro`` samples right-padded to their longest (labels -100 at pads),
          gradients accumulated; packed layout: the step's samples in one row by
          PaddingFreeCollator (position ids restart, cu_seq_lens). Every forward gets
          num_items_in_batch = the step's label tokens, as HF Trainer passes it.
image     vision-language models: every step bs rows, each [bos, image start, ``image_tokens``
          image tokens, image end] then ``text`` seeded random text tokens (ids below every image
          marker id), one seeded random image a row (the pixels the family's processor gives for
          that many soft tokens: Gemma 3 its vision tower's image_size, mm_tokens_per_image tokens;
          Qwen2.5-VL a square grid of patches merged spatial_merge_size^2 a token), labels -100 at
          the image tokens and markers (as HF processors' collators do), no padding. Tokens counted:
          all of them (image ones included).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
from typing import List

IGNORE = -100


def _clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    return lo * cdf(a) + hi * (1 - cdf(b)) + math.exp(mu + sigma ** 2 / 2) * (cdf(b - sigma) - cdf(a - sigma))


def lognormal_mu(mean: float, sigma: float, lo: int, hi: int) -> float:
    """mu such that the clipped lognormal has the given mean (bisection; the mean grows with mu)."""
    if not lo < mean < hi:
        raise SystemExit(f"mean length {mean} must lie strictly between {lo} and {hi}")
    low, high = math.log(lo) - 10 * sigma, math.log(hi) + 10 * sigma
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _clipped_lognormal_mean(mid, sigma, lo, hi) < mean else (low, mid)
    return (low + high) / 2


def plan(d: dict, n_steps: int, seed: int) -> List[List[int]]:
    """Sample lengths of every step (warmup first), in dataset order."""
    if d["kind"] == "fixed":
        return [[d["seq"]] * d["batch"] for _ in range(n_steps)]
    if d["kind"] == "image":
        return [[3 + d["image_tokens"] + d["text"]] * d["batch"] for _ in range(n_steps)]
    mu = lognormal_mu(d["mean_len"], d["sigma"], d["min_len"], d["max_len"])
    rng = random.Random(seed)
    draw = lambda: min(d["max_len"], max(d["min_len"], round(rng.lognormvariate(mu, d["sigma"]))))
    steps, pending = [], draw()
    for _ in range(n_steps):
        step: List[int] = []
        while (len(step) < d["samples"]) if not d.get("tokens") else (not step or sum(step) + pending <= d["tokens"]):
            step.append(pending)
            pending = draw()
        steps.append(step)
    return steps


def micro_batches(step: list, size: int) -> List[list]:
    size = size or len(step)
    return [step[i:i + size] for i in range(0, len(step), size)]


def fingerprint(steps) -> str:
    return hashlib.sha1(json.dumps(steps).encode()).hexdigest()[:12]


def summary(d: dict, steps: List[List[int]]) -> dict:
    flat = sorted(n for s in steps for n in s)
    real = [sum(s) for s in steps]
    padded = [sum(len(mb) * max(mb) for mb in micro_batches(s, d.get("micro", 0))) for s in steps]
    return {"samples": len(flat), "mean": statistics.fmean(flat), "median": statistics.median(flat),
            "p95": flat[min(len(flat) - 1, int(0.95 * len(flat)))], "max": flat[-1], "min": flat[0],
            "real_tokens_per_step": real, "padded_tokens_per_step": padded,
            "padding_frac": 1 - sum(real) / sum(padded), "fingerprint": fingerprint(steps)}


def token_steps(d: dict, steps: List[List[int]], vocab: int, seed: int):
    """Per step: a [bs, seq] tensor (fixed; image: the [bs, text] text tokens) or a list of samples'
    token-id lists (longtail). ``vocab``: ids are drawn below it (token_limit)."""
    import torch
    if d["kind"] == "fixed":
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (len(s), s[0]), generator=gen) for s in steps]
    if d["kind"] == "image":
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(3, vocab, (len(s), d["text"]), generator=gen) for s in steps]
    rng = random.Random(seed * 1_000_003 + 7)
    return [[[rng.randrange(3, vocab) for _ in range(n)] for n in s] for s in steps]


def padded_batch(samples: List[List[int]], pad_id: int) -> dict:
    import torch
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
    for row, s in enumerate(samples):
        ids[row, :len(s)] = labels[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(samples: List[List[int]], unsloth: bool) -> dict:
    import torch

    from sloth_plugins.integrations.collators import PaddingFreeCollator
    batch = PaddingFreeCollator()([{"input_ids": s} for s in samples])
    if unsloth:                         # Unsloth's padding-free contract: lengths, not cu_seq_lens
        batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
        batch["packed_seq_lengths"] = torch.tensor([len(s) for s in samples], dtype=torch.int32)
    return batch


_IMAGE_KEYS = {"gemma3": ("image_token_index", "boi_token_index", "eoi_token_index"),
               "qwen2_5_vl": ("image_token_id", "vision_start_token_id", "vision_end_token_id")}


def image_ids(cfg: dict) -> tuple:
    """(image token, image start, image end) ids of a vision-language config dict."""
    if cfg.get("model_type") not in _IMAGE_KEYS:
        raise ValueError(f"no image batch for model type {cfg.get('model_type')!r}; known: {sorted(_IMAGE_KEYS)}")
    return tuple(cfg[k] for k in _IMAGE_KEYS[cfg["model_type"]])


def token_limit(cfg: dict) -> int:
    """Random text ids are drawn below this: the vocabulary, and below every image/video marker id."""
    text = cfg.get("text_config") or cfg
    if "vision_config" not in cfg:
        return text["vocab_size"]
    return min([text["vocab_size"], *image_ids(cfg), *([cfg["video_token_id"]] if cfg.get("video_token_id") else [])])


def image_batch(cfg: dict, d: dict, text, seed: int) -> dict:
    """One image+text batch (the "image" kind) for the vision-language config dict ``cfg``."""
    import inspect
    import math

    import torch
    import transformers

    from sloth_plugins.testing import VL_FAMILIES
    image, start, end = image_ids(cfg)
    rows, n, vision = text.shape[0], d["image_tokens"], cfg["vision_config"]
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.tensor([1, start] + [image] * n + [end]).expand(rows, -1)
    ids = torch.cat([prefix, text], dim=1)
    marks = (ids == image) | (ids == start) | (ids == end)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.masked_fill(marks, IGNORE)}
    if cfg["model_type"] == "gemma3":
        if n != cfg["mm_tokens_per_image"]:
            raise ValueError(f"gemma3 gives {cfg['mm_tokens_per_image']} tokens an image, the data asks {n}")
        side = vision["image_size"]
        out["pixel_values"] = torch.randn(rows, 3, side, side, generator=gen)
        out["token_type_ids"] = (ids == image).long()
    else:
        merge, patch, temporal = vision["spatial_merge_size"], vision["patch_size"], vision["temporal_patch_size"]
        if math.isqrt(n) ** 2 != n:
            raise ValueError(f"{cfg['model_type']}: image_tokens must be a square (a square image), got {n}")
        grid = math.isqrt(n) * merge                   # patches a side; merged merge x merge -> n tokens
        out["pixel_values"] = torch.randn(rows * grid * grid, 3 * temporal * patch * patch, generator=gen)
        out["image_grid_thw"] = torch.tensor([[1, grid, grid]] * rows)
        forward = getattr(transformers, VL_FAMILIES[cfg["model_type"]]).forward
        if "mm_token_type_ids" in inspect.signature(forward).parameters:    # what newer processors return
            out["mm_token_type_ids"] = (ids == image).long()
    return out


def step_batches(d: dict, tokens, layout: str, unsloth: bool, pad_id: int, cfg=None, seed: int = 0) -> List[dict]:
    """One step's batches on the CPU (``cfg``, ``seed``: the model's config dict and the step's image seed,
    image kind only)."""
    if d["kind"] == "image":
        if layout != "padded":
            raise ValueError(f"image batches come in the padded layout only, not {layout!r}")
        return [image_batch(cfg, d, tokens, seed)]
    if d["kind"] == "fixed" and layout == "padded":
        return [{"input_ids": tokens, "labels": tokens}]
    samples = tokens.tolist() if hasattr(tokens, "tolist") else tokens
    if layout == "packed":
        return [packed_batch(samples, unsloth)]
    return [padded_batch(chunk, pad_id) for chunk in micro_batches(samples, d.get("micro", 0))]


def count_tokens(batches: List[dict]) -> tuple:
    """(real tokens, processed tokens, label tokens the loss averages over) of one step."""
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    processed = sum(b["input_ids"].numel() for b in batches)
    targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    return real, processed, targets
