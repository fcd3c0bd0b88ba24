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
