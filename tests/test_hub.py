"""The commit a hub id resolves to in the local hub cache, and the reference cache key using it."""

from __future__ import annotations

import torch

from qdpo.data import PairTokens
from qdpo.hub import hub_cache_dir, resolved_commit
from qdpo.reference import cache_key
from tiny import quickstart_recipe

MAIN = "a" * 40
DEV = "0123456789abcdef0123456789abcdef01234567"
NEWER = "b" * 40


def fake_repo(cache, repo_id, refs, repo_type="model"):
    """The layout huggingface_hub writes: <type>s--org--name/{refs/<name>, snapshots/<commit>}."""
    folder = cache / "--".join([f"{repo_type}s", *repo_id.split("/")])
    for name, commit in refs.items():
        ref = folder / "refs" / name
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
        snap = folder / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "config.json").write_text("{}")
    return folder


def use_cache(monkeypatch, cache):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))


def test_resolves_main_and_a_branch(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    use_cache(monkeypatch, cache)  # set after qdpo.hub was imported: read at call time
    fake_repo(cache, "org/name", {"main": MAIN, "dev": DEV})
    assert hub_cache_dir() == cache
    assert resolved_commit("org/name", None) == MAIN
    assert resolved_commit("org/name", "main") == MAIN
    assert resolved_commit("org/name", "dev") == DEV
    assert resolved_commit("org/name", "no-such-branch") is None
    assert resolved_commit("org/other", None) is None  # never downloaded
    assert resolved_commit("org/name", DEV[:10]) == DEV  # a short hash naming one snapshot
    assert resolved_commit("org/name", NEWER) == NEWER  # a full hash is already a commit
    assert resolved_commit("org/never-seen", NEWER) == NEWER


def test_same_layout_as_huggingface_hub(tmp_path, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    cache = tmp_path / "hub"
    use_cache(monkeypatch, cache)
    fake_repo(cache, "org/name", {"main": MAIN})
    fake_repo(cache, "org/data", {"main": DEV}, repo_type="dataset")
    found = try_to_load_from_cache("org/name", "config.json", cache_dir=cache)
    assert found and resolved_commit("org/name", None) in str(found)
    found = try_to_load_from_cache("org/data", "config.json", cache_dir=cache,
                                   repo_type="dataset")
    assert found and resolved_commit("org/data", None, repo_type="dataset") in str(found)


def test_datasets_and_models_are_apart(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    use_cache(monkeypatch, cache)
    fake_repo(cache, "org/thing", {"main": MAIN}, repo_type="dataset")
    assert resolved_commit("org/thing", None, repo_type="dataset") == MAIN
    assert resolved_commit("org/thing", None) is None
    fake_repo(cache, "solo", {"main": DEV})  # an id without an organisation
    assert resolved_commit("solo", None) == DEV


def test_hf_home_is_followed(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    fake_repo(tmp_path / "home" / "hub", "org/name", {"main": MAIN})
    assert resolved_commit("org/name", None) == MAIN


def test_local_paths_give_none(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    use_cache(monkeypatch, cache)
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    fake_repo(cache, "org/name", {"main": MAIN})
    assert resolved_commit("org/name", None) is None  # a directory by that name wins, as in
    assert resolved_commit(str(local), None) is None  # transformers' from_pretrained
    assert resolved_commit("./model", None) is None
    assert resolved_commit("/no/such/dir", None) is None


def test_reference_key_follows_the_hub_commit(tmp_path, monkeypatch):
    """An update upstream (refs/main moves) must not reuse the old reference log-probs."""
    cache = tmp_path / "hub"
    use_cache(monkeypatch, cache)
    folder = fake_repo(cache, "org/name", {"main": MAIN})
    r = quickstart_recipe(tmp_path, "model.name_or_path=org/name", "model.random_init=false")
    pairs = [PairTokens([5, 6], [7, 8, 9], [10])]
    before = cache_key(r, "org/name", pairs, torch.float32)
    assert cache_key(r, "org/name", pairs, torch.float32) == before
    (folder / "refs" / "main").write_text(NEWER)
    after = cache_key(r, "org/name", pairs, torch.float32)
    assert after != before
    # a local directory's key does not depend on the hub cache
    local = tmp_path / "weights"
    local.mkdir()
    (local / "config.json").write_text("{}")
    k1 = cache_key(r, str(local), pairs, torch.float32)
    (folder / "refs" / "main").write_text(MAIN)
    assert cache_key(r, str(local), pairs, torch.float32) == k1


def test_a_hub_data_set_is_fingerprinted_by_its_commit(tmp_path, monkeypatch, qs_tok):
    from qdpo.data.store import fingerprint_inputs
    from qdpo.recipe import DataConfig, DataSource, EvalConfig

    cache = tmp_path / "hub"
    use_cache(monkeypatch, cache)
    folder = fake_repo(cache, "org/pairs", {"main": MAIN}, repo_type="dataset")
    data = DataConfig(train=[DataSource(path="org/pairs")])

    def inputs():
        return fingerprint_inputs(data, EvalConfig(), qs_tok, seed=0, resolve=str)

    before = inputs()
    assert any(MAIN in part for part in before)
    (folder / "refs" / "main").write_text(NEWER)  # the set was updated upstream
    assert inputs() != before

