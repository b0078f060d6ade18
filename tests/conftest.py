"""Test-session set-up: caches in a temporary directory, so every run starts cold and the
user's ~/.cache is never touched."""

from __future__ import annotations

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="qdpo-test-cache-")
os.environ["QDPO_CACHE"] = _CACHE
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------
# Data fixtures: tokenizers built offline (tests/test_data_*.py)
# ---------------------------------------------------------------------------------------

import pytest  # noqa: E402

_QS_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes",
                         "quickstart", "model")


@pytest.fixture(scope="session")
def qs_tok():
    """The quickstart tokenizer: byte-level BPE, ChatML-like template with bos, eos <|im_end|>."""
    from transformers import AutoTokenizer, PretrainedConfig

    # config= skips reading config.json, which would import the Llama model code (seconds);
    # the tokenizer built is the same.
    tok = AutoTokenizer.from_pretrained(_QS_MODEL, config=PretrainedConfig())
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert tok.bos_token == "<|begin_of_text|>"
    return tok


@pytest.fixture(scope="session")
def plain_tok():
    """The same vocabulary, but no chat template (a base model's tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(_QS_MODEL, "tokenizer.json"),
                                  bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>")
    assert not tok.chat_template
    return tok


@pytest.fixture(scope="session")
def bpe_tok():
    """A tiny byte-level BPE built in code, eos '</s>', bos '<s>' prepended, no chat template."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator(["What is the capital of France?", "Paris is the capital.",
                           "I do not know, sorry."] * 4, trainer)
    t.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    assert not tok.chat_template
    return tok


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """.csv / .parquet go through `datasets`: keep its cache in tmp_path, never online."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets.disable_progress_bars()
