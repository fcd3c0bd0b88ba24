"""Shared helpers of the checkpointing tests (imported as ``checkpointing_helpers``; see conftest.py)."""
import torch

import sloth_plugins as sloth
from sloth_plugins.checkpointing import get_checkpoint_controller
from sloth_plugins.checkpointing.plan import KEEP, OFFLOAD, RECOMPUTE, activation_peaks, plan_layers, predict_peak
from sloth_plugins.testing import tiny_model

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 384
GiB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# exact gradient parity on a tiny Llama (fp32, CPU): every mode, PEFT, dropout
# ---------------------------------------------------------------------------------------------

VARIANTS = {
    "full+dropout": dict(peft=False, dropout=0.1),
    "lora": dict(peft=True, dropout=0.0),                          # layer inputs do not require grad
    "lora+input_grads+dropout": dict(peft=True, dropout=0.1, input_grads=True, lora_dropout=0.1),
}


def _model(peft=False, dropout=0.0, input_grads=False, lora_dropout=0.0, layers=4, seed=0):
    model = tiny_model("llama", seed=seed, layers=layers, attention_dropout=dropout, vocab_size=VOCAB)
    if peft:
        from peft import LoraConfig, get_peft_model
        # random B (not zeros): every LoRA weight gets a non-zero gradient to compare
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, init_lora_weights=False,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
        if input_grads:
            model.enable_input_require_grads()
    model.train()
    return model


def _steps(model, steps=3, shape=(2, 16), seed=1, shapes=None):
    """Losses and gradients of ``steps`` forward/backward passes (dropout draws from the global RNG)."""
    torch.manual_seed(seed)
    batches = [torch.randint(3, VOCAB, s) for s in (shapes or [shape] * steps)]
    out = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach().clone(), {n.removeprefix("module."): p.grad.clone()
                                            for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return out


def _assert_identical(got, ref):
    assert len(got) == len(ref)
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, ref)):
        assert torch.equal(loss, ref_loss), f"step {step}: loss {loss} != {ref_loss}"
        assert grads.keys() == ref_grads.keys() and grads
        for name in ref_grads:
            assert not torch.isnan(grads[name]).any()
            assert torch.equal(grads[name], ref_grads[name]), f"step {step}: gradient of {name} differs"


def _measured_layers(variant):
    model = _model(**variant)
    sloth.patch(model, sloth.SlothConfig(kernels=False, loss="off", gradient_checkpointing="auto",
                                         memory_budget_gb=1000.0))
    _steps(model, steps=1)
    return get_checkpoint_controller(model).meter.layer_memory


def _plan_diagnosis(controller, plan, model) -> str:
    m = controller.meter.layer_memory
    return (f"{plan.summary()}; base {model.base_bytes / GiB:.3f} GiB, forward overhead "
            f"{model.forward_overhead / GiB:.3f}, backward overhead {model.backward_overhead / GiB:.3f}; "
            f"activations (forward end, backward) {[round(b / GiB, 3) for b in activation_peaks(m, plan.decisions)]} "
            f"GiB; layer 0 {m[0]}; {controller.meter.measured_tokens} tokens measured; measured peak "
            f"{None if controller.measured_peak_bytes is None else round(controller.measured_peak_bytes / GiB, 3)} GiB")


def _replan_under_pressure(controller, pressure, run_steps):
    """Measure with a budget that keeps everything, then plan again under ``pressure`` on the same
    model, against the base memory the controller itself planned with (the budgets between plans
    are a few layer inputs apart). Returns (the plan of the measured step, budget, diagnosis)."""
    run_steps(2)                     # measures; then keeps all (and the optimizer state exists)
    layers, n = controller.meter.layer_memory, len(controller.meter.layer_memory)
    device = next(controller.model.parameters()).device
    memory = controller.meter.memory_model(device, base_bytes=controller.meter.forward_base_bytes)
    keep_all = predict_peak(layers, [KEEP] * n, memory)
    recompute_but_last = predict_peak(layers, [RECOMPUTE] * (n - 1) + [KEEP], memory)
    recompute_all = predict_peak(layers, [RECOMPUTE] * n, memory)
    tightest = plan_layers(layers, 1, memory).predicted_peak_bytes
    assert keep_all > recompute_but_last and recompute_all > tightest, \
        _plan_diagnosis(controller, controller.plan, memory)
    budget = {"keep": 1000 * GiB, "partial": (keep_all + recompute_but_last) // 2,
              "offload": (recompute_all + tightest) // 2}[pressure]
    controller.set_memory_budget(budget)
    run_steps(1)                     # plans for the new budget and measures this step's peak
    plan = controller.plan
    diagnosis = _plan_diagnosis(controller, plan, memory)
    assert plan.decisions == plan_layers(layers, budget, memory).decisions, \
        f"planned against base {controller.meter.forward_base_bytes / GiB:.3f} GiB or other overheads: {diagnosis}"
    assert {"keep": KEEP, "partial": RECOMPUTE, "offload": OFFLOAD}[pressure] in plan.decisions, diagnosis
    assert plan.fits, f"{pressure}: budget {budget / GiB:.3f} GiB not met: {diagnosis}"
    assert controller.measured_peak_bytes is not None, f"the step of the new plan was not measured: {diagnosis}"
    return plan, budget, diagnosis


# ---------------------------------------------------------------------------------------------
# GPU (H200): bf16 parity, the plan's prediction against the measured peak, no growth
# ---------------------------------------------------------------------------------------------

def _gpu_model(layers=8, hidden=1024, seed=0, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         max_position_embeddings=4096, attention_dropout=dropout, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    return model
