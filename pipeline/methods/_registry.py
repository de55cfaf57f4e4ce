"""Every trained method's module, imported by name: the plug-ins PretrainModule delegates to.

Imported by pipeline.models.pretrain only (it pulls in torch). The imports are by name, so
pipeline/dag.py counts every module of this package as a code dependency of whatever imports
this one (``dag.PLUGINS``), and tests/test_runners.py checks that against the real imports.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pipeline.methods import TRAINED
from pipeline.methods._contract import check


def _load(name: str) -> ModuleType:
    """The method's module, checked against the contract (a misspelt hook fails here)."""
    module = importlib.import_module(f"pipeline.methods.{name}")
    check(module)
    return module


#: The trained methods' modules by name (pipeline/methods/_contract.py is their interface).
IMPLEMENTATIONS: dict[str, ModuleType] = {name: _load(name) for name in TRAINED}
