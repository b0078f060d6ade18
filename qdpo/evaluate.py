"""Held-out preference metrics of a policy against its reference; `qdpo eval`.

Evaluation runs the same forward as training (forward.py), without gradients and with a
scaled batch plan, so its numbers are the training metrics on unseen pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from qdpo import callable_module, distributed
from qdpo import console as ui
from qdpo.batching import EVAL_SCALE, BatchPlan, plan_batches
from qdpo.data import PairTokens
from qdpo.device import autocast_for, compute_dtype, default_device
from qdpo.forward import MetricAccumulator, forward_pair_batch
from qdpo.logps import causal_lm
from qdpo.losses import Objective
from qdpo.memory import token_budget
from qdpo.reference import ReferenceTable

def evaluate_pairs(model: Any, data: Sequence[PairTokens], objective: Objective, plan: BatchPlan,
             device: torch.device, dtype: torch.dtype,
             reference: ReferenceTable | None = None) -> dict[str, float]:
    """Mean per-pair metrics over `data`; `plan` is already the eval plan (scaled)."""
    return evaluate_pairs_with_margins(model, data, objective, plan, device, dtype, reference)[0]


def evaluate_pairs_with_margins(model: Any, data: Sequence[PairTokens], objective: Objective,
                                plan: BatchPlan, device: torch.device, dtype: torch.dtype,
                                reference: ReferenceTable | None = None,
                                ) -> tuple[dict[str, float], list[float]]:
    """evaluate_pairs, and each pair's reward margin (chosen minus rejected reward) in the
    order of `data`: the spread behind the mean margin, which a mean alone hides (a few pairs
    far off, or most pairs barely above zero). The final eval stores it (eval_margins.json)."""
    acc = MetricAccumulator()
    margins, order = [], []  # device tensors: one host copy at the end, not one per batch
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast_for(device, dtype):
        # with several ranks each evaluates its share, and the sums are added up
        mine = distributed.share(range(len(data)), [p.num_tokens for p in data],
                                 distributed.ranks())
        batches = distributed.lockstep(model, plan.micro_batches(mine, data),
                                       lambda: next(plan.micro_batches([0], data)))
        for batch, real in batches:  # (fillers keep the ranks of sharded weights in step)
            batch.to(device)
            ref = reference.get(batch.pair_ids, device) if reference is not None else None
            pol, ref, out = forward_pair_batch(model, batch, objective, ref)
            if not real:
                continue
            acc.add(pol, ref, out)
            acc.count(pairs=batch.num_pairs)
            margins.append((out.chosen_rewards - out.rejected_rewards).float())
            order.extend(batch.pair_ids)
    model.train(was_training)
    res = acc.result()
    res.setdefault("pairs", 0)
    values = torch.cat(margins).tolist() if margins else []
    by_pair: dict[int, float] = {}  # batches group pairs by length, not in data order
    for part in distributed.gather(dict(zip(order, values))):
        by_pair.update(part)
    return res, [by_pair[i] for i in sorted(by_pair)]


def eval_plan(train_plan: BatchPlan, eval_micro_batch_pairs: int | None) -> BatchPlan:
    """The eval plan: the recipe's eval.micro_batch_pairs, else twice the training batch."""
    return train_plan.scaled(EVAL_SCALE, pairs=eval_micro_batch_pairs)


def evaluate_run(path: str | Path, sources: Sequence[Any], max_pairs: int | None = None,
                 micro_batch_pairs: int | None = None, overrides: Sequence[str] = (),
                 trust_remote_code: bool = False,
                 reference: str | Path | None = None) -> dict[str, float]:
    """A trained run, checkpoint or adapter against its reference on any data (paths, hub ids
    or DataSource): `qdpo eval`, and `qdpo.evaluate(...)` from Python. `overrides`
    (key.sub=value, as for train) change the run's recipe first, e.g. data.columns.prompt=q.

    `reference`: another model as the reference (a base model directory or hub id, a run, an
    adapter), instead of the policy's own weights with the adapter off: what a merged model
    needs (it has no adapter to switch off), or to compare two runs."""
    from qdpo.attention import model_kernel
    from qdpo.data import prepare_sources
    from qdpo.errors import RunDirError
    from qdpo.model import hidden_size, load_trained
    from qdpo.recipe import DataSource, recipe_from_dict
    from qdpo.rundir import open_trained

    distributed.init()  # under torchrun the ranks share the pairs out
    sources = [s if isinstance(s, DataSource) else DataSource(path=str(s)) for s in sources]
    src = open_trained(path, allow_plain=True, trust_remote_code=trust_remote_code)
    if not src.has_adapter and reference is None:
        raise RunDirError(f"'{path}' is a plain model (no adapter), so it has no reference to "
                          "evaluate against: eval measures a trained adapter against its base "
                          "with the adapter off. Pass the run or adapter it came from, or give "
                          "the reference: --reference BASE (the model it was merged from).")
    if overrides:
        raw = src.recipe.to_dict()
        bare = not raw["data"]["train"]  # a bare adapter's recipe names no training data
        if bare:
            raw["data"]["train"] = [{"path": "-"}]
        src.recipe = recipe_from_dict(raw, list(overrides), base_dir=src.recipe.base_dir)
        if bare:
            src.recipe.data.train = []
    _warn_if_training_data(sources, src.recipe)
    device = default_device()
    model, tok = load_trained(src, device)
    recipe = src.recipe
    pairs, report = prepare_sources(sources, recipe, tok)
    if max_pairs:
        pairs = pairs[:max_pairs]
    ui.info(f"eval data: {report.summary()}")
    if src.run is not None:
        _warn_if_trained_on(pairs, src.run.path)
    dtype = compute_dtype(recipe.model.compute_dtype, device)

    def plan_for(m: Any) -> BatchPlan:
        t = recipe.train
        plan = plan_batches(t.layout, model_kernel(m), hidden_size(m), tok.pad_token_id,
                            t.micro_batch_pairs,
                            token_budget(recipe, causal_lm(m).config, device), device)
        return eval_plan(plan, micro_batch_pairs or recipe.eval.micro_batch_pairs)

    table = None
    if reference is not None:
        table = _reference_of(reference, trust_remote_code, pairs, tok, plan_for, device, dtype)
    return evaluate_pairs(model, pairs, Objective.from_config(recipe.loss), plan_for(model),
                          device, dtype, table)


def _reference_of(reference: str | Path, trust_remote_code: bool, pairs: Sequence[PairTokens],
                  tok: Any, plan_for: Any, device: torch.device,
                  dtype: torch.dtype) -> ReferenceTable:
    """The log-probs of `reference` (any model source, its adapter on if it has one) on the
    pairs, computed before the policy is evaluated; the model is freed afterwards."""
    from qdpo.errors import ModelError
    from qdpo.logps import sequence_logps
    from qdpo.model import load_trained
    from qdpo.rundir import open_model_source

    ref_src = open_model_source(reference, trust_remote_code=trust_remote_code)
    ref_model, ref_tok = load_trained(ref_src, device)
    probe = "The quick brown fox, 1234: ünïcödé?"
    if ref_tok.get_vocab() != tok.get_vocab() or ref_tok.encode(probe) != tok.encode(probe):
        raise ModelError(f"--reference '{reference}' has another tokenizer than the model it "
                         "is compared with, so their log-probs of the same text cannot be "
                         "compared. Give the base the model was trained or merged from.")
    ui.info(f"reference: {reference} (its own weights"
            + (", adapter on" if ref_src.has_adapter else "") + ")")
    table = ReferenceTable.empty(len(pairs))
    plan = plan_for(ref_model)
    with torch.no_grad(), autocast_for(device, dtype):
        for batch in plan.micro_batches(range(len(pairs)), pairs):
            table.put(batch.pair_ids, sequence_logps(ref_model, batch.to(device)))
    del ref_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return table.on(device)


def _warn_if_training_data(sources: Sequence[Any], recipe: Any) -> None:
    """Eval data that is the run's own training source (same file or hub id, same split)
    measures memorisation, not preference on unseen pairs: say so."""
    def key(path: str, split: str | None, beside_recipe: bool) -> tuple[str, str]:
        p = Path(recipe.resolve_path(path) if beside_recipe else path).expanduser()
        return (str(p.resolve()) if p.exists() else path, split or "train")

    trained = {key(t.path, t.split, beside_recipe=True) for t in recipe.data.train}
    for s in sources:
        if key(s.path, s.split, beside_recipe=False) in trained:
            ui.warn(f"'{s.path}' (split {s.split or 'train'}) is this run's training data: "
                    "its metrics say how well the model fits pairs it trained on, not how it "
                    "does on unseen ones")


# ---------------------------------------------------------------------------------------
# Which pairs a run trained on, by content: eval data from any file can be checked against it
# ---------------------------------------------------------------------------------------

FINGERPRINTS = "train_pairs.fingerprints"  # 8 bytes per training pair, sorted


def pair_fingerprint(p: PairTokens) -> bytes:
    """The pair's tokens (prompt, chosen, rejected) hashed: the same text through the same
    tokenizer and template gives the same fingerprint, whatever file or format it came from."""
    import hashlib
    from array import array

    ids = array("q", [*p.prompt_ids, -1, *p.chosen_ids, -2, *p.rejected_ids])
    return hashlib.blake2b(ids.tobytes(), digest_size=8).digest()


def write_training_fingerprints(run_dir: Path, pairs: Sequence[PairTokens]) -> None:
    """Record the run's training pairs (a few hundred kB for 60k pairs) for `qdpo eval`."""
    from qdpo.files import write_atomically

    with write_atomically(Path(run_dir) / FINGERPRINTS) as tmp:
        tmp.write_bytes(b"".join(sorted({pair_fingerprint(p) for p in pairs})))


def _warn_if_trained_on(pairs: Sequence[PairTokens], run_dir: Path) -> None:
    """Eval pairs the run trained on (same prompt and responses, from whatever file) measure
    memorisation: say how many."""
    try:
        raw = (Path(run_dir) / FINGERPRINTS).read_bytes()
    except OSError:  # a run of an older qdpo
        return
    trained = {raw[i:i + 8] for i in range(0, len(raw) - len(raw) % 8, 8)}
    n = sum(pair_fingerprint(p) in trained for p in pairs)
    if n:
        ui.warn(f"{n} of {len(pairs)} eval pairs are in this run's training data (same "
                "prompt and responses): their metrics say how well it fits its training data, "
                "not how it does on unseen pairs")


# `qdpo.evaluate(run, data)` calls evaluate_run, though qdpo.evaluate is this module
callable_module(__name__, evaluate_run)
