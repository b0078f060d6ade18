"""What the policy now says: `eval.sample_prompts` answered at every evaluation.

The base model (adapters off) answers once, at the start; the policy answers at every eval,
greedily and briefly, with the run's own chat format. Each answer is a line of the run's
`samples.jsonl` ({step, prompt, response, base_response}), so curves can be read beside what
the model actually says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qdpo import console as ui
from qdpo.recipe import Recipe

SAMPLES_FILE = "samples.jsonl"


def sample_prompts(recipe: Recipe) -> list[Any]:
    """eval.sample_prompts as conversations: inline texts, or files of prompts (.jsonl rows
    with a prompt or messages, as `qdpo generate` reads them; .txt one prompt per line)."""
    from qdpo.chat import read_prompts

    prompts: list[Any] = []
    for entry in recipe.eval.sample_prompts:
        path = Path(recipe.resolve_path(entry))
        if path.suffix in (".jsonl", ".txt") and path.is_file():
            if path.suffix == ".jsonl":
                prompts.extend(read_prompts(path))
            else:
                prompts.extend([{"role": "user", "content": line.strip()}]
                               for line in path.read_text(encoding="utf-8").splitlines()
                               if line.strip())
        else:
            prompts.append([{"role": "user", "content": entry}])
    return prompts


class Samples:
    """Answers to the sample prompts, appended to samples.jsonl at each evaluation."""

    def __init__(self, recipe: Recipe, model: Any, tokenizer: Any, run_dir: Path,
                 answer: bool = True):
        """`answer` False (ranks other than 0 of a distributed run): the prompts are known,
        nothing is generated or written."""
        from qdpo.chat import Generator, Sampling

        self.prompts = sample_prompts(recipe)
        self.path = run_dir / SAMPLES_FILE
        self.gen = Generator(model, tokenizer, recipe) if self.prompts and answer else None
        self.sampling = Sampling(max_new_tokens=recipe.eval.sample_max_new_tokens,
                                 temperature=0.0)
        self.base: list[str | None] = [None] * len(self.prompts)
        if self.gen is not None and self.gen.has_adapter:
            self.base = list(self._answer(base=True))

    def _answer(self, base: bool) -> list[str]:
        was_training = self.gen.model.training
        try:
            # compiled decoder layers (train.compile) are for training shapes: a growing KV
            # cache would recompile them at every new length
            with torch.compiler.set_stance("force_eager"):
                return self.gen.generate(self.prompts, self.sampling, base=base)
        finally:
            self.gen.model.train(was_training)

    def record(self, step: int) -> str | None:
        """The policy's answers at `step`, written down; the first one, for the display."""
        if self.gen is None:
            return None
        answers = self._answer(base=False)
        with self.path.open("a", encoding="utf-8") as f:
            for conv, answer, base in zip(self.prompts, answers, self.base):
                f.write(json.dumps({"step": step, "prompt": conv, "response": answer,
                                    "base_response": base}, ensure_ascii=False) + "\n")
        first = answers[0].replace("\n", " ")
        return f"sample @ step {step}: {first[:100]}" + ("..." if len(first) > 100 else "")

    def truncate(self, step: int) -> None:
        """Drop answers recorded after `step` (and damaged lines, as the metrics log does):
        a resumed run answers those steps again."""
        if self.gen is None or not self.path.exists():
            return
        from qdpo.files import write_text_atomically
        from qdpo.rundir import metric_lines

        keep, _ = metric_lines(self.path.read_bytes(), step)
        write_text_atomically(self.path, "".join(x + "\n" for x in keep))


def announce(samples: Samples) -> None:
    if samples.prompts:
        ui.info(f"samples: {len(samples.prompts)} prompt(s) answered at every evaluation, in "
                f"{samples.path}")
