"""Config checks and the training settings of the running stage."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence

from ml_collections import ConfigDict

from ilora_jax.errors import UserError, unloadable

STAGES = ("sasrec", "ilora", "pipeline", "evaluate")
DATASETS = ("lastfm", "movielens", "steam", "synthetic")
_TRAIN_KEYS = (
  "epochs",
  "steps",
  "batch_size",
  "lr",
  "weight_decay",
  "grad_accum",
  "log_every_steps",
)
FLOAT32_MAX = 3.4028234663852886e38
GENERATION_METRICS = ("valid_ratio", "hit_ratio@1", "hits_over_total")
SCORING_METRICS = ("hr@1", "hr@5", "ndcg@5", "mrr")


def batch_field(config: ConfigDict, stage: str) -> str:
  """The setting that gives `stage`'s batch size (`stage_train`), for a message."""
  return "train.batch_size" if config.train.batch_size is not None else f"{stage}.train.batch_size"


def lower_lr_advice(stage: str, workdir: str, folders: Sequence[str]) -> str:
  """The way out of a diverged run of `stage` (sasrec or ilora) in `workdir`: a new run at a
  lower learning rate. A resume keeps the run's rate (a setting its checkpoints record, in
  `checkpoints/<folder>` for each of the stage's `folders`: iLoRA's selected weights too),
  and `config.train.lr` sets both stages' (a pipeline's finished SASRec refuses another)."""
  from ilora_jax.files import checkpoint_folder

  kept = [p for n in folders if os.path.isdir(p := checkpoint_folder(workdir, n))]
  rate = (
    f"lower the learning rate (config.{stage}.train.lr; config.train.lr where the command sets it)"
  )
  if not kept:
    return f"{rate} and run again (no checkpoint of the stage was kept)"
  return (
    f"{rate} and train anew: another --workdir, or remove {' and '.join(kept)} (a resume "
    "keeps the run's own)"
  )


def selection_metric(config: ConfigDict) -> str:
  """The val metric `ilora.select_by` names ("auto" resolved; "" = the last step's weights)."""
  name = config.ilora.get("select_by", "")
  if name != "auto":
    return name
  if config.ilora.eval_generate:
    return "hits_over_total"
  return "hr@1" if config.ilora.eval_score else "loss"


def validate(config: ConfigDict) -> None:
  """Checks values a type check cannot; raises UserError naming the field."""
  need = _need
  for field, value in _floats(config):
    need(math.isfinite(value), field, f"={value} must be a finite number")
  need(config.stage in STAGES, "stage", f"={config.stage!r} is not one of {', '.join(STAGES)}")
  need(
    config.data.name in DATASETS,
    "data.name",
    f"={config.data.name!r} is not one of {', '.join(DATASETS)}",
  )
  need(
    config.eval.stage in ("auto", "sasrec", "ilora"),
    "eval.stage",
    f"={config.eval.stage!r} is not auto, sasrec or ilora",
  )
  need(
    config.eval.split in ("train", "val", "test"),
    "eval.split",
    f"={config.eval.split!r} is not train, val or test",
  )
  need(
    config.eval.weights in ("selected", "latest"),
    "eval.weights",
    f"={config.eval.weights!r} is not selected or latest",
  )
  from ilora_jax.data import ARTICLE_RULES

  articles = config.data.get("movielens_articles", "as_is")
  need(articles in ARTICLE_RULES, "data.movielens_articles",
       f"={articles!r} is not one of {', '.join(ARTICLE_RULES)}")  # fmt: skip
  select = config.ilora.select_by
  known = ("", "auto", "loss", *GENERATION_METRICS, *SCORING_METRICS)
  need(select in known, "ilora.select_by",
       f"={select!r} is not one of {', '.join(repr(k) for k in known)}")  # fmt: skip
  need(select not in GENERATION_METRICS or config.ilora.eval_generate, "ilora.select_by",
       f"={select} is a generation metric: it needs ilora.eval_generate=True")  # fmt: skip
  need(select not in SCORING_METRICS or config.ilora.eval_score, "ilora.select_by",
       f"={select} is a scoring metric: it needs ilora.eval_score=True")  # fmt: skip
  from ilora_jax import llama, lora  # The model's own lists of choices (imports jax).
  from ilora_jax import tokenizer as tok_lib

  for field, allowed in (
    ("dtype", ("float32", "bfloat16", "float16")),
    ("param_dtype", ("float32", "bfloat16", "float16")),
    ("attention", ("auto", *llama.ATTENTION_IMPLS)),
    ("remat", llama.REMAT_POLICIES),
    ("bos", tok_lib.BOS_RULES),
  ):
    value = config.llm[field]
    need(value in allowed, f"llm.{field}", f"={value!r} is not one of {', '.join(allowed)}")
  need(
    config.lora.gate in ("router", "uniform", "constant"),
    "lora.gate",
    f"={config.lora.gate!r} is not one of router, uniform, constant",
  )
  need(
    config.router.kind in ("resnet1d", "linear", "mlp"),
    "router.kind",
    f"={config.router.kind!r} is not one of resnet1d, linear, mlp",
  )
  targets = config.lora.targets
  need(
    bool(targets) and all(t in lora.TARGETS for t in targets),
    "lora.targets",
    f"={targets!r} must name projections among {', '.join(lora.TARGETS)}, given as"
    " --config.lora.targets=\"('q', 'v')\"",
  )
  need(config.lora.num_experts >= 1, "lora.num_experts", "must be at least 1")
  need(config.lora.alpha > 0, "lora.alpha", f"={config.lora.alpha} must be positive (the "
       "adapters' scale is alpha / (rank / num_experts): at 0 neither they nor the router get "
       "a gradient)")  # fmt: skip
  need(
    config.lora.rank >= config.lora.num_experts and config.lora.rank % config.lora.num_experts == 0,
    "lora.rank",
    f"={config.lora.rank} must be a multiple of lora.num_experts={config.lora.num_experts}",
  )
  need(
    config.lora.gate != "constant" or config.lora.num_experts == 1,
    "lora.gate",
    "=constant (plain LoRA) needs lora.num_experts=1",
  )
  need(config.llm.attention_chunks >= 1, "llm.attention_chunks", "must be at least 1")
  need(config.data.max_len > 0, "data.max_len", "must be positive")
  need(config.data.num_candidates >= 2, "data.num_candidates", "must be at least 2")
  need(config.data.n_items >= 0, "data.n_items", "must be >= 0 (0 = from the titles)")
  need(config.ilora.prefetch >= 0, "ilora.prefetch", "must be >= 0 (0 = no thread)")
  need(config.ilora.bucket_window >= 1, "ilora.bucket_window", "must be >= 1 (1 = no bucketing)")
  need(config.ilora.pad_multiple >= 1, "ilora.pad_multiple", "must be >= 1")
  need(config.eval.batch_size > 0, "eval.batch_size", "must be positive")
  need(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be positive")
  need(config.checkpoint.max_to_keep > 0, "checkpoint.max_to_keep", "must be positive")
  stop = config.train.stop_after_steps
  need(
    stop is None or 1 <= stop < 2**31, "train.stop_after_steps", f"={stop} must be in [1, 2**31)"
  )
  for field in ("train.seed", "data.candidate_seed", "data.build_seed", "data.synthetic.seed"):
    value = _get(config, field)
    need(0 <= value < 2**32, field, f"={value} must be in [0, 2**32)")
  sas = config.sasrec
  need(sas.hidden >= 1, "sasrec.hidden", f"={sas.hidden} must be positive")
  need(
    sas.num_heads >= 1 and sas.hidden % sas.num_heads == 0,
    "sasrec.num_heads",
    f"={sas.num_heads} must be positive and divide sasrec.hidden={sas.hidden}",
  )
  for field in ("sasrec.dropout", "lora.dropout"):
    value = _get(config, field)
    need(0 <= value < 1, field, f"={value} must be in [0, 1)")
  il = config.ilora
  need(il.eval_rows >= 0, "ilora.eval_rows", f"={il.eval_rows} must be >= 0 (0 = all rows)")
  template = il.get("eval_template", 0)  # A run's saved config of older code may lack it.
  need(template in (-1, 0, 1, 2), "ilora.eval_template",
       f"={template} is not a template (0, 1 or 2) or -1 (one per row)")  # fmt: skip
  need(il.eval_batch_size >= 1, "ilora.eval_batch_size", "must be positive")
  need(il.score_chunk >= 1, "ilora.score_chunk", "must be positive")
  need(il.max_new_tokens >= 1, "ilora.max_new_tokens", "must be positive")
  need(il.max_target_tokens >= 1, "ilora.max_target_tokens", "must be positive")
  for field in ("ilora.max_bad_steps", "sasrec.max_bad_steps"):
    value = _get(config, field)
    need(value >= 1, field, f"={value} must be at least 1")
  need(il.train.clip_norm >= 0, "ilora.train.clip_norm", "must be >= 0 (0 = off)")
  syn = config.data.synthetic
  for field in ("num_items", "num_users", "num_groups", "seq_len"):
    need(syn[field] >= 1, f"data.synthetic.{field}", f"={syn[field]} must be positive")
  need(0 <= syn.noise <= 1, "data.synthetic.noise", f"={syn.noise} must be in [0, 1]")
  if config.data.name == "synthetic":  # Users split 8:1:1: val and test need one each.
    need(syn.num_users >= 10, "data.synthetic.num_users",
         f"={syn.num_users} leaves the val split without users (users are split 8:1:1): "
         "give at least 10")  # fmt: skip
    need(syn.seq_len >= 2, "data.synthetic.seq_len",
         f"={syn.seq_len} leaves no history before a user's last item: give 2 or more")  # fmt: skip
  need(config.data.min_len >= 0, "data.min_len", "must be >= 0")
  validate_distributed(config.distributed)
  from ilora_jax import report  # Its form is checked now, not after training.

  try:
    report.parse_compare(config.report.compare)
  except UserError as exc:
    raise UserError(f"config.report.compare: {exc}") from None
  if config.data.name == "synthetic":
    need(
      config.data.n_items in (0, config.data.synthetic.num_items),
      "data.n_items",
      f"must equal data.synthetic.num_items={config.data.synthetic.num_items}",
    )
    need(not config.data.dir, "data.dir",
         f"={config.data.dir} is not read: data.name=synthetic generates its data; name the "
         "data set in that folder (config.data.name=lastfm, movielens or steam), or leave "
         "data.dir out")  # fmt: skip
  for stage in ("sasrec", "ilora"):  # The stages' own defaults, as config.train.* below.
    for key in _TRAIN_KEYS:
      value = config[stage].train.get(key)
      if value is not None:
        need(_train_value_ok(key, value), f"{stage}.train.{key}", f"={value} is out of range")
  for key in _TRAIN_KEYS:
    value = config.train.get(key)
    if value is not None:
      need(_train_value_ok(key, value), f"train.{key}", f"={value} is out of range")
  if config.stage == "pipeline" and not config.sasrec.init_from:
    sas = stage_train(config, "sasrec")
    length = "steps" if sas.steps is not None else "epochs"
    field = f"train.{length}" if config.train[length] is not None else f"sasrec.train.{length}"
    need(sas[length] is None or sas[length] > 0, field,
         "=0 leaves the pipeline's SASRec untrained, and its ilora stage needs a trained "
         "one: give the SASRec stage a length (config.sasrec.train.epochs; config.train.* "
         "sets both stages') or a trained model (config.sasrec.init_from)")  # fmt: skip


def _train_value_ok(key: str, value) -> bool:
  """Lengths and decay may be 0; sizes and rates must be positive; counts fit in int32 (step
  numbers are int32 on the device), rates and decay in float32 (as the device holds them)."""
  if key in ("epochs", "steps", "batch_size", "grad_accum", "log_every_steps") and value >= 2**31:
    return False
  if key in ("lr", "weight_decay") and not value < FLOAT32_MAX:
    return False
  return value >= 0 if key in ("epochs", "steps", "weight_decay") else value > 0


def _floats(tree, prefix: str = ""):
  """(dotted field, value) for every float in the config, inside tuples and lists too."""
  items = tree.items() if isinstance(tree, (ConfigDict, dict)) else enumerate(tree)
  for key, value in items:
    field = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}".lstrip(".")
    if isinstance(value, float):
      yield field, value
    elif isinstance(value, (ConfigDict, dict, tuple, list)):
      yield from _floats(value, field)


def _need(cond: bool, field: str, msg: str) -> None:
  """Raises a UserError `config.<field>=... msg` (or `config.<field> msg`) unless `cond`."""
  if not cond:
    raise UserError(f"config.{field}{'' if msg.startswith('=') else ' '}{msg}")


def _get(config: ConfigDict, dotted: str):
  for key in dotted.split("."):
    config = config[key]
  return config


def validate_distributed(dc: ConfigDict) -> None:
  """Checks `config.distributed` (called before JAX starts, so it imports nothing of it)."""
  need = _need
  need(dc.timeout_s >= 1, "distributed.timeout_s", f"={dc.timeout_s} must be at least 1 second")
  if dc.coordinator:
    host, _, port = dc.coordinator.rpartition(":")
    need(
      bool(host) and port.isascii() and port.isdigit() and 0 < int(port) < 65536,
      "distributed.coordinator",
      f"={dc.coordinator!r} must be host:port (a port from 1 to 65535)",
    )
    # Process 0 given 1 (the others 2) trained alone, and the others ended in a native abort.
    need(
      dc.num_processes != 1,
      "distributed.num_processes",
      "=1 with distributed.coordinator: one process needs no coordinator (leave it out), and a "
      "run of N processes needs num_processes=N in every one of them",
    )
  need(
    bool(dc.coordinator or dc.auto) or (dc.num_processes, dc.process_id) == (1, 0),
    "distributed.num_processes",
    f"={dc.num_processes} and process_id={dc.process_id} need distributed.coordinator "
    "(host:port of process 0) or distributed.auto=True; without them the run is one process",
  )
  allowed = ("", "gloo", "mpi", "megascale")
  need(
    dc.cpu_collectives in allowed,
    "distributed.cpu_collectives",
    f"={dc.cpu_collectives!r} is not one of gloo, mpi, megascale or ''",
  )


def load(path: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """The config file at `path` with `key=value` overrides applied exactly as the command
  line's `--config.key=value` applies them (the same parsers, so tuples and None fields
  work too), then validated; every failure is a UserError."""
  from ml_collections import config_flags

  config = _parsed(config_flags.DEFINE_config_file, None, overrides, [f"--config={path}"])
  if not isinstance(config, ConfigDict):
    raise unloadable("config", path, config)
  return config


def override(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
  """A copy of `config` with `key=value` overrides applied as `load` applies them."""
  from ml_collections import config_flags

  return _parsed(config_flags.DEFINE_config_dict, copy.deepcopy(config), overrides)


def _parsed(define, default, overrides: Sequence[str], head: Sequence[str] = ()) -> ConfigDict:
  from absl import flags

  from ilora_jax.errors import flag_errors

  argv = ["config", *head, *[f"--config.{o}" for o in overrides]]
  values = flags.FlagValues()
  with flag_errors("config", argv):  # Overrides are applied as the flag is defined.
    define("config", default, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
  if isinstance(values.config, ConfigDict):
    validate(values.config)
  return values.config


def stage_train(config: ConfigDict, stage: str) -> ConfigDict:
  """The stage's training defaults with every `config.train.*` that is set applied on top.

  A length given as `config.train.epochs` alone replaces the stage's own length, steps
  included: `--config.train.epochs=0` evaluates only, whatever `<stage>.train.steps` says.
  """
  merged = ConfigDict(config[stage].train.to_dict())
  for key in _TRAIN_KEYS:
    value = config.train.get(key)
    if value is not None:
      merged[key] = value
  if "steps" not in merged or (config.train.epochs is not None and config.train.steps is None):
    merged.steps = None
  merged.seed = config.train.seed
  return merged


def json_form(config: ConfigDict) -> dict:
  """The config as `save` writes it to config.json (tuples as lists, other values that JSON
  lacks as text), so that a saved config and a loaded one compare equal."""
  import json

  return json.loads(json.dumps(config.to_dict(), default=str))


# Config fields that may differ between the invocations of one run without changing what it
# computes (display, caches, process layout, an early stop after which the run is unfinished
# and resumes): not compared with a run's saved config.json (an experiment grid's runs, a
# workdir without a checkpoint).
VOLATILE = (
  "progress",
  "train.log_every_steps",  # How often training is recorded, not what it computes.
  "sasrec.train.log_every_steps",
  "ilora.train.log_every_steps",
  "compile_cache_dir",
  "distributed",
  "train.stop_after_steps",
  "checkpoint.async_save",
  "checkpoint.max_to_keep",
  "bench",
  "plan",
  # Read by stage=evaluate only, which no grid run is (runs saved before eval.stage's default
  # became auto hold "sasrec").
  "eval.stage",
  "eval.split",
  "eval.weights",
)


def volatile(key: str) -> bool:
  """Whether the dotted config key is one of `VOLATILE` or inside one."""
  return any(key == v or key.startswith(v + ".") for v in VOLATILE)


def flat(tree: dict) -> dict:
  """{"a.b": value} of a nested dict's leaves (config.json's settings by their dotted keys)."""
  from flax import traverse_util

  return traverse_util.flatten_dict(tree, sep=".")


def saved(workdir: str) -> dict | None:
  """The JSON object of `workdir/config.json` (a run's settings, `save`), or None where it is
  absent, unreadable or damaged: for words and defaults drawn from it, and for a check that a
  file it cannot read leaves with nothing to compare (`check_results_kept`)."""
  import json
  import os

  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError, RecursionError):
    return None
  return config if isinstance(config, dict) else None


# The settings a SASRec stage's records depend on (`train.*` overrides the running stage's).
_SASREC_KEYS = ("data.", "sasrec.", "train.")


def check_results_kept(config: ConfigDict, workdir: str) -> None:
  """A SASRec stage that recorded final evaluations without saving a checkpoint (the SASRec
  of `init_from` evaluated with `train.epochs=0`) leaves no checkpoint settings to compare a
  new run's with: a run of other data there replaced those records without a word (an
  audit). A run that evaluates that stage again (`sasrec` or `pipeline`) is refused where
  the settings behind them (`_SASREC_KEYS`, volatile ones aside) differ, naming them, the
  data's first; another stage, or other settings (the iLoRA stage's), run as before."""
  import json

  from ilora_jax import files
  from ilora_jax.metrics import MetricsLog

  recorded = saved(workdir) if config.stage in ("sasrec", "pipeline") else None
  if recorded is None:
    return
  folder = files.checkpoint_folder(workdir, "sasrec")
  if os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder)):
    return  # The stage compares its checkpoint's settings.
  records = MetricsLog(workdir).records()
  if not any(isinstance(r, dict) and r.get("run") == "sasrec" and r.get("final") for r in records):
    return
  old = flat(recorded)
  diffs = []
  for key, value in flat(json_form(config)).items():
    if key not in old or volatile(key) or not key.startswith(_SASREC_KEYS):
      continue
    same_path = isinstance(value, str) and isinstance(old[key], str) and bool(value)
    if old[key] == value or (same_path and os.path.realpath(old[key]) == os.path.realpath(value)):
      continue
    diffs.append(f"{key} {json.dumps(old[key])} (saved) vs {json.dumps(value)} (this run)")
  if diffs:
    diffs.sort(key=lambda line: (not line.startswith("data.name "), not line.startswith("data.")))
    more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    raise UserError(
      f"{workdir} holds the final evaluations of a SASRec with other settings ("
      + "; ".join(diffs[:3])
      + f"{more}) and no checkpoint: give another --workdir, or remove {workdir} to run these "
      "settings there"
    )


def save(config: ConfigDict, workdir: str) -> None:
  """Writes the resolved config to `workdir/config.json` (atomically)."""
  import json
  import os

  from ilora_jax.files import atomic_write

  path = os.path.join(workdir, "config.json")
  try:
    with atomic_write(path) as f:
      json.dump(json_form(config), f, indent=1, sort_keys=True)
  except OSError as exc:
    raise UserError(f"cannot write {path}: {exc}") from None
