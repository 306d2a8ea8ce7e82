r"""Paired timing of evaluation variants of a split in one process.

  python bench/ab_eval.py --config=configs/lastfm.py --config.llm.name=smollm2-135m \
      --config.llm.dtype=float32 --config.llm.param_dtype=float32 \
      --config.data.dir=../shared/data/lastfm \
      --config.sasrec.init_from=../shared/checkpoints/sasrec/lastfm.pt \
      --variants="ilora.eval_sort=False;ilora.eval_sort=True" [--split=val] [--rounds=2]

Each variant is a space-separated list of `key=value` overrides of the settings each
evaluator reads (`ilora_jax.bench.EVAL_VARIANT_KEYS`: ilora.eval_batch_size, eval_generate,
eval_score, eval_shared_prefill, eval_sort, score_packed, score_chunk, max_new_tokens, and
`llm.unroll_decode`: the decode loop through the same weights), parsed as the command line's
`--config.key=value`, on top of --config; an empty variant is that config itself. Any other
key is refused: the rows (`ilora.eval_rows`), the shared parts (`ilora.max_target_tokens`)
and training's settings are the same for every variant (set them with --config.KEY=VALUE).
The data, the model and the run's fresh adapters (B = 0, so the base model's outputs) are
built once and shared, and every variant is an evaluator of the same rows and candidates:
the whole evaluation of the split (`ilora.eval_rows` rows in `ilora.eval_batch_size` batches;
generation and/or candidate scoring, and the target loss, as training's val evaluation runs
it). One untimed pass of each variant first (it compiles every
padded length), then `rounds` timed passes of each in alternation, so a shared machine's drift
hits them alike. Prints every pass's seconds per part (prepare, loss, score, generate,
generate+score) and, as its last line, one JSON object with each variant's pass times, its
per-round ratios to the first variant and their median, its rows, its metrics, and the
largest relative difference of any metric from the first variant's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import sys
import time

import jax
from absl import flags

from ilora_jax import bench, configuration, errors, train_ilora
from ilora_jax.errors import UserError

_CONFIG = errors.define_config_file("config", None, "config file (configs/lastfm.py)")
_VARIANTS = flags.DEFINE_string("variants", None, "';'-separated variants of 'ilora.key=value ...'")
_SPLIT = flags.DEFINE_string("split", "val", "split to evaluate (val or test)")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "timed passes of each variant")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ilora_jax_ab_eval", "workdir (data builds)")


def _parts_for(parts: train_ilora.Parts, cfg) -> train_ilora.Parts:
  """`parts` with a shallow copy of its model when `cfg` decodes otherwise (same params)."""
  unroll = bool(cfg.llm.unroll_decode)
  if parts.model.unroll_decode == unroll:
    return parts
  model = copy.copy(parts.model)
  model.unroll_decode = unroll
  return dataclasses.replace(parts, model=model)


def _largest_difference(metrics: dict, first: dict) -> float:
  """The largest relative difference of a metric from the first variant's (abs below 1e-6)."""
  worst = 0.0
  for key in first.keys() & metrics.keys():
    diff = abs(metrics[key] - first[key])
    worst = max(worst, 0.0 if diff < 1e-6 else diff / max(abs(first[key]), 1e-12))
  return worst


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  if _ROUNDS.value < 1:
    raise UserError(f"--rounds={_ROUNDS.value}: must be >= 1")
  from ilora_jax.data import SPLITS

  if _SPLIT.value not in SPLITS:
    raise UserError(f"--split={_SPLIT.value!r} must be one of {', '.join(SPLITS)}")
  variants = bench.parse_variants(_VARIANTS.value, "ilora.eval_sort=False;")
  bench.check_eval_variants(variants)  # Before the data and model are built.
  cfgs = [configuration.override(config, items) for _, items in variants]
  su = train_ilora.setup(config, _WORKDIR.value, trains=False)
  split = su.dataset.split(_SPLIT.value)
  names = [name for name, _ in variants]
  evaluators = []
  for cfg in cfgs:
    parts = _parts_for(su.parts, cfg)
    evaluators.append(train_ilora.Evaluator(parts, cfg, split, su.gate_kind, su.mesh))
  # Every variant evaluates the same rows and candidates (`check_eval_variants`).
  if len({(len(ev.idx), ev.fingerprint) for ev in evaluators}) != 1:
    raise UserError("the variants evaluate different rows or candidates: not comparable")
  st = su.state
  seconds = [[] for _ in names]
  metrics = [{} for _ in names]
  for round_ in range(_ROUNDS.value + 1):
    for k, (name, ev) in enumerate(zip(names, evaluators)):
      t0 = time.perf_counter()
      metrics[k] = ev(st["trainable"], st["stats"], su.frozen, config.progress)
      took = time.perf_counter() - t0
      parts = " ".join(f"{p} {v:.1f}" for p, v in sorted(ev.timings.items()))
      label = "compile pass" if round_ == 0 else f"round {round_}"
      print(f"{label:<13} {name:<36} {took:7.1f} s  ({parts})", file=sys.stderr, flush=True)
      if round_:
        seconds[k].append(took)
  result = {
    "device": jax.devices()[0].device_kind,
    "data": config.data.name,
    "split": split.name,
    "rows": len(evaluators[0].idx),
    "rounds": _ROUNDS.value,
    "variants": [],
  }
  print(f"{'variant':<44}{'median s':>10}{'ratio':>8}{'metrics':>10}", file=sys.stderr)
  for name, secs, mets, ev in zip(names, seconds, metrics, evaluators):
    ratios = [a / b for a, b in zip(secs, seconds[0])]
    row = {
      "variant": name,
      "rows": len(ev.idx),
      "candidates": ev.fingerprint,
      "batch_size": ev.batch_size,  # Cut to the rows evaluated where it is more.
      "seconds": secs,
      "median_s": statistics.median(secs),
      "ratios": ratios,
      "median_ratio": statistics.median(ratios),
      "metrics": mets,
      "metrics_rel_diff": _largest_difference(mets, metrics[0]),
    }
    result["variants"].append(row)
    print(
      f"{name:<44}{row['median_s']:>10.1f}{row['median_ratio']:>8.3f}"
      f"{row['metrics_rel_diff']:>10.1e}",
      file=sys.stderr,
    )
  print(json.dumps(result))


if __name__ == "__main__":
  errors.run_script(main, default_config="configs/lastfm.py")
