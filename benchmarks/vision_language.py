"""Vision-language end-to-end: HF+PEFT vs sloth on image+text batches (issue 19).

    python benchmarks/vision_language.py                       # gemma-3-4b-vl, qwen2.5-vl-7b on the GPU
    python benchmarks/vision_language.py --models qwen2.5-vl-7b --batch 2 --text 2048
    python benchmarks/vision_language.py --smoke               # tiny models, fp32, CPU: the script runs

Random-init models at the public shapes (built on the GPU, not saved: both implementations of a
model get the same seed), LoRA r16 alpha16 dropout 0 on the language model's q/k/v/o/gate/up/down
(the vision tower frozen), gradient checkpointing enabled (HF: gradient_checkpointing_enable();
sloth: its default auto plan), bf16 weights, AdamW lr 1e-4. Each row of the batch is one image
(the tokens the processor would give: Gemma 3: 896x896 -> 256 soft tokens; Qwen2.5-VL: 448x448 ->
256) then ``--text`` random text tokens; labels -100 at the image tokens. Each implementation runs
in its own process; tokens/s counts every token (image ones included) over the timed steps, peak
is max_memory_allocated after loading. Unsloth's vision path is not run here (not installed in CI).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _common as C  # noqa: F401,I001  (first: keeps benchmarks/ off sys.path)

_GEMMA3_TEXT = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=256, vocab_size=262208, max_position_embeddings=131072,
                    rms_norm_eps=1e-6, rope_theta=1e6, query_pre_attn_scalar=256, sliding_window=1024,
                    final_logit_softcapping=None)
_SIGLIP_400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14)
_QWEN25_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                      fullatt_block_indexes=[7, 15, 23, 31])
MODELS = {
    # name: (family, text config, vision config, image token ids (image, start, end), tokens per image)
    "gemma-3-4b-vl": ("gemma3", _GEMMA3_TEXT, _SIGLIP_400M, (262144, 255999, 256000), 256),
    "qwen2.5-vl-7b": ("qwen2_5_vl", _QWEN25_7B_TEXT, _QWEN25_VISION, (151655, 151652, 151653), 256),
}
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build(name: str, smoke: bool):
    import torch
    import transformers
    from transformers import CONFIG_MAPPING
    if smoke:
        from sloth_plugins.testing import tiny_vl_model
        family = MODELS[name][0]
        return tiny_vl_model(family), family, (127, 125, 126), 4
    family, text, vision, (image, start, end), per_image = MODELS[name]
    if family == "gemma3":
        config = CONFIG_MAPPING["gemma3"](text_config=text, vision_config=vision, mm_tokens_per_image=per_image,
                                          image_token_index=image, boi_token_index=start, eoi_token_index=end)
        cls = transformers.Gemma3ForConditionalGeneration
    else:
        config = CONFIG_MAPPING["qwen2_5_vl"](text_config=text, vision_config=vision, image_token_id=image,
                                              vision_start_token_id=start, vision_end_token_id=end)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = cls(config)
    finally:
        torch.set_default_dtype(old)
    return model, family, (image, start, end), per_image


def batch(family: str, ids: tuple, per_image: int, rows: int, text: int, step: int, smoke: bool, device, dtype):
    import torch
    image, start, end = ids
    g = torch.Generator().manual_seed(step)
    tokens = [1, start] + [image] * per_image + [end]
    input_ids = torch.tensor([tokens + torch.randint(3, 100 if smoke else 30000, (text,), generator=g).tolist()
                              for _ in range(rows)])
    out = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
               labels=input_ids.masked_fill((input_ids == image) | (input_ids == start) | (input_ids == end), -100))
    if family == "gemma3":
        side = 32 if smoke else 896
        out["pixel_values"] = torch.randn(rows, 3, side, side, generator=g)
        out["token_type_ids"] = (input_ids == image).long()
    else:
        grid = 4 if smoke else 32                  # patches per side; merged 2x2 -> per_image tokens
        patch = 4 if smoke else 14
        out["pixel_values"] = torch.randn(rows * grid * grid, 3 * 2 * patch * patch, generator=g)
        out["image_grid_thw"] = torch.tensor([[1, grid, grid]] * rows)
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return {k: v.to(device) for k, v in out.items()}


def worker(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    import sloth_plugins as sloth
    device = torch.device("cpu" if args.smoke else "cuda")
    model, family, ids, per_image = build(args.model, args.smoke)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = str(sloth.patch(model)) if args.impl == "sloth" else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    losses, times, tokens = [], [], 0
    for step in range(args.warmup + args.steps):
        inputs = batch(family, ids, per_image, args.batch, args.text, step, args.smoke, device, dtype)
        C.sync(device)
        t0 = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        C.sync(device)
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens += inputs["input_ids"].numel()
    peak = torch.cuda.max_memory_allocated() / C.GiB if device.type == "cuda" else None
    return dict(model=args.model, impl=args.impl, tok_s=tokens / sum(times), peak_gib=peak, losses=losses,
                report=report)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--impls", default="hf_peft,sloth")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text", type=int, default=1792, help="text tokens per row (after the image's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.text, args.warmup, args.steps = 2, 8, 1, 2
    if args.impl:                                  # a worker: one model x implementation
        print("@@VL@@ " + json.dumps(worker(args)), flush=True)
        return 0
    rows = []
    for model in args.models.split(","):
        for impl in args.impls.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--impl", impl, "--batch",
                   str(args.batch), "--text", str(args.text), "--warmup", str(args.warmup), "--steps",
                   str(args.steps)] + (["--smoke"] if args.smoke else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("@@VL@@ ")]
            row = json.loads(found[-1]) if found else dict(model=model, impl=impl, error=(proc.stderr or "")[-2000:])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)
    for row in rows:
        if row.get("report"):
            print(f"\n{row['model']} sloth report:\n{row['report']}")
    print(C.text_table(["model", "impl", "tok/s", "peak GiB", "loss step 0", "loss last"],
                       [[r["model"], r["impl"], C.fmt(r.get("tok_s")), C.fmt(r.get("peak_gib")),
                         C.fmt((r.get("losses") or [None])[0]), C.fmt((r.get("losses") or [None])[-1])]
                        for r in rows]))
    if args.out:
        C.write_json(args.out, {"rows": rows})
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
