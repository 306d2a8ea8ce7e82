"""Paired timing of a split's evaluation in the split's row order and sorted by prompt length.

  python bench/eval_order.py --config=configs/lastfm.py --config.llm.name=smollm2-135m \
      --config.llm.dtype=float32 --config.llm.param_dtype=float32 \
      --config.data.dir=../shared/data/lastfm \
      --config.sasrec.init_from=../shared/checkpoints/sasrec/lastfm.pt \
      [--split=val] [--mode=both|score|generate] [--rounds=2]

Builds two evaluators of the same rows and candidates, `ilora.eval_sort=False` and `True`
(the default), with the run's fresh adapters (B = 0, so the base model's outputs), and runs
the whole evaluation of the split (`ilora.eval_rows` rows, in `ilora.eval_batch_size`
batches; generation and/or candidate scoring, and the target loss) in alternation: one
untimed pass of each first (it compiles every padded length), then `rounds` timed passes of
each. Prints every pass's seconds per part (prepare, loss, score, generate) and, as its last
line, one JSON object with the pass times, the per-round ratios sorted / in order, and both
orders' metrics (the same up to float rounding).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from ilora_jax import errors, train_ilora
from ilora_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lastfm.py")
_SPLIT = flags.DEFINE_string("split", "val", "split to evaluate (val or test)")
_MODE = flags.DEFINE_enum("mode", "both", ["both", "score", "generate"], "evaluation modes")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "timed passes of each order")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ilora_jax_eval_order", "workdir (data builds)")

ORDERS = (("in_order", False), ("sorted", True))


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  mode = _MODE.value
  try:
    if _ROUNDS.value < 1:
      raise UserError(f"--rounds={_ROUNDS.value}: must be >= 1")
    su = train_ilora.setup(config, _WORKDIR.value)
    split = su.dataset.split(_SPLIT.value)
    evaluators = {}
    for name, sort in ORDERS:
      cfg = config.copy_and_resolve_references()
      cfg.ilora.eval_sort, cfg.ilora.eval_base = sort, False
      cfg.ilora.eval_generate = mode in ("both", "generate")
      cfg.ilora.eval_score = mode in ("both", "score")
      evaluators[name] = train_ilora.Evaluator(su.parts, cfg, split, su.gate_kind, su.mesh)
    st = su.state
    seconds = {name: [] for name, _ in ORDERS}
    metrics = {}
    for round_ in range(_ROUNDS.value + 1):
      for name, ev in evaluators.items():
        t0 = time.perf_counter()
        metrics[name] = ev(st["trainable"], st["stats"], su.frozen, config.progress)
        took = time.perf_counter() - t0
        parts = " ".join(f"{k} {v:.1f}" for k, v in sorted(ev.timings.items()))
        label = "compile pass" if round_ == 0 else f"round {round_}"
        print(f"{label:<13} {name:<9} {took:7.1f} s  ({parts})", file=sys.stderr, flush=True)
        if round_:
          seconds[name].append(took)
  except UserError as exc:
    errors.report_and_exit(exc)
  ratios = [s / o for o, s in zip(seconds["in_order"], seconds["sorted"])]
  result = {
    "device": jax.devices()[0].device_kind,
    "data": config.data.name,
    "split": split.name,
    "rows": len(evaluators["sorted"].idx),
    "batch_size": int(config.ilora.eval_batch_size),
    "mode": mode,
    "seconds": seconds,
    "ratios": ratios,
    "median_ratio": statistics.median(ratios),
    "metrics": metrics,
  }
  print(f"sorted / in order: median ratio {result['median_ratio']:.3f}", file=sys.stderr)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
