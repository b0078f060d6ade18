"""Benchmark (not a test): data preparation pairs/s, qdpo vs TRL 1.16 DPOTrainer.

    pip install trl==1.16.0 --no-deps      # TRL's other dependencies are qdpo's too
    python tests/bench_tokenize.py [--pairs 20000] [--num-proc 2]

Both sides start from the same jsonl of conversational pairs (UltraFeedback-like lengths:
prompt ~120 words, responses ~160 words) and the quickstart tokenizer with its chat template,
and stop at token ids: qdpo's `prepare` (read, validate, render, tokenize, truncate; cache off)
against TRL's `DPOTrainer._prepare_dataset` (load_dataset + map tokenize) with the same
number of processes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def make_rows(n: int, seed: int = 0) -> list[dict]:
    from tiny import QUICKSTART

    words = " ".join(json.loads(line)["chosen"][0]["content"] for line in
                     (QUICKSTART / "train.jsonl").read_text().splitlines()).split()
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(k // 2, k * 3 // 2)))

    return [{"prompt": [{"role": "user", "content": text(120)}],
             "chosen": [{"role": "assistant", "content": text(160)}],
             "rejected": [{"role": "assistant", "content": text(160)}]} for _ in range(n)]


def bench_qdpo(path: Path, num_proc: int) -> float:
    from qdpo.data import prepare
    from qdpo.model import load_tokenizer
    from qdpo.recipe import recipe_from_dict
    from tiny import QUICKSTART

    r = recipe_from_dict({"model": {"name_or_path": str(QUICKSTART / "model")},
                          "data": {"train": str(path), "max_length": 2048,
                                   "max_prompt_length": 1024, "num_proc": num_proc}})
    tok = load_tokenizer(r)
    t0 = time.perf_counter()
    d = prepare(r, tok, use_cache=False)
    dt = time.perf_counter() - t0
    return len(d.train) / dt


def bench_trl(path: Path, num_proc: int) -> float:
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    from tiny import QUICKSTART

    datasets.disable_caching()
    tok = AutoTokenizer.from_pretrained(QUICKSTART / "model")
    args = DPOConfig(output_dir=tempfile.mkdtemp(), dataset_num_proc=num_proc if num_proc > 1
                     else None, max_length=2048, report_to=[], use_cpu=True, bf16=False)

    class Shell:  # the attributes _prepare_dataset reads from the trainer
        _tokenizer = tok
        processing_class = tok

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    out = DPOTrainer._prepare_dataset(Shell(), ds, tok, args, "train")
    n = len(out)
    dt = time.perf_counter() - t0
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    path = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(a.pairs)))
    print(f"{a.pairs} conversational pairs, quickstart tokenizer with chat template")
    print(f"{'processes':>9} {'qdpo pairs/s':>13} {'TRL pairs/s':>12} {'speed-up':>9}")
    for n in a.num_proc:
        q = bench_qdpo(path, n)
        try:
            t = bench_trl(path, n)
        except ImportError:
            t = None
        print(f"{n:>9} {q:>13,.0f} {t or float('nan'):>12,.0f} "
              f"{q / t if t else float('nan'):>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
