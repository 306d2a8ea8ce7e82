r"""How much of an epoch's train steps is padding, in the step order as is and bucketed.

  python bench/padding.py --config=configs/lastfm.py --config.llm.name=tiny \
      --config.data.dir=../shared/data/lastfm \
      --config.sasrec.init_from=../shared/checkpoints/sasrec/lastfm.pt [--steps=N] \
      [--step_s="224=6.73,256=7.80,288=9.22"]

Builds the host batches of the first N optimizer steps of epoch 0 (0 = the whole epoch) twice,
with `ilora.bucket_window=1` (the plain random order) and with the config's window, exactly
as training builds them (templates, forms, candidates, padding), and counts the token slots:
the fraction that holds prompt tokens, the prompt lengths the steps are padded to (each one
a compilation of the train step), and the slot ratio. Only the tokenizer matters, so the
`tiny` LLM preset (SmolLM2's tokenizer) stands for SmolLM2-135M. With `--step_s`, seconds
per step measured at each padded length (`bench/ab_step.py` with `bench.seq_len` variants),
it also gives the epoch's step time both ways and their ratio. With `--eval_split=val` (or
test) it also counts the evaluation batches' prompts (`ilora.eval_batch_size` rows each) in
the split's order and sorted by prompt length (`ilora.eval_sort`, the default), and the
token slots of the candidate titles scoring runs: each padded to its batch's longest (chunked)
and packed end to end per row (`ilora.score_packed`, the default). The last line is one JSON
object.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
from absl import flags
from tqdm import tqdm

from ilora_jax import configuration, errors, scoring, train_ilora
from ilora_jax.errors import UserError

_CONFIG = errors.define_config_file("config", None, "config file (configs/lastfm.py)")
_STEPS = flags.DEFINE_integer("steps", 0, "steps of epoch 0 to build (0 = all)")
_STEP_S = flags.DEFINE_string("step_s", "", "seconds per step by padded length: 'T=s,T=s'")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", "", "also count evaluation batches of this split")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ilora_jax_padding", "workdir (data builds)")


def _tally(masks) -> tuple[list[int], dict]:
  """Of (attention mask, its real rows' mask) pairs, one per batch: each batch's padded
  length, and the fill, token slots and batches per padded length of them all."""
  padded, real, slots = [], 0, 0
  for attention, rows in masks:
    padded.append(int(attention.shape[-1]))
    real += int(rows.sum())
    slots += int(attention.size)
  lengths = {str(t): padded.count(t) for t in sorted(set(padded))}
  return padded, {"filled": real / slots, "slots": slots, "padded_lengths": lengths}


def _step_masks(su, config, order: np.ndarray, steps: int):
  """The attention masks of the first `steps` train steps of `order`, as training builds them."""
  per_step = su.micro * su.accum
  for step in tqdm(range(steps), desc="steps", leave=False):
    idx = order[step * per_step : (step + 1) * per_step]
    batch = train_ilora.train_batch(
      su.parts, config, su.dataset.train, idx, 0, step, su.total_steps, su.seed, su.accum
    )
    yield batch["attention"], batch["attention"]


def _eval_masks(su, config, split, sort: bool):
  """The attention masks of the evaluation prompts of `split`, batched as `Evaluator` does."""
  cfg = config.copy_and_resolve_references()
  cfg.ilora.eval_sort = sort
  ev = train_ilora.Evaluator(su.parts, cfg, split, su.gate_kind)
  for idx, take in tqdm(ev.batch_rows(), desc="eval batches", leave=False):
    attention = ev.prompts(idx).attention
    yield attention, attention[:take]


def _candidate_tally(su, ev) -> dict:
  """The candidate titles the scoring evaluation `ev` (of the config's row order) runs per
  batch: token slots padded to the batch's longest candidate (`ilora.score_packed=False`)
  and packed end to end per row (the default), their fill and lengths per batch."""
  builder = su.parts.builder
  real, slots = 0, {"chunked": 0, "packed": 0}
  lengths = {"chunked": [], "packed": []}
  for idx, take in tqdm(ev.batch_rows(), desc="candidate batches", leave=False):
    tokens = [[builder.target_tokens(int(c)) for c in row] for row in ev.cands[idx]]
    _, mask = scoring.pad_candidates(tokens, builder.pad_id)
    packed = scoring.packed_length(mask)
    real += int(mask[:take].sum())
    slots["chunked"] += mask.size
    slots["packed"] += mask.shape[0] * packed
    lengths["chunked"].append(mask.shape[-1])
    lengths["packed"].append(packed)
  out = {}
  for form in ("chunked", "packed"):
    counts = {str(t): lengths[form].count(t) for t in sorted(set(lengths[form]))}
    out[form] = {"filled": real / slots[form], "slots": slots[form], "lengths": counts}
  out["slot_ratio"] = slots["packed"] / slots["chunked"]
  return out


def _parse_step_s(text: str) -> dict[int, float]:
  """{padded length: seconds per step} of `--step_s`; lengths positive integers, seconds
  positive finite numbers."""
  try:
    pairs = [(int(k), float(v)) for k, v in (p.split("=") for p in text.split(",") if p)]
  except ValueError:
    raise UserError(f"--step_s={text!r}: expected 'length=seconds,...'") from None
  for length, seconds in pairs:
    if length < 1 or not 0 < seconds < math.inf:
      raise UserError(
        f"--step_s: {length}={seconds}: a padded length is a positive integer and its "
        "seconds per step a positive finite number"
      )
  return dict(pairs)


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  configuration.validate(config)  # One line naming a bad field, as ilora_jax.bench.
  try:
    step_s = _parse_step_s(_STEP_S.value)
    from ilora_jax.data import SPLITS

    if _EVAL_SPLIT.value and _EVAL_SPLIT.value not in SPLITS:  # Before the train steps' tally.
      raise UserError(f"--eval_split={_EVAL_SPLIT.value!r} must be one of {', '.join(SPLITS)}")
    if _STEPS.value < 0:  # Before the data and model are built.
      raise UserError(f"--steps={_STEPS.value}: 0 (the whole epoch) or a number of steps >= 1")
    from ilora_jax.data import load_from_config

    dataset = load_from_config(config, _WORKDIR.value)
    if _EVAL_SPLIT.value:  # Its file exists (test may lack one), before the model is built.
      dataset.split(_EVAL_SPLIT.value)
    su = train_ilora.setup(config, _WORKDIR.value, dataset=dataset)
    steps = _STEPS.value or su.steps_per_epoch
    if steps > su.steps_per_epoch:
      raise UserError(
        f"--steps={steps}: 0 (the whole epoch) or 1 to {su.steps_per_epoch}, the steps of epoch 0"
      )
    window = int(config.ilora.bucket_window)
    orders = {
      name: train_ilora.epoch_order(
        su.parts, config, su.dataset.train, 0, su.seed, su.micro * su.accum, w
      )
      for name, w in (("plain", 1), (f"bucketed ({window})", window))
    }
    result = {
      "data": config.data.name,
      "rows_per_step": su.micro * su.accum,
      "steps": steps,
      "window": window,
    }
    for name, o in orders.items():
      padded, row = _tally(_step_masks(su, config, o, steps))
      lengths = row["padded_lengths"]
      missing = sorted(set(padded) - set(step_s))
      if step_s and missing:
        raise UserError(f"--step_s lacks the padded lengths {missing}")
      if step_s:
        row["summed_s"] = sum(step_s[t] for t in padded)
      result[name.split()[0]] = row
      print(
        f"{name:<16} filled {row['filled']:.3f}  steps per padded length {lengths}"
        + (f"  step time summed {row['summed_s']:.0f} s" if step_s else ""),
        file=sys.stderr,
      )
    plain, bucketed = result["plain"], result["bucketed"]
    result["slot_ratio"] = bucketed["slots"] / plain["slots"]
    if step_s:
      result["time_ratio"] = bucketed["summed_s"] / plain["summed_s"]
    print(
      f"bucketed / plain: slots {result['slot_ratio']:.3f}"
      + (f", step time {result['time_ratio']:.3f}" if step_s else ""),
      file=sys.stderr,
    )
    if _EVAL_SPLIT.value:
      split = su.dataset.split(_EVAL_SPLIT.value)
      evaluator = train_ilora.Evaluator(su.parts, config, split, su.gate_kind)
      result["eval"] = {"split": split.name, "batch_size": evaluator.batch_size}
      for name, sort in (("in_order", False), ("sorted", True)):
        _, row = _tally(_eval_masks(su, config, split, sort))
        result["eval"][name] = row
        print(
          f"eval {split.name} {name:<9} filled {row['filled']:.3f}  batches per padded length "
          f"{row['padded_lengths']}",
          file=sys.stderr,
        )
      ev = result["eval"]
      ev["slot_ratio"] = ev["sorted"]["slots"] / ev["in_order"]["slots"]
      print(f"eval sorted / in order: slots {ev['slot_ratio']:.3f}", file=sys.stderr)
      cands = ev["candidates"] = _candidate_tally(su, evaluator)
      print(
        f"eval {split.name} candidates: filled {cands['chunked']['filled']:.3f} chunked "
        f"(lengths {cands['chunked']['lengths']}), {cands['packed']['filled']:.3f} packed "
        f"(lengths {cands['packed']['lengths']}); slots packed / chunked "
        f"{cands['slot_ratio']:.3f}",
        file=sys.stderr,
      )
  except UserError as exc:
    errors.report_and_exit(exc)
  print(json.dumps(result))


if __name__ == "__main__":
  errors.run_script(main, default_config="configs/lastfm.py")
