"""Shared helpers for tests: tiny models and recipes, all offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart"
QUICKSTART_RECIPE = REPO / "recipes" / "quickstart.yaml"


def quickstart_recipe(tmp_path: Path, *overrides: str) -> Any:
    """The quickstart recipe, writing into tmp_path, with overrides applied."""
    from qdpo.recipe import load_recipe

    return load_recipe(QUICKSTART_RECIPE, [f"output.dir={tmp_path / 'run'}", *overrides])
