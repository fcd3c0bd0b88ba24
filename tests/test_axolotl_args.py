"""The Axolotl plugin's config model without Axolotl: ``sloth_*`` keys as YAML reads them."""
import pytest
import yaml

import sloth_plugins as sloth
from sloth_plugins.integrations.axolotl_args import SlothArgs, sloth_config_from

YAML = """
sloth_kernels: true
sloth_loss: off                     # unquoted: YAML reads false
sloth_gradient_checkpointing: off
"""


def test_unquoted_off_in_yaml_means_off():
    raw = yaml.safe_load(YAML)
    assert raw["sloth_loss"] is False and raw["sloth_gradient_checkpointing"] is False   # what YAML does
    args = SlothArgs(**raw)
    assert args.sloth_loss == "off" and args.sloth_gradient_checkpointing == "off"
    assert sloth_config_from(args) == sloth.SlothConfig(loss="off", gradient_checkpointing="off")


@pytest.mark.parametrize("key", ["sloth_loss", "sloth_gradient_checkpointing"])
def test_true_and_other_values_are_still_refused(key):
    with pytest.raises(ValueError, match=key):
        SlothArgs(**{key: True})
    with pytest.raises(ValueError, match=key):
        SlothArgs(**{key: "no"})


# ---- one config model: the sloth_* keys come from config.OPTIONS, their values are checked by it --------------
def test_the_keys_are_the_config_options_plus_one_boolean_per_kernel():
    import dataclasses

    from sloth_plugins.config import KERNEL_NAMES, OPTIONS
    from sloth_plugins.integrations.axolotl_args import CONFIG_KEYS, KERNEL_KEYS, KEYS
    fields = [f.name for f in dataclasses.fields(sloth.SlothConfig) if f.init]
    assert [o.name for o in OPTIONS] == fields            # the table covers the config, in its order
    assert CONFIG_KEYS == tuple("sloth_" + f for f in fields)
    assert KERNEL_KEYS == tuple("sloth_" + k for k in KERNEL_NAMES) and set(SlothArgs.model_fields) == set(KEYS)
    schema = SlothArgs.model_json_schema()["properties"]
    assert schema["sloth_loss"]["anyOf"][0]["enum"] == ["chunked", "off"]
    assert schema["sloth_gradient_checkpointing"]["description"] == next(
        o.help for o in OPTIONS if o.name == "gradient_checkpointing")


@pytest.mark.parametrize("key, value, message", [
    ("sloth_memory_budget_gb", -1, "sloth_memory_budget_gb: memory_budget_gb must be a positive number or None, got -1"),
    ("sloth_loss_chunk_size", 0, "sloth_loss_chunk_size: loss_chunk_size must be a positive int or None, got 0"),
    ("sloth_kernels", ["rms_norm", "flash"], "sloth_kernels: unknown kernel name(s) 'flash'"),
])
def test_values_are_checked_by_the_config_itself(key, value, message):
    import re
    with pytest.raises(ValueError, match=re.escape(message)):
        SlothArgs(**{key: value})
    with pytest.raises(sloth.SlothConfigError, match=re.escape(message.split(": ", 1)[1])):
        sloth.SlothConfig(**{key[len("sloth_"):]: value})   # the same words from the same check


# ---- per-kernel booleans, as Axolotl's Liger plugin has them ----------------------------------------------------
PER_KERNEL = """
sloth_rms_norm: true
sloth_rope: false
sloth_mlp: true
"""


def test_per_kernel_booleans_from_yaml():
    args = SlothArgs(**yaml.safe_load(PER_KERNEL))
    config = sloth_config_from(args)
    assert "rope" not in config.enabled_kernels
    assert set(config.enabled_kernels) == set(sloth.SlothConfig().enabled_kernels) - {"rope"}   # unset: all on
    only = sloth_config_from(SlothArgs(**yaml.safe_load("sloth_kernels: [rms_norm]\nsloth_rms_norm: true\n")))
    assert only.enabled_kernels == ("rms_norm",)          # agreeing with a list is fine
    # sloth_kernels true/false is the default of the kernels whose boolean is unset
    assert sloth_config_from(SlothArgs(sloth_kernels=False, sloth_rms_norm=True)).enabled_kernels == ("rms_norm",)
    assert "mlp" not in sloth_config_from(SlothArgs(sloth_kernels=True, sloth_mlp=False)).enabled_kernels


@pytest.mark.parametrize("text, message", [
    ("sloth_kernels: [rms_norm]\nsloth_rope: true\n", "sloth_rope: true contradicts sloth_kernels: ['rms_norm']"),
    ("sloth_kernels: {rope: false}\nsloth_rope: true\n", "sloth_rope: true contradicts sloth_kernels: {'rope': False}"),
    ("sloth_kernels: rms_norm, mlp\nsloth_mlp: false\nsloth_rope: true\n",
     "sloth_rope: true, sloth_mlp: false contradict"),
])
def test_a_per_kernel_boolean_contradicting_sloth_kernels_is_refused(text, message):
    import re
    with pytest.raises(ValueError, match=re.escape(message) + ".*give each kernel's choice once"):
        SlothArgs(**yaml.safe_load(text))


def test_a_per_kernel_boolean_takes_its_module_from_liger():
    # sloth_rms_norm: false hands RMSNorm to Liger; sloth_rms_norm: true beside liger_rms_norm is refused
    from sloth_plugins.integrations.axolotl_args import conflicts
    off = sloth_config_from({"sloth_rms_norm": False, "liger_rms_norm": True})
    assert conflicts({"liger_rms_norm": True}.get, off) == []
    on = sloth_config_from({"sloth_rms_norm": True, "liger_rms_norm": True})
    assert any("liger_rms_norm: True and sloth_kernels (rms_norm)" in p for p in conflicts({"liger_rms_norm": True}.get, on))
