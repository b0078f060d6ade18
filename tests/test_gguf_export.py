"""GGUF export: tiny random llama / qwen2 / mistral models and a LoRA adapter, read back with
gguf.GGUFReader and checked against llama.cpp's conventions (names, shapes, types, q/k
permutation, tokenizer metadata, LoRA alpha)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qdpo.errors import QdpoError  # noqa: E402
from qdpo.export import GGUF_MISSING, export_gguf, export_gguf_lora  # noqa: E402
from qdpo.export.gguf_vocab import LLAMA3_REGEX, QWEN2_REGEX  # noqa: E402

Q = gguf.GGMLQuantizationType
N_LAYERS, N_HEAD, N_KV, HIDDEN, FF = 2, 4, 2, 64, 128
HEAD_DIM = HIDDEN // N_HEAD
N_VOCAB = 320  # more embedding rows than tokenizer tokens: exercises [PAD] tokens
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["hello world, the quick brown fox jumps over the lazy dog"] * 40 + [
    "I've been told 1234 apples cost 3.50 each", "Ünïcödé テスト 🦙"]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
BOS, EOS, PAD = 0, 1, 2


# --------------------------------------------------------------------------- fixtures


def save_bytelevel_tokenizer(path: Path, pre: str) -> None:
    """A tiny byte-level BPE tokenizer (Llama-3 / Qwen2 / GPT-2 style pre-tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = {"llama3": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}[pre]
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[BOS],
                                   eos_token=SPECIALS[EOS], pad_token=SPECIALS[PAD])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def save_spm_style_tokenizer(path: Path) -> None:
    """A tiny sentencepiece-style BPE tokenizer.json (byte fallback, like Llama-2 / Mistral)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "\u2581abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>",
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["[INST]"]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norms included) so that round trips mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _save_model(path: Path, arch: str, pre: str, **overrides) -> Path:
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=N_VOCAB, hidden_size=HIDDEN, num_hidden_layers=N_LAYERS,
                  num_attention_heads=N_HEAD, num_key_value_heads=N_KV, intermediate_size=FF,
                  max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=BOS,
                  eos_token_id=EOS, pad_token_id=PAD)
    common.update(overrides)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**common))
    _randomize(model, seed={"llama": 1, "qwen2": 2, "mistral": 3}[arch])
    # small shards: the export must stream several of them
    model.save_pretrained(path, max_shard_size="60KB")
    if pre == "spm":
        save_spm_style_tokenizer(path)
    else:
        save_bytelevel_tokenizer(path, pre)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("llama"), "llama", "llama3",
                       rope_parameters={"rope_type": "default", "rope_theta": 50000.0})


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("qwen2"), "qwen2", "qwen2",
                       tie_word_embeddings=True)


def hf_state(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    out: dict[str, np.ndarray] = {}
    for shard in sorted(model_dir.glob("model*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(shard).items()})
    return out


# --------------------------------------------------------------------------- reading helpers


def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    kv = {name: field.contents() for name, field in reader.fields.items()}
    return kv, {t.name: t for t in reader.tensors}


def values(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (HF) order, whatever its type."""
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        tuple(int(d) for d in reversed(t.shape.tolist())))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's permute(w, n_head, ...) (n_head already resolved)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    parts = hf.split(".")
    assert parts[:2] == ["model", "layers"], hf
    return f"blk.{parts[2]}." + LAYER_MAP[".".join(parts[3:])]


def expected_type(name: str, shape: tuple[int, ...], outtype: str):
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return Q.F32
    if outtype == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[outtype]


def assert_close(got: np.ndarray, want: np.ndarray, qtype, name: str) -> None:
    if qtype == Q.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif qtype == Q.F16:
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=name)
    elif qtype == Q.BF16:
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-6, err_msg=name)
    else:  # Q8_0: per-32 block absmax/127 steps
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max(), name


def check_model_gguf(path: Path, model_dir: Path, arch: str, outtype: str, permuted: bool,
                     tied: bool) -> tuple[dict, dict]:
    kv, tensors = read_gguf(path)
    state = hf_state(model_dir)

    # metadata
    assert kv["general.architecture"] == arch
    assert kv["general.type"] == "model"
    assert kv["general.name"] == model_dir.name
    assert kv[f"{arch}.block_count"] == N_LAYERS
    assert kv[f"{arch}.context_length"] == 256
    assert kv[f"{arch}.embedding_length"] == HIDDEN
    assert kv[f"{arch}.feed_forward_length"] == FF
    assert kv[f"{arch}.attention.head_count"] == N_HEAD
    assert kv[f"{arch}.attention.head_count_kv"] == N_KV
    assert kv[f"{arch}.rope.dimension_count"] == HEAD_DIM
    assert kv[f"{arch}.vocab_size"] == N_VOCAB
    assert kv[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    ftype = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[outtype]
    assert kv["general.file_type"] == ftype
    assert kv["general.quantization_version"] == gguf.GGML_QUANT_VERSION

    # tensor names: exactly what llama.cpp expects, nothing more
    expected = {gguf_name(k) for k in state if not (tied and k == "lm_head.weight")}
    assert set(tensors) == expected
    assert ("output.weight" in tensors) == (not tied)
    per_layer = {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                 "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                 "ffn_down.weight"}
    for i in range(N_LAYERS):
        assert {f"blk.{i}.{n}" for n in per_layer} <= set(tensors)
    assert {"token_embd.weight", "output_norm.weight"} <= set(tensors)

    for hf, want in state.items():
        if tied and hf == "lm_head.weight":
            continue
        name = gguf_name(hf)
        t = tensors[name]
        # GGUF dims are ggml's ne[] order: the reverse of numpy's shape
        assert [int(d) for d in t.shape] == list(reversed(want.shape)), name
        assert t.tensor_type == expected_type(name, want.shape, outtype), name
        got = values(t)
        if permuted and (".attn_q." in name or ".attn_k." in name):
            n = N_HEAD if ".attn_q." in name else N_KV
            assert not np.allclose(got, want), f"{name} was not permuted"
            got = unpermute(got, n)
        assert_close(got, want, t.tensor_type, name)
    return kv, tensors


def check_bytelevel_vocab(kv: dict, model_dir: Path, pre: str) -> None:
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == pre
    tokens = kv["tokenizer.ggml.tokens"]
    types = kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == N_VOCAB
    # the tokenizer as transformers loads it (for qwen2 its Qwen2Tokenizer adds <|endoftext|>)
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    n_tok = len(hf_tok)
    assert n_tok >= len(vocab)
    for t, i in hf_tok.get_vocab().items():
        assert tokens[i] == t
    for t, i in vocab.items():
        assert tokens[i] == t
    for content, i in hf_tok.get_added_vocab().items():
        assert tokens[i] == content
        assert types[i] == gguf.TokenType.CONTROL
    assert set(types[:n_tok]) == {gguf.TokenType.NORMAL, gguf.TokenType.CONTROL}
    assert tokens[n_tok:] == [f"[PAD{i}]" for i in range(n_tok, N_VOCAB)]
    assert set(types[n_tok:]) == {gguf.TokenType.UNUSED}
    assert kv["tokenizer.ggml.merges"] == [" ".join(m) for m in tj["model"]["merges"]]
    assert kv["tokenizer.ggml.bos_token_id"] == BOS
    assert kv["tokenizer.ggml.eos_token_id"] == EOS
    assert kv["tokenizer.ggml.padding_token_id"] == PAD
    assert kv["tokenizer.chat_template"] == CHAT_TEMPLATE


# --------------------------------------------------------------------------- model export


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_export(llama_dir, tmp_path, outtype):
    out = export_gguf(llama_dir, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    assert out == tmp_path / f"m-{outtype}.gguf" and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp file left
    kv, tensors = check_model_gguf(out, llama_dir, "llama", outtype, permuted=True, tied=False)
    assert kv["llama.rope.freq_base"] == pytest.approx(50000.0)
    assert kv["llama.attention.key_length"] == HEAD_DIM
    check_bytelevel_vocab(kv, llama_dir, "llama-bpe")
    assert "rope_freqs.weight" not in tensors


def test_llama_q8_0_keeps_odd_rows_in_f16(tmp_path):
    # intermediate 80: ffn_down rows (80) are not whole Q8_0 blocks -> F16, as llama.cpp does
    d = _save_model(tmp_path / "odd", "llama", "gpt2", intermediate_size=80)
    out = export_gguf(d, tmp_path / "odd.gguf", outtype="q8_0")
    kv, tensors = read_gguf(out)
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16
    assert tensors["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q8_0
    assert kv["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_qwen2_export(qwen_dir, tmp_path, outtype):
    out = export_gguf(qwen_dir, tmp_path / "q.gguf", outtype=outtype)
    kv, tensors = check_model_gguf(out, qwen_dir, "qwen2", outtype, permuted=False, tied=True)
    for i in range(N_LAYERS):
        for p in ("q", "k", "v"):
            t = tensors[f"blk.{i}.attn_{p}.bias"]
            assert t.tensor_type == Q.F32
    assert "output.weight" not in tensors
    check_bytelevel_vocab(kv, qwen_dir, "qwen2")


def test_mistral_spm_tokenizer_and_llama3_rope(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    d = _save_model(tmp_path / "mistral", "mistral", "spm", rope_parameters=rope,
                    bos_token_id=1, eos_token_id=2, pad_token_id=None)
    out = export_gguf(d, tmp_path / "mistral.gguf", outtype="f16")
    kv, tensors = read_gguf(out)
    assert kv["general.architecture"] == "llama"  # MistralForCausalLM is llama in llama.cpp
    # llama3 rope scaling is written as rope_freqs.weight (LlamaModel.generate_extra_tensors)
    freqs = tensors["rope_freqs.weight"]
    assert freqs.tensor_type == Q.F32 and [int(x) for x in freqs.shape] == [HEAD_DIM // 2]
    f = values(freqs)
    assert f[0] == 1.0 and f[-1] == pytest.approx(8.0)
    # permuted q against HF
    state = hf_state(d)
    q = values(tensors["blk.1.attn_q.weight"])
    np.testing.assert_allclose(unpermute(q, N_HEAD),
                               state["model.layers.1.self_attn.q_proj.weight"],
                               rtol=1e-3, atol=1e-4)
    # sentencepiece-style tokenizer -> llama vocab with byte tokens and scores
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    assert kv["tokenizer.ggml.model"] == "llama"
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(kv["tokenizer.ggml.scores"]) == N_VOCAB
    for t, i in tj["model"]["vocab"].items():
        assert tokens[i] == t
    assert types[tj["model"]["vocab"]["<0x41>"]] == gguf.TokenType.BYTE
    assert types[1] == gguf.TokenType.CONTROL
    inst = tokens.index("[INST]")
    assert types[inst] == gguf.TokenType.CONTROL
    assert kv["tokenizer.ggml.bos_token_id"] == 1
    assert kv["tokenizer.ggml.eos_token_id"] == 2
    assert kv["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_failed_export_leaves_nothing(llama_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in llama_dir.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    # a tokenizer that does not fit the embeddings fails after planning the tensors
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 100
    (bad / "config.json").write_text(json.dumps(cfg))
    out_dir = tmp_path / "out"
    with pytest.raises(QdpoError, match="embeddings"):
        export_gguf(bad, out_dir / "x.gguf")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []

    with pytest.raises(QdpoError, match="outtype"):
        export_gguf(llama_dir, tmp_path / "y.gguf", outtype="q4_k")
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QdpoError, match="does not support"):
        export_gguf(bad, tmp_path / "z.gguf")
    assert not (tmp_path / "y.gguf").exists() and not (tmp_path / "z.gguf").exists()


def test_missing_gguf_package(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(QdpoError) as e:
        export_gguf(llama_dir, tmp_path / "m.gguf")
    assert str(e.value) == GGUF_MISSING == (
        "GGUF export needs the gguf package: pip install 'qdpo[gguf]'")
    with pytest.raises(QdpoError, match="needs the gguf package"):
        export_gguf_lora(tmp_path, tmp_path / "a.gguf")


# --------------------------------------------------------------------------- LoRA export


def _make_adapter(base_dir: Path, out: Path, **lora_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                     **lora_kwargs)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return model


def _peft_delta(model, layer: int, proj: str) -> np.ndarray:
    attn = model.base_model.model.model.layers[layer].self_attn
    mod = getattr(attn, proj)
    return mod.get_delta_weight("default").detach().float().numpy()


def _gguf_delta(tensors: dict, alpha: float, name: str, n_perm: int | None) -> np.ndarray:
    """delta W the way llama.cpp applies the adapter: (alpha / rank) * B @ A, un-permuted."""
    a = values(tensors[name + ".lora_a"])
    b = values(tensors[name + ".lora_b"])
    rank = a.shape[0]
    delta = (alpha / rank) * (b @ a)
    return unpermute(delta, n_perm) if n_perm else delta


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_lora_export(llama_dir, tmp_path, outtype):
    from safetensors.torch import load_file

    adir = tmp_path / "adapter"
    model = _make_adapter(llama_dir, adir)
    acfg = json.loads((adir / "adapter_config.json").read_text())
    assert Path(acfg["base_model_name_or_path"]) == llama_dir  # found without base_config
    out = export_gguf_lora(adir, tmp_path / "lora.gguf", outtype=outtype)
    kv, tensors = read_gguf(out)
    assert kv["general.architecture"] == "llama"
    assert kv["general.type"] == "adapter"
    assert kv["adapter.type"] == "lora"
    assert kv["adapter.lora.alpha"] == pytest.approx(8.0)

    sd = load_file(adir / "adapter_model.safetensors")
    expected = set()
    for key, w in sd.items():
        assert key.startswith("base_model.model.model.layers.")
        module = key[len("base_model.model."):].replace(".lora_A.weight", "").replace(
            ".lora_B.weight", "")
        suffix = ".lora_a" if ".lora_A." in key else ".lora_b"
        name = gguf_name(module + ".weight") + suffix
        expected.add(name)
        t = tensors[name]
        want = w.float().numpy()
        assert [int(d) for d in t.shape] == list(reversed(want.shape)), name
        qt = expected_type(name, want.shape, outtype)
        assert t.tensor_type == qt, name
        got = values(t)
        if suffix == ".lora_b" and (".attn_q." in name or ".attn_k." in name):
            got = unpermute(got, N_HEAD if ".attn_q." in name else N_KV)
        assert_close(got, want, qt, name)
    assert set(tensors) == expected
    # 7 linear modules per layer, A and B each
    assert len(tensors) == N_LAYERS * 7 * 2
    assert tensors["blk.0.attn_q.weight.lora_b"].tensor_type == (
        Q.F32 if outtype == "f32" else Q.F16)  # rank-4 rows never form a Q8_0 block

    if outtype == "f32":  # the adapter llama.cpp reconstructs is peft's
        for layer in range(N_LAYERS):
            for proj, gname, n in (("q_proj", "attn_q", N_HEAD), ("k_proj", "attn_k", N_KV),
                                   ("v_proj", "attn_v", None)):
                want = _peft_delta(model, layer, proj)
                got = _gguf_delta(tensors, kv["adapter.lora.alpha"], f"blk.{layer}.{gname}.weight",
                                  n)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lora_rslora_and_base_config(llama_dir, tmp_path):
    adir = tmp_path / "adapter"
    model = _make_adapter(llama_dir, adir, use_rslora=True)
    acfg_path = adir / "adapter_config.json"
    acfg = json.loads(acfg_path.read_text())
    base_config = json.loads((llama_dir / "config.json").read_text())

    # base model not findable -> a clear error, unless base_config is given
    acfg["base_model_name_or_path"] = "some-org/not-downloaded-model"
    acfg_path.write_text(json.dumps(acfg))
    with pytest.raises(QdpoError, match="base_config"):
        export_gguf_lora(adir, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()

    out = export_gguf_lora(adir, tmp_path / "rs.gguf", base_config=base_config, outtype="f32")
    kv, tensors = read_gguf(out)
    # llama.cpp scales by alpha/r; peft's rsLoRA by lora_alpha/sqrt(r)
    assert kv["adapter.lora.alpha"] == pytest.approx(8.0 * math.sqrt(4))
    want = _peft_delta(model, 1, "q_proj")
    got = _gguf_delta(tensors, kv["adapter.lora.alpha"], "blk.1.attn_q.weight", N_HEAD)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lora_qwen2_not_permuted(qwen_dir, tmp_path):
    adir = tmp_path / "adapter"
    model = _make_adapter(qwen_dir, adir)
    out = export_gguf_lora(adir, tmp_path / "q.gguf", outtype="f32")
    kv, tensors = read_gguf(out)
    assert kv["general.architecture"] == "qwen2"
    for proj, gname in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
        want = _peft_delta(model, 0, proj)
        got = _gguf_delta(tensors, kv["adapter.lora.alpha"], f"blk.0.{gname}.weight", None)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lora_rejects_dora(llama_dir, tmp_path):
    adir = tmp_path / "adapter"
    _make_adapter(llama_dir, adir, use_dora=True)
    with pytest.raises(QdpoError, match="DoRA"):
        export_gguf_lora(adir, tmp_path / "d.gguf")
    assert not (tmp_path / "d.gguf").exists()


def test_lora_rank_and_alpha_patterns_fold_into_lora_b(llama_dir, tmp_path):
    # llama.cpp has one alpha per adapter and scales by alpha / rank(tensor): per-module ranks
    # are exact as they are, a per-module alpha is folded into that module's lora_b
    adir = tmp_path / "adapter"
    model = _make_adapter(llama_dir, adir, rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 2})
    out = export_gguf_lora(adir, tmp_path / "p.gguf", outtype="f32")
    kv, tensors = read_gguf(out)
    assert kv["adapter.lora.alpha"] == pytest.approx(8.0)
    assert [int(d) for d in tensors["blk.0.attn_q.weight.lora_a"].shape] == [HIDDEN, 8]
    for proj, gname, n in (("q_proj", "attn_q", N_HEAD), ("k_proj", "attn_k", N_KV),
                           ("v_proj", "attn_v", None)):
        want = _peft_delta(model, 0, proj)
        got = _gguf_delta(tensors, kv["adapter.lora.alpha"], f"blk.0.{gname}.weight", n)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- interrupted export


class Killed(Exception):
    pass


@pytest.mark.parametrize("what,exc", [("model", Killed), ("lora", KeyboardInterrupt)])
def test_export_failing_half_way_keeps_old_output(llama_dir, tmp_path, monkeypatch, what, exc):
    """A failure while the tensors are being written (here: at the third one) leaves an
    existing output byte for byte as it was, no output where there was none, and no temporary
    file beside it."""
    src = llama_dir
    if what == "lora":
        src = tmp_path / "adapter"
        _make_adapter(llama_dir, src)
    run = export_gguf if what == "model" else export_gguf_lora
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old, new = out_dir / "old.gguf", out_dir / "new.gguf"
    old.write_bytes(b"the previous export")

    real = gguf.GGUFWriter.write_tensor_data
    calls: list[str] = []

    def dies_at_third(self, *args, **kwargs):
        calls.append("tensor")
        if len(calls) == 3:
            partial = [p for p in out_dir.iterdir() if p.name.startswith(".")]
            assert len(partial) == 1 and partial[0].stat().st_size > 0  # really half-way
            raise exc("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", dies_at_third)
    for out in (old, new):
        calls.clear()
        with pytest.raises(exc, match="killed"):
            run(src, out, outtype="f32")
        assert len(calls) == 3
    assert old.read_bytes() == b"the previous export"
    assert sorted(p.name for p in out_dir.iterdir()) == ["old.gguf"]

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", real)
    run(src, old, outtype="f32")  # a complete export does replace it
    kv, tensors = read_gguf(old)
    assert kv["general.type"] == ("model" if what == "model" else "adapter") and tensors
    assert sorted(p.name for p in out_dir.iterdir()) == ["old.gguf"]


def test_public_names_import_from_the_package():
    import qdpo.export as ex

    for name in ex.__all__:
        assert getattr(ex, name) is not None, name
    assert ex.FORMATS == ("peft", "gguf", "gguf-lora")
    with pytest.raises(AttributeError):
        getattr(ex, "no_such_name")


# --------------------------------------------------------------------------- k-quants

# relative RMS error bounds of a dequantized tensor against the weights it came from (F32: the
# end-to-end export merges in fp16 first)
K_BOUND = {Q.Q4_K: 0.12, Q.Q5_K: 0.06, Q.Q6_K: 0.03, Q.Q5_0: 0.08, Q.Q5_1: 0.06, Q.Q8_0: 0.01,
           Q.F16: 1e-3, Q.F32: 1e-3}
K_LAYERS, K_HIDDEN = 8, 256  # rows of 256: every matrix can be k-quantized
MORE_BITS = {0, 3, 6, 7}  # llama.cpp's use_more_bits(i, 8)


@pytest.fixture(scope="module")
def k_llama_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("kllama"), "llama", "gpt2", hidden_size=K_HIDDEN,
                       intermediate_size=K_HIDDEN, num_hidden_layers=K_LAYERS)


def _rel_rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))


def check_k_tensors(tensors: dict, state: dict, types: dict, permuted: bool) -> None:
    """Every tensor has the expected type, and its values are within that type's bound."""
    assert set(tensors) == set(types)
    for hf, want in state.items():
        name = gguf_name(hf)
        if name not in tensors:
            continue
        t = tensors[name]
        assert t.tensor_type == types[name], (name, Q(t.tensor_type).name)
        got = values(t)
        if permuted and (".attn_q." in name or ".attn_k." in name):
            got = unpermute(got, N_HEAD if ".attn_q." in name else N_KV)
        assert _rel_rms(got, want) <= K_BOUND[types[name]] + 1e-7, name


def _k_mix(outtype: str) -> dict:
    """The types llama-quantize gives the 8-layer model (untied, rows of 256)."""
    base = {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K, "q6_k": Q.Q6_K}[outtype]
    types = {"token_embd.weight": base, "output.weight": Q.Q6_K, "output_norm.weight": Q.F32}
    for i in range(K_LAYERS):
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            types[f"blk.{i}.{t}.weight"] = base
        for t in ("attn_v", "ffn_down"):
            types[f"blk.{i}.{t}.weight"] = Q.Q6_K if i in MORE_BITS else base
        types[f"blk.{i}.attn_norm.weight"] = types[f"blk.{i}.ffn_norm.weight"] = Q.F32
    return types


@pytest.mark.parametrize("outtype,ftype", [("q4_k_m", 15), ("q5_k_m", 17), ("q6_k", 18)])
def test_k_quant_mixes(k_llama_dir, tmp_path, outtype, ftype):
    out = export_gguf(k_llama_dir, tmp_path / "k.gguf", outtype=outtype)
    kv, tensors = read_gguf(out)
    assert kv["general.file_type"] == ftype
    assert ftype == {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
                     "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
                     "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}[outtype]
    check_k_tensors(tensors, hf_state(k_llama_dir), _k_mix(outtype), permuted=True)


def test_k_quant_tied_embeddings_are_the_output(tmp_path):
    d = _save_model(tmp_path / "kqwen", "qwen2", "qwen2", hidden_size=K_HIDDEN,
                    intermediate_size=K_HIDDEN, tie_word_embeddings=True)
    kv, tensors = read_gguf(export_gguf(d, tmp_path / "k.gguf", outtype="q4_k_m"))
    types = {"token_embd.weight": Q.Q6_K, "output_norm.weight": Q.F32}
    for i in range(N_LAYERS):  # use_more_bits(i, 2): layer 1 only
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            types[f"blk.{i}.{t}.weight"] = Q.Q4_K
        for t in ("attn_v", "ffn_down"):
            types[f"blk.{i}.{t}.weight"] = Q.Q6_K if i == 1 else Q.Q4_K
        for t in ("attn_norm.weight", "ffn_norm.weight", "attn_q.bias", "attn_k.bias",
                  "attn_v.bias"):
            types[f"blk.{i}.{t}"] = Q.F32
    check_k_tensors(tensors, hf_state(d), types, permuted=False)


def test_k_quant_rows_not_whole_super_blocks_fall_back(llama_dir, tmp_path, caplog):
    # hidden 64 / intermediate 128: llama.cpp's fallbacks Q4_K -> Q5_0, Q6_K -> Q8_0
    with caplog.at_level("WARNING", logger="qdpo"):
        kv, tensors = read_gguf(export_gguf(llama_dir, tmp_path / "k.gguf", outtype="q4_k_m"))
    assert "are not q4_k_m: their rows are not multiples of 256" in caplog.text  # said
    assert kv["general.file_type"] == 15
    types = {"token_embd.weight": Q.Q5_0, "output.weight": Q.Q8_0, "output_norm.weight": Q.F32}
    for i in range(N_LAYERS):
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            types[f"blk.{i}.{t}.weight"] = Q.Q5_0
        for t in ("attn_v", "ffn_down"):
            types[f"blk.{i}.{t}.weight"] = Q.Q8_0 if i == 1 else Q.Q5_0
        types[f"blk.{i}.attn_norm.weight"] = types[f"blk.{i}.ffn_norm.weight"] = Q.F32
    check_k_tensors(tensors, hf_state(llama_dir), types, permuted=True)


def test_export_format_gguf_q4_k_m_end_to_end(k_llama_dir, tmp_path):
    """`qdpo export --format gguf --outtype q4_k_m` of an adapter: merged, k-quantized, and
    within the Q4_K / Q6_K bounds of peft's own merged model."""
    import shutil

    from qdpo.export import export

    adir = tmp_path / "adapter"
    model = _make_adapter(k_llama_dir, adir)
    for f in k_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, adir / f.name)
    merged = {k: v.detach().float().numpy()
              for k, v in model.merge_and_unload().state_dict().items()}
    out = export(adir, "gguf", tmp_path / "out" / "m.gguf", outtype="q4_k_m")
    kv, tensors = read_gguf(out)
    assert kv["general.file_type"] == 15
    check_k_tensors(tensors, merged, _k_mix("q4_k_m"), permuted=True)
    assert (out.parent / "Modelfile").is_file()

    with pytest.raises(QdpoError, match="merged model"):
        export(adir, "gguf-lora", tmp_path / "a.gguf", outtype="q4_k_m")
    with pytest.raises(QdpoError, match="merged model"):
        export_gguf_lora(adir, tmp_path / "a.gguf", outtype="q6_k")
