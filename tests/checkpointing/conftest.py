"""Makes ``helpers.py`` importable as ``checkpointing_helpers`` for this folder's test modules.

The suite imports test files with ``--import-mode=importlib`` (no folder on ``sys.path``: the repo
root's ``kernels/`` would shadow Hugging Face's ``kernels`` package), so the shared helpers are
loaded here, before pytest imports the test modules of this folder.
"""
import importlib.util
import os
import sys

_NAME = "checkpointing_helpers"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, os.path.join(os.path.dirname(__file__), "helpers.py"))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)
