"""Which commit of a Hugging Face hub repository the local hub cache holds, offline.

Caches keyed by a hub id and a revision alone go stale when the repository is updated upstream
and no revision pins it (a branch such as `main` moves). The local hub cache records what each
branch or tag resolved to when files were last downloaded (`<cache>/models--org--name/refs/main`
holds a commit hash), and transformers loads the snapshot of that commit, so keys that include
it change exactly when the weights (or data) a run reads change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_TYPES = ("model", "dataset", "space")


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read from the environment now (not at import).

    Same precedence as `huggingface_hub.constants`: HF_HUB_CACHE, the legacy
    HUGGINGFACE_HUB_CACHE, then HF_HOME/hub, then XDG_CACHE_HOME/huggingface/hub.
    """
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def is_local_path(repo_id: str) -> bool:
    """A directory or file on disk, or something shaped like a path rather than `org/name`."""
    return (os.path.exists(repo_id) or repo_id.startswith((".", "/", "~"))
            or os.path.isabs(repo_id) or repo_id.count("/") > 1 or "\\" in repo_id)


def resolved_commit(repo_id: str, revision: str | None,
                    repo_type: str = "model") -> str | None:
    """The commit hash the local hub cache resolves `repo_id` at `revision` to, or None.

    `revision` None means the default branch (`main`). A revision that already is a full commit
    hash is returned as is; a local path gives None, and so does a repository or revision the
    cache has never seen (nothing downloaded yet). Works offline: only the cache is read.
    `repo_type` is "model", "dataset" or "space".
    """
    if repo_type not in _REPO_TYPES:
        raise ValueError(f"repo_type must be one of {_REPO_TYPES}, not {repo_type!r}")
    if revision and _COMMIT.fullmatch(revision):
        return revision
    if not repo_id or is_local_path(repo_id):
        return None
    folder = hub_cache_dir() / "--".join([f"{repo_type}s", *repo_id.split("/")])
    ref = folder / "refs" / (revision or "main")
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        commit = ""
    if _COMMIT.fullmatch(commit):
        return commit
    # a short commit hash: the one snapshot it names, if exactly one
    if revision and re.fullmatch(r"[0-9a-f]{7,39}", revision):
        try:
            found = [p.name for p in (folder / "snapshots").iterdir()
                     if p.name.startswith(revision) and _COMMIT.fullmatch(p.name)]
        except OSError:
            found = []
        if len(found) == 1:
            return found[0]
    return None
