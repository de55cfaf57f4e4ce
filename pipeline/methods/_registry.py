"""Every trained method's module, imported by name: the plug-ins PretrainModule delegates to.

Imported by pipeline.models.pretrain only (it pulls in torch). The imports are by name, so
pipeline/dag.py counts every module of this package as a code dependency of whatever imports
this one (``dag.PLUGINS``), and tests/test_runners.py checks that against the real imports.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pipeline.methods import TRAINED

#: The trained methods' modules by name (pipeline/methods/__init__.py describes their interface).
IMPLEMENTATIONS: dict[str, ModuleType] = {
    name: importlib.import_module(f"pipeline.methods.{name}") for name in TRAINED
}
