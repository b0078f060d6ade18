"""qdpo: QLoRA Direct Preference Optimization on one GPU.

The top-level names are imported lazily so that `qdpo --help` and recipe validation stay fast
and never import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "QdpoError", "Recipe", "load_recipe", "train"]

from qdpo.errors import QdpoError


def __getattr__(name: str):
    if name in ("Recipe", "load_recipe"):
        from qdpo import recipe

        return getattr(recipe, name)
    if name == "train":
        from qdpo.train import train

        return train
    raise AttributeError(f"module 'qdpo' has no attribute {name!r}")
