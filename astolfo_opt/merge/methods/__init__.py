"""Merge methods: one small typed function each, registered by :func:`~.registry.merge_method`.

Every module in this package is imported here, so adding a method is adding one file: its decorator registers it,
and the recipe validator, the kernel, ``astolfo-opt merge`` and the search space's ``methods:`` option pick it up.
"""

from __future__ import annotations

import importlib
import pkgutil

from astolfo_opt.merge.methods.registry import Inputs, Linear, MergeMethod, Param, get_method, merge_method, method_names

for _mod in sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda n: (n != "linear", n)):  # linear first
    if _mod != "registry":
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["Inputs", "Linear", "MergeMethod", "Param", "get_method", "merge_method", "method_names"]
