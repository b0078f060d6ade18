"""qdpo: QLoRA Direct Preference Optimization on one GPU.

From Python: `qdpo.train(recipe)`, `qdpo.evaluate(run, data)`, `qdpo.merge(run, out)`,
`qdpo.export(run, fmt, out)`, `qdpo.load_recipe(path, overrides)`. The library logs through
`logging.getLogger("qdpo")` and prints nothing itself.

The top-level names are imported lazily so that `qdpo --help` and recipe validation stay fast
and never import torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import types
from typing import Any, Callable

from qdpo.errors import QdpoError

__version__ = "0.1.0"

__all__ = ["__version__", "QdpoError", "Recipe", "load_recipe", "train", "evaluate", "merge",
           "export"]

# Micro-batches change shape every step (rows of varying length), which fragments the CUDA
# caching allocator's fixed-size segments; expandable segments grow in place instead. Set before
# torch touches the GPU; a user's own allocator setting wins.
if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

# bitsandbytes warns on every CPU with AVX512-BF16 that an optional inference kernel package
# (`kernels`) is absent; qdpo trains without that kernel, so the warning only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())
# datasets logs a damaged parquet file as an error before raising; qdpo's own message about
# the same file follows, so the first would only say it twice.
logging.getLogger("datasets.packaged_modules.parquet.parquet").addFilter(
    lambda record: not record.getMessage().startswith(("Failed to read schema",
                                                       "Failed to read file")))


def callable_module(module_name: str, fn: Callable[..., Any]) -> None:
    """Make a module callable as `fn`.

    `qdpo.train`, `qdpo.evaluate` and `qdpo.export` are rooms of the package and the functions
    users call. Importing a submodule sets the package's attribute to the module, so the
    module itself must be callable for `qdpo.train(recipe)` to work in every import order.
    """
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    CallableModule.__call__.__doc__ = fn.__doc__
    module.__class__ = CallableModule


def __getattr__(name: str) -> Any:
    if name in ("Recipe", "load_recipe"):
        from qdpo import recipe

        return getattr(recipe, name)
    if name in ("train", "evaluate", "export"):
        return importlib.import_module(f"qdpo.{name}")
    if name == "merge":
        from qdpo.export import merge

        return merge
    raise AttributeError(f"module 'qdpo' has no attribute {name!r}")
