"""qdpo: QLoRA Direct Preference Optimization on one GPU.

The top-level names are imported lazily so that `qdpo --help` and recipe validation stay fast
and never import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "QdpoError", "Recipe", "load_recipe", "train"]

import os

from qdpo.errors import QdpoError

# Micro-batches change shape every step (rows of varying length), which fragments the CUDA
# caching allocator's fixed-size segments; expandable segments grow in place instead. Set before
# torch touches the GPU; a user's own allocator setting wins.
if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def __getattr__(name: str):
    if name in ("Recipe", "load_recipe"):
        from qdpo import recipe

        return getattr(recipe, name)
    if name == "train":
        from qdpo.train import train

        return train
    raise AttributeError(f"module 'qdpo' has no attribute {name!r}")
