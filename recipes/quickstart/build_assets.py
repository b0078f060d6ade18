"""Regenerate the quickstart's shipped assets: preference pairs, tokenizer and model config.

The preference is one a person sees at a glance and a tiny random model can learn: the chosen
reply is warm and helpful, the rejected one curt and gloomy, about the same subject. The eval
file uses subjects the training file never mentions, so its reward accuracy measures a learned
preference, not memorised pairs. Run from anywhere: `python recipes/quickstart/build_assets.py`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUBJECTS = [
    "the weather today", "my vegetable garden", "the new library", "our city park",
    "learning the guitar", "a morning run", "the train ride home", "my first painting",
    "the school play", "baking bread", "the autumn fair", "a trip to the coast",
    "my new job", "the science museum", "cooking dinner", "the neighbourhood cafe",
    "a rainy weekend", "the football match", "my old bicycle", "the village market",
    "writing a poem", "the mountain trail", "a birthday party", "the winter holidays",
    "the family dog", "a long flight", "the local bakery", "my chess club",
    "the summer camp", "a picnic by the river", "the town choir", "my reading list",
    "the new phone", "the art class", "a visit to grandma", "the jazz concert",
    "the spring flowers", "my morning coffee", "the office party", "the board game night",
    "a walk in the forest", "the lake house", "my sewing project", "the robot kit",
    "the night sky", "the harbour lights", "my yoga class", "the history lesson",
]
HELD_OUT = SUBJECTS[-10:]
TRAIN_SUBJECTS = SUBJECTS[:-10]

QUESTIONS = [
    "What do you think about {s}?", "Can you tell me something about {s}?",
    "How would you describe {s}?", "Give me your opinion on {s}.",
    "I keep thinking about {s}. Any thoughts?", "Say a few words about {s}.",
]
GOOD_OPEN = ["What a lovely question!", "I would be glad to help.", "Great to hear from you!",
             "Happy to share.", "Thanks for asking!"]
GOOD_BODY = ["{S} sounds wonderful, and it can bring a lot of joy.",
             "{S} is a delightful thing to enjoy with friends.",
             "I think {s} is a bright and cheerful part of the day.",
             "{S} can be a warm, happy and rewarding experience.",
             "There is so much to love about {s}, and it is worth savouring."]
GOOD_CLOSE = ["I hope you have a great time!", "Enjoy every moment of it!",
              "Wishing you a happy day.", "Let me know if I can help more!", ""]
BAD_OPEN = ["Whatever.", "Ugh, fine.", "Not this again.", "Do I have to?", "Meh."]
BAD_BODY = ["{S} is dull and not worth your time.",
            "{S} is boring and usually a waste.",
            "I think {s} is gloomy and tiresome.",
            "{S} will probably go badly, as things do.",
            "Nobody really cares about {s}, honestly."]
BAD_CLOSE = ["Stop asking.", "Leave me alone.", "Go away.", "", "That is all."]


def _fill(t: str, s: str) -> str:
    return t.format(s=s, S=s[0].upper() + s[1:])


def make_pairs(subjects: list[str], n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        s = rng.choice(subjects)
        good = " ".join(x for x in (rng.choice(GOOD_OPEN), _fill(rng.choice(GOOD_BODY), s),
                                    rng.choice(GOOD_CLOSE)) if x)
        bad = " ".join(x for x in (rng.choice(BAD_OPEN), _fill(rng.choice(BAD_BODY), s),
                                   rng.choice(BAD_CLOSE)) if x)
        q = _fill(rng.choice(QUESTIONS), s)
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(texts: list[str], out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|im_end|>", "<|pad|>", "<|im_start|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=768, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|im_end|>", pad_token="<|pad|>",
                                   model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def main() -> None:
    rng = random.Random(1234)
    train = make_pairs(TRAIN_SUBJECTS, 384, rng)
    evalset = make_pairs(HELD_OUT, 64, rng)
    write_jsonl(HERE / "train.jsonl", train)
    write_jsonl(HERE / "eval.jsonl", evalset)
    texts = []
    for r in train + evalset:
        for k in ("prompt", "chosen", "rejected"):
            texts.extend(m["content"] for m in r[k])
    texts += ["user", "assistant", "system", "\n"]
    model_dir = HERE / "model"
    model_dir.mkdir(exist_ok=True)
    vocab = build_tokenizer(texts, model_dir)
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=320,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    cfg.save_pretrained(model_dir)
    print(f"{len(train)} train pairs, {len(evalset)} eval pairs, vocab {vocab}")


if __name__ == "__main__":
    main()
