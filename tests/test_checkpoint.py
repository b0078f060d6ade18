"""Checkpoints: trainer state in safetensors + json (never unpickled), save / restore."""

from __future__ import annotations

import json
import math
import pickle
import random

import pytest
import torch

from qdpo import checkpoint as ck
from qdpo.errors import QdpoError
from qdpo.losses import LossParams, Objective
from tiny import tiny_lora_model
from tiny import quickstart_recipe


def nested_state():
    return {
        "tensors": [torch.arange(6, dtype=torch.float32).reshape(2, 3)[:, 1:],  # a strided view
                    torch.tensor(3.5), torch.tensor([1, 2], dtype=torch.int64),
                    torch.ones(2, dtype=torch.bfloat16), torch.tensor([True, False])],
        "pair": (1, "two", (3.0, None)),
        "by_index": {0: {"step": torch.tensor(7.0)}, 12: {"lr": 0.5}},
        "__tensor__": "a key that looks like a tag",
        "floats": [math.inf, -math.inf, 0.1, -0.0],
        "none": None, "flag": True, "empty": {},
        "python_rng": random.getstate(),
    }


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_state_round_trip_in_safetensors_and_plain_json(tmp_path):
    state = nested_state()
    ck.write_state(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.STATE_JSON, ck.STATE_TENSORS]
    tree = json.loads((tmp_path / ck.STATE_JSON).read_text())  # plain json, no pickle
    assert isinstance(tree, dict)
    assert_same(ck.read_state(tmp_path), state)
    assert ck.read_state(tmp_path)["python_rng"] == random.getstate()


def test_state_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="object"):
        ck.write_state({"x": object()}, tmp_path)


def test_legacy_torch_file_still_loads(tmp_path):
    state = {"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
             "rng": {"python": random.getstate(), "torch": torch.random.get_rng_state()},
             "trainer": {"step": 4}}
    torch.save(state, tmp_path / ck.LEGACY_STATE)
    assert_same(ck.read_state(tmp_path), state)


class Payload:
    """Unpickling this would call `_touch(marker)`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path):
    open(path, "w").close()


def test_legacy_file_with_a_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"trainer": {"step": 1}, "evil": Payload(marker)}, tmp_path / ck.LEGACY_STATE)
    with pytest.raises((pickle.UnpicklingError, QdpoError)):
        ck.read_state(tmp_path)
    assert not marker.exists()
    # the control: a plain unpickle of the same file would have run it
    torch.load(tmp_path / ck.LEGACY_STATE, weights_only=False)
    assert marker.exists()


def test_8bit_optimizer_state_round_trip(tmp_path):
    """bitsandbytes' 8-bit optimizers share quantization maps between parameters, and
    safetensors refuses tensors that share memory: the state must still round-trip."""
    from qdpo.train import make_optimizer

    t = quickstart_recipe(tmp_path, "train.optimizer=adamw_8bit").train
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    opt = make_optimizer(t, list(model.parameters()), torch.device("cpu"))
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    ck.write_state({"optimizer": opt.state_dict()}, tmp_path)
    fresh = make_optimizer(t, list(model.parameters()), torch.device("cpu"))
    fresh.load_state_dict(ck.read_state(tmp_path)["optimizer"])
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["state1"], opt.state[p]["state1"])


def runtime(seed):
    """A tiny LoRA model with the optimizer, schedule, scaler and objective of a run."""
    model = tiny_lora_model("llama")
    with torch.no_grad():  # distinct LoRA weights per seed
        g = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, sched, scaler, Objective(["bco_pair"], LossParams())


def test_save_restore_round_trip(tmp_path):
    model, opt, sched, scaler, obj = runtime(seed=1)
    ids = torch.randint(3, 250, (2, 12))
    scaler.scale(model(input_ids=ids).logits.float().pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update(new_scale=37.0)
    sched.step()
    obj.params.bco_delta, obj.reward_count = 0.25, 10
    path = ck.save(tmp_path, 3, model, None, opt, sched, scaler, obj, keep_last=2)
    assert path == ck.checkpoint_path(tmp_path, 3) and ck.list_checkpoints(tmp_path) == [path]
    assert not list(path.glob("*.pt"))
    after_save = torch.rand(3), random.random()

    model2, opt2, sched2, scaler2, obj2 = runtime(seed=2)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert any(not torch.equal(p, lora[n]) for n, p in model2.named_parameters() if n in lora)
    assert ck.restore(path, model2, opt2, sched2, scaler2, obj2) == 3
    assert torch.equal(torch.rand(3), after_save[0])  # RNG states restored
    assert random.random() == after_save[1]
    for n, p in model2.named_parameters():
        if n in lora:
            assert torch.equal(p, lora[n]), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["state"].keys() == s2["state"].keys() and s1["state"]
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            assert torch.equal(v, s2["state"][i][k]), (i, k)
    assert s2["param_groups"] == s1["param_groups"]
    assert sched2.last_epoch == sched.last_epoch == 1
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert scaler2.get_scale() == 37.0
    assert obj2.state_dict() == {"bco_delta": 0.25, "reward_count": 10}


def test_restore_refuses_an_incomplete_checkpoint(tmp_path):
    model, opt, sched, scaler, obj = runtime(seed=1)
    path = ck.save(tmp_path, 1, model, None, opt, sched, scaler, obj, keep_last=1)
    (path / ck.META).unlink()
    assert ck.list_checkpoints(tmp_path) == []
    with pytest.raises(QdpoError, match="not a complete"):
        ck.restore(path, model, opt, sched, scaler, obj)


def test_save_records_the_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    model, opt, sched, scaler, obj = runtime(seed=1)
    path = ck.save(tmp_path, 3, model, None, opt, sched, scaler, obj, keep_last=1)
    meta = json.loads((path / ck.META).read_text())
    assert meta["step"] == 3
    assert sorted(meta["files"]) == sorted(p.name for p in path.iterdir() if p.name != ck.META)
    for name, rec in meta["files"].items():
        data = (path / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ck.verify(path) is True


def test_verify_names_the_damaged_file_and_why(tmp_path):
    model, opt, sched, scaler, obj = runtime(seed=1)
    path = ck.save(tmp_path, 3, model, None, opt, sched, scaler, obj, keep_last=1)
    f = path / ck.STATE_TENSORS
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=f"{ck.STATE_TENSORS} changed since it was"):
        ck.verify(path)
    f.write_bytes(bytes(data[:-10]))
    with pytest.raises(ck.CheckpointError, match="10 bytes|truncated"):
        ck.verify(path)
    moved = ck.checkpoint_path(tmp_path, 5)
    path.rename(moved)
    with pytest.raises(ck.CheckpointError, match="says step 3, but the directory is named "
                                                 "step-0000005"):
        ck.verify(moved)


def test_checkpoint_without_hashes_verifies_as_unverifiable(tmp_path):
    model, opt, sched, scaler, obj = runtime(seed=1)
    path = ck.save(tmp_path, 3, model, None, opt, sched, scaler, obj, keep_last=1)
    (path / ck.META).write_text(json.dumps({"step": 3}))  # what qdpo wrote before hashes
    assert ck.verify(path) is False
    (path / ck.STATE_JSON).write_text("{")
    with pytest.raises(ck.CheckpointError, match=f"{ck.STATE_JSON} is unreadable"):
        ck.verify(path)


def test_list_checkpoints_ignores_stray_entries(tmp_path):
    d = tmp_path / ck.CKPT_DIR
    for name in ("step-0000002", "step-0000010", "step-0000002 copy", ".step-0000004.tmp-7"):
        (d / name).mkdir(parents=True)
        (d / name / ck.META).write_text('{"step": 2}')
    (d / "notes.txt").write_text("x")
    (d / "step-0000006").mkdir()  # no metadata: not complete
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-0000002", "step-0000010"]
    steps, strays = ck.scan(tmp_path)
    assert [p.name for p in steps] == ["step-0000002", "step-0000006", "step-0000010"]
    assert [p.name for p in strays] == ["notes.txt", "step-0000002 copy"]


def test_restore_refuses_an_adapter_of_another_shape_in_one_message(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, opt, sched, scaler, obj = runtime(seed=1)
    path = ck.save(tmp_path, 3, model, None, opt, sched, scaler, obj, keep_last=1)
    base = AutoModelForCausalLM.from_config(model.get_base_model().config)
    other = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ck.CheckpointError) as e:
        ck.restore(path, other, opt, sched, scaler, obj)
    msg = str(e.value)
    assert "\n" not in msg and "size mismatch" not in msg
    assert "(LoRA r=4 on " in msg and "does not fit this run's model (LoRA r=2 on q_proj)" in msg


def test_checkpoint_of_qdpo_0_1_0_verifies_and_restores(tmp_path):
    """A torch-file trainer state and no hashes: checked for structure (zip CRCs), restored."""
    model, opt, sched, scaler, obj = runtime(seed=1)
    path = ck.save(tmp_path, 3, model, None, opt, sched, scaler, obj, keep_last=1)
    torch.save(ck.read_state(path), path / ck.LEGACY_STATE)
    (path / ck.STATE_JSON).unlink()
    (path / ck.STATE_TENSORS).unlink()
    (path / ck.META).write_text(json.dumps({"step": 3}))
    assert ck.verify(path) is False
    assert ck.restore(path, model, opt, sched, scaler, obj) == 3
    data = (path / ck.LEGACY_STATE).read_bytes()
    (path / ck.LEGACY_STATE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=f"{ck.LEGACY_STATE} is unreadable"):
        ck.verify(path)


def test_a_lora_shape_is_said_in_a_line_however_many_modules_it_names():
    from qdpo.checkpoint import _lora_shape

    many = _lora_shape(16, [f"model.layers.{i}.self_attn.q_proj" for i in range(80)])
    assert many.endswith("and 72 more") and len(many) < 400
    assert _lora_shape(8, ["v_proj", "q_proj"]) == "LoRA r=8 on q_proj, v_proj"
