"""The reference log-prob cache on disk."""

from __future__ import annotations

import torch


def test_reference_cache_is_safetensors_and_a_damaged_one_is_recomputed(tmp_path, monkeypatch):
    from qdpo.reference import ReferenceTable, cache_path, load_cached, save_cached

    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    table = ReferenceTable(*(torch.arange(3, dtype=torch.float32) + k for k in range(4)))
    save_cached("k", table)
    path = cache_path("k")
    assert path.suffix == ".safetensors" and path.read_bytes()[8:9] == b"{"  # json header
    back = load_cached("k", 3)
    assert torch.equal(back.rejected, table.rejected) and not back.missing([0, 1, 2])
    assert load_cached("k", 4).missing([0, 1, 2, 3]) == [0, 1, 2, 3]  # other data: not reused
    path.write_bytes(b"not a safetensors file")
    assert load_cached("k", 3).missing([0, 1, 2]) == [0, 1, 2]
