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
    """Per step: a [bs, seq] tensor (fixed) or a list of samples' token-id lists (longtail)."""
    import torch
    if d["kind"] == "fixed":
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (len(s), s[0]), generator=gen) for s in steps]
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


def step_batches(d: dict, tokens, layout: str, unsloth: bool, pad_id: int) -> List[dict]:
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
