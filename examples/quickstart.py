"""The quickstart from a checkout: ``python examples/quickstart.py [--baseline]``.

The script itself is ``sloth_plugins/quickstart.py`` (so an installed package runs it too:
``python -m sloth_plugins.quickstart``); from here its output goes to examples/output.
"""
import os
import sys

from sloth_plugins.quickstart import main

if __name__ == "__main__":
    sys.exit(main(output_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")))
