"""What a model's own loss is, read from the code of its class's ``forward``.

The fast loss must equal the model's own. Text CausalLMs of the table all call
``self.loss_function(logits, labels, vocab_size, **kwargs)``; vision-language classes differ
between transformers releases (Gemma 3 in 5.16 averages over the positions its attention mask
keeps and ignores ``num_items_in_batch``; Qwen3-VL in 5.16 does not pass the call's kwargs, so
``num_items_in_batch`` is dropped). What the code shows is one of these; anything else is
unknown and the model keeps its own loss.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Optional, Tuple

# sum / num_items_in_batch when the call gives it, else the mean over labels != -100; shift_labels honoured
STANDARD = "standard"
# the mean over labels != -100: the call's kwargs (num_items_in_batch, shift_labels) are not passed on
MEAN = "mean"
# nn.CrossEntropyLoss() (mean) over the shifted positions whose 2-D attention mask is not 0
ATTENTION_MASKED_MEAN = "attention-masked mean"


def loss_semantics(model_cls, softcap_attr: Optional[str] = None) -> Tuple[Optional[str], str]:
    """``(semantics, how it was recognised)``, or ``(None, why not)``. ``softcap_attr``: the config
    attribute the table says the logits are softcapped with (None: not softcapped); the forward must
    agree (a Gemma 3 CausalLM softcaps, its vision-language class does not)."""
    name = f"{model_cls.__name__}.forward"
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(model_cls.forward))))
    except (OSError, TypeError, SyntaxError) as exc:
        return None, f"the source of {name} cannot be read ({type(exc).__name__})"
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    own = [c for c in calls if _is_self_attr(c.func, "loss_function")]
    ce = [c for c in calls if isinstance(c.func, ast.Attribute) and c.func.attr == "CrossEntropyLoss"]
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    softcaps = sorted(a for a in read if "softcap" in a)
    if softcaps != ([softcap_attr] if softcap_attr else []):
        return None, (f"{name} reads {', '.join(softcaps) or 'no logit softcap'} where the architecture table says "
                      f"{softcap_attr or 'none'}")
    if len(own) == 1 and not ce:
        if any(k.arg is None for k in own[0].keywords):
            return STANDARD, f"{name} calls self.loss_function(..., **kwargs)"
        return MEAN, f"{name} calls self.loss_function without the call's kwargs (num_items_in_batch is dropped)"
    if not own and len(ce) == 1 and not ce[0].args and not ce[0].keywords and "shift_attention_mask" in names:
        return ATTENTION_MASKED_MEAN, (f"{name} averages nn.CrossEntropyLoss() over the positions its attention mask "
                                       f"keeps (num_items_in_batch is not used)")
    return None, f"{name} computes its loss in a way sloth does not recognise"


def _is_self_attr(node, attr: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name)
            and node.value.id == "self")
