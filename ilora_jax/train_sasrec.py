"""The `sasrec` stage: train the Flax SASRec, evaluate on val each epoch and on test at the end.

The train step is one `jax.jit` with declared shardings: the batch is split over the
(data, fsdp) mesh axes, the (small) parameters are replicated, and the train state
is donated. Data order and dropout keys are functions of (seed, global step), so a
run restored from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilora_jax import checkpointing, configuration, console, interrupts, report, sharding
from ilora_jax.configuration import stage_train
from ilora_jax.data import Dataset, Split, load_from_config, sample_candidates, split_fingerprint
from ilora_jax.errors import UserError
from ilora_jax.metrics import MetricsLog, ranking_metrics, target_ranks, warn_nonfinite
from ilora_jax.sasrec import SASRec, SASRecConfig, init_params, params_from_torch

STAGE = "sasrec"


def model_config(config, n_items: int) -> SASRecConfig:
  return SASRecConfig(
    n_items=n_items,
    hidden=config.sasrec.hidden,
    max_len=config.data.max_len,
    num_heads=config.sasrec.num_heads,
    dropout=config.sasrec.dropout,
  )


def make_optimizer(lr, weight_decay: float) -> optax.GradientTransformation:
  """Adam with coupled L2, as the original's torch Adam(weight_decay=wd), which adds
  wd * param to the gradient before the moments. `lr` may be a traced scalar (`run_inputs`)."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))


def run_inputs(lr: float, seed: int, mesh) -> dict:
  """The run's settings that the train step reads as inputs, not as constants compiled into
  it: the learning rate and the dropout seed's key. Runs that differ only in them (the seeds
  of an experiment grid, each training its own SASRec) share one compiled step, from JAX's
  persistent cache across processes."""
  with jax.ensure_compile_time_eval():
    key = np.asarray(jax.random.PRNGKey(seed))  # Raw uint32[2].
  return jax.device_put({"lr": np.float32(lr), "key": key}, sharding.replicated(mesh))


def make_train_step(model: SASRec, weight_decay: float):
  """One Adam update on a batch: (state, run, seq, len_seq, next) -> (state, mean loss, ok).
  `run` is `run_inputs`; the dropout key of step s is its key folded with s. A step whose
  loss, updated parameters or Adam moments are not all finite changes nothing but the step count
  (`ok` False): the run's loop stops after `sasrec.max_bad_steps` of them in a row, and no
  checkpoint ever holds NaN weights."""

  def train_step(state, run, seq, len_seq, nxt):
    key = jax.random.fold_in(run["key"], state["step"])

    def loss_fn(p):
      logits = model.apply({"params": p}, seq, len_seq, deterministic=False, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, nxt).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    optimizer = make_optimizer(run["lr"], weight_decay)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = [jnp.isfinite(loss)] + [
      jnp.isfinite(x).all()
      for x in jax.tree.leaves((params, opt_state))
      if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    ok = jnp.stack(finite).all()
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new = {
      "params": keep(params, state["params"]),
      "opt_state": keep(opt_state, state["opt_state"]),
      "step": state["step"] + 1,
    }
    return new, loss, ok

  return train_step


def jit_train_step(step, state, mesh):
  """`step` as one jit: batch split over the mesh's batch axes, state (placed as `state` is)
  donated, the run's inputs, the loss and its flag replicated."""
  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(
    step,
    in_shardings=(state_sh, repl, batch_sh, batch_sh, batch_sh),
    out_shardings=(state_sh, repl, repl),
    donate_argnums=(0,),
  )


@dataclasses.dataclass
class Evaluator:
  """Scores a split's fixed candidates with a jitted, fixed-shape forward."""

  model: SASRec
  split: Split
  candidates: np.ndarray  # [rows, num_candidates]
  target_index: np.ndarray  # [rows]
  batch_size: int
  mesh: Any
  progress: bool

  def __post_init__(self):
    def scores(params, seq, len_seq, cands, nxt):
      logits = self.model.apply({"params": params}, seq, len_seq)  # [batch, n_items]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, nxt)
      return jnp.take_along_axis(logits, cands, axis=1), loss

    self._scores = jax.jit(scores)

  def __call__(self, params) -> dict[str, float]:
    rows, bs = len(self.split), self.batch_size
    all_scores, all_loss = [], []
    for start in console.bar(
      range(0, rows, bs), desc=f"eval {self.split.name}", leave=False, enabled=self.progress
    ):
      idx = np.arange(start, start + bs) % rows  # Pad the last batch by wrapping around.
      s, loss = self._scores(
        params,
        self.split.seq[idx],
        self.split.len_seq[idx],
        self.candidates[idx],
        self.split.next[idx],
      )
      keep = min(bs, rows - start)
      all_scores.append(np.asarray(s)[:keep])
      all_loss.append(np.asarray(loss)[:keep])
    scores = np.concatenate(all_scores)
    out = ranking_metrics(target_ranks(scores, self.target_index))
    out["loss"] = float(np.concatenate(all_loss).mean())
    warn_nonfinite(scores, f"SASRec on {self.split.name}", out,
                   "its weights are broken; retrain it with a lower learning rate")  # fmt: skip
    return out


def make_evaluator(
  config, dataset: Dataset, split_name: str, params_model: SASRec, mesh
) -> Evaluator:
  split = dataset.split(split_name)
  eligible = np.array(sorted(i for i in dataset.titles if 0 <= i < dataset.n_items))
  cands, target = sample_candidates(
    split, dataset.n_items, config.data.num_candidates, config.data.candidate_seed, eligible
  )
  return Evaluator(
    params_model, split, cands, target, config.eval.batch_size, mesh, config.progress
  )


_WEIGHTS = " (weights "


def init_from_setting(path: str, params) -> str:
  """The `init_from` a run records: '' when trained from scratch, else the .pt's path with a
  fingerprint of the weights it holds (`checkpointing.fingerprint`), which alone is compared
  (`same_init_from`): the same weights under another path are the same start."""
  return f"{path}{_WEIGHTS}{checkpointing.fingerprint(params)})" if path else ""


def _init_weights(setting) -> str:
  return str(setting).rpartition(_WEIGHTS)[2].rstrip(")") if setting else ""


def same_init_from(saved, current) -> bool:
  """Whether two `init_from_setting`s name one start: both from scratch, or the same weights."""
  return _init_weights(saved) == _init_weights(current)


def _started(setting) -> str:
  return f"sasrec.init_from={setting}" if setting else "scratch (no sasrec.init_from)"


# Settings recorded only by newer code (`checkpointing.check_same_settings`'s `added`): a
# checkpoint of older code lacks them and resumes as before, recording them no more than it did.
ADDED_SETTINGS = (
  "init_from",
  "train_data",
  "data.num_candidates",
  "data.candidate_seed",
  "val_data",
)
SAME_SETTINGS = {"init_from": same_init_from}


def _init_from_unused(config, directory: str, step: int, what: str) -> None:
  """The warning for a checkpoint of older code, which does not record its start."""
  if config.sasrec.init_from:
    console.info(
      f"warning: config.sasrec.init_from={config.sasrec.init_from} is not used: this workdir "
      f"holds a SASRec ({directory}, step {step}; its checkpoint does not record what it "
      f"started from), which {what}; use a new workdir to start from init_from"
    )


def initial_params(config, cfg: SASRecConfig, seed: int):
  if config.sasrec.init_from:
    if os.path.isdir(config.sasrec.init_from):
      raise UserError(
        f"config.sasrec.init_from={config.sasrec.init_from} is a folder: the sasrec stage "
        "starts from an original .pt file (a workdir is only for the ilora stage)"
      )
    console.info(f"SASRec: loading {config.sasrec.init_from}")
    return params_from_torch(config.sasrec.init_from, cfg)
  # One program, not one per initialiser op (each eager op compiles on its own).
  return jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed))


def _fmt(metrics: dict[str, float]) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


_RECORD_KEYS = ("run", "stage", "split", "step", "final", "skipped")


def _final_records(log: MetricsLog, keep: int, step: int) -> list[dict]:
  """The records of the SASRec training run after its first `keep`, when all are final
  evaluations (or a skipped test) of step `step`; else []."""
  if not log.enabled:
    return []
  tail = [r for r in log.records() if r.get("run") == STAGE][keep:]
  if all(r.get("step") == step and (r.get("final") or "skipped" in r) for r in tail):
    return tail
  return []


def run(config, workdir: str) -> dict[str, float] | None:
  """Trains (or resumes) the SASRec stage; returns the final val metrics, None if stopped early."""
  dataset = load_from_config(config, workdir)
  tc = stage_train(config, STAGE)
  cfg = model_config(config, dataset.n_items)
  mesh = sharding.make_mesh(config.mesh)
  train = dataset.train
  batch = int(tc.batch_size)
  sharding.batch_size_per_shard(mesh, batch, configuration.batch_field(config, STAGE))
  steps_per_epoch = len(train) // batch
  if steps_per_epoch == 0:
    raise UserError(f"the training split has {len(train)} rows, fewer than one batch of {batch}")
  total_steps = int(tc.steps) if tc.steps is not None else int(tc.epochs) * steps_per_epoch
  model = SASRec(cfg)
  optimizer = make_optimizer(tc.lr, tc.weight_decay)
  repl = sharding.replicated(mesh)
  log = MetricsLog(workdir, enabled=jax.process_index() == 0)
  val_eval = make_evaluator(config, dataset, "val", model, mesh)

  state = jax.device_put(new_state(initial_params(config, cfg, tc.seed), optimizer), repl)
  run_in = run_inputs(tc.lr, tc.seed, mesh)
  step_fn = jit_train_step(make_train_step(model, tc.weight_decay), state, mesh)

  settings = checkpointing.jsonable(
    {
      "model": dataclasses.asdict(cfg),
      "data": dataset.name,
      "batch_size": batch,
      "total_steps": total_steps,
      "seed": tc.seed,
      "lr": tc.lr,
      "weight_decay": tc.weight_decay,
      "train_rows": len(train),
      "train_data": split_fingerprint(train),
      # The val records of one run compare epochs on one candidate set, of the same rows.
      "data.num_candidates": config.data.num_candidates,
      "data.candidate_seed": config.data.candidate_seed,
      "val_data": split_fingerprint(dataset.val),
      "init_from": init_from_setting(config.sasrec.init_from, state["params"]),
    }
  )
  ckpt = checkpointing.StageCheckpoints(
    workdir, STAGE, config.checkpoint.max_to_keep, config.checkpoint.async_save
  )
  step, loss_sum, loss_count, skipped, bad_streak = 0, 0.0, 0, 0, 0
  # (step, device loss, device ok flag) not yet added (avoids a host sync per step).
  pending: list[tuple[int, jax.Array, jax.Array]] = []

  def drain() -> None:
    """Adds the pending losses; raises before anything is saved when too many steps in a
    row were skipped (their updates were dropped, so the weights held are the last good)."""
    nonlocal loss_sum, loss_count, skipped, bad_streak
    for at, value, ok in jax.device_get(pending):
      if ok:
        loss_sum += float(value)  # Sequential float64 sum: identical across resumes.
        loss_count += 1
        bad_streak = 0
        continue
      skipped, bad_streak = skipped + 1, bad_streak + 1
      if bad_streak >= config.sasrec.max_bad_steps:
        raise UserError(
          f"SASRec: {bad_streak} steps in a row had a non-finite loss or update (last at step "
          f"{at}; each was skipped); "
          f"{configuration.lower_lr_advice(STAGE, workdir, (STAGE,))}, or check the data"
        )
    pending.clear()

  latest = ckpt.latest_step()
  from ilora_jax import train_ilora

  ilora_begun = train_ilora.has_weights(workdir)
  ilora_started = ilora_begun and config.stage == "pipeline"  # This run's own iLoRA stage.
  finals: list[dict] | None = None  # Those of a finished SASRec a pipeline resumes past.
  if latest is not None:
    saved = ckpt.restore_meta(latest)["settings"]
    try:
      checkpointing.check_same_settings(
        saved,
        settings,
        ckpt.directory,
        dict.fromkeys(ADDED_SETTINGS, checkpointing.UNKNOWN),
        SAME_SETTINGS,
      )
    except UserError as exc:
      ckpt.close()
      if "init_from" in saved and "" in (saved["init_from"], settings["init_from"]):
        if not same_init_from(saved["init_from"], settings["init_from"]):
          raise UserError(f"{exc} (init_from '' is a SASRec trained from scratch)") from None
      raise
    if "init_from" not in saved:
      _init_from_unused(config, ckpt.directory, latest, "this run resumes")
    settings = {k: v for k, v in settings.items() if k in saved or k not in ADDED_SETTINGS}
    state, meta = ckpt.restore(latest, checkpointing.abstract_like(state))
    step, loss_sum, loss_count = int(meta["step"]), float(meta["loss_sum"]), int(meta["loss_count"])
    skipped, bad_streak = int(meta.get("skipped", 0)), int(meta.get("bad_streak", 0))
    keep = meta["metrics_records"]
    # A pipeline resumed past its finished SASRec keeps that stage's final evaluations (the
    # weights are the same; evaluating again would move them after the iLoRA records). Decided
    # from the checkpoints, which every process reads alike.
    if step == total_steps and ilora_started:
      finals = _final_records(log, keep, step)
      keep += len(finals)
    log.truncate(STAGE, keep)
    console.info(f"SASRec: resumed from step {step} of {total_steps}")
  else:
    # No checkpoint: records of this stage are of an attempt killed before its first one, or
    # of an evaluation that trained no step; this run writes its own. But a pipeline whose
    # SASRec trains no step (its init_from as it is) and whose iLoRA stage has begun keeps
    # that SASRec's final records, as a finished one's above.
    keep = 0
    if total_steps == 0 and ilora_started:
      finals = _final_records(log, 0, 0)
      keep = len(finals)
    log.truncate(STAGE, keep)
    if total_steps == 0 and not config.sasrec.init_from:
      console.info(
        "warning: SASRec trains no step and starts from no config.sasrec.init_from: its "
        "evaluations score untrained weights"
      )
  if jax.process_index() == 0 and not ilora_begun:
    # After the check: a refused resume leaves the run's settings. Once an iLoRA stage has
    # begun they are its own (whose check may refuse this config): a pipeline resumed, or
    # `stage=sasrec` run again in its workdir (whose config.json the report and `recommend`
    # read as the iLoRA run's) leaves them.
    configuration.save(config, workdir)  # For `python -m ilora_jax.recommend --workdir=...`.

  def save(at: int) -> None:
    drain()
    meta = {
      "step": at,
      "loss_sum": loss_sum,
      "loss_count": loss_count,
      "skipped": skipped,
      "bad_streak": bad_streak,
      "settings": settings,
      "metrics_records": log.count(STAGE),
    }
    ckpt.save(at, state, meta)

  def record(split: str, metrics: dict, **extra) -> None:
    log.write({"run": STAGE, "stage": STAGE, "split": split, "step": step, **extra, **metrics})

  stop_at = total_steps
  if config.train.stop_after_steps is not None:
    stop_at = min(total_steps, int(config.train.stop_after_steps))
  if latest is None and total_steps > 0:
    console.info(
      f"SASRec: {len(train)} training rows, {steps_per_epoch} steps per epoch, {total_steps} steps"
    )
  bar = console.bar(total=total_steps, initial=step, desc="sasrec train", enabled=config.progress)
  with interrupts.Graceful() as stop, ckpt.guard():
    while step < stop_at:
      epoch, pos = divmod(step, steps_per_epoch)
      order = np.random.default_rng([tc.seed, epoch]).permutation(len(train))
      idx = order[pos * batch : (pos + 1) * batch][sharding.host_slice(batch)]
      arrays = sharding.global_batch(
        mesh, {"seq": train.seq[idx], "len_seq": train.len_seq[idx], "next": train.next[idx]}
      )
      state, loss, ok = step_fn(state, run_in, arrays["seq"], arrays["len_seq"], arrays["next"])
      step += 1
      pending.append((step, loss, ok))
      bar.update(1)
      if step % tc.log_every_steps == 0 or step == total_steps:
        drain()
        mean = loss_sum / loss_count if loss_count else float("nan")
        record("train", {"loss": mean, "skipped_updates": skipped}, epoch=epoch)
        bar.set_postfix(
          loss=f"{mean:.4f}", **({"skipped": skipped} if skipped else {}), refresh=False
        )
        loss_sum, loss_count = 0.0, 0
      epoch_end = step % steps_per_epoch == 0 or step == total_steps
      if epoch_end and step < total_steps:  # The last one is the final evaluation below.
        val = val_eval(state["params"])
        record("val", val, epoch=epoch + 1)
        console.info(f"SASRec step {step} val " + _fmt(val))
      boundary = epoch_end or step % config.checkpoint.every_steps == 0 or step == stop_at
      ckpt.after_step(step, save, boundary, stop, bar)
  bar.close()
  ckpt.close()
  if skipped:
    console.info(
      f"warning: SASRec skipped {skipped} of its {step} updates so far (a non-finite loss or "
      "update; skipped_updates in metrics.jsonl): a new run with a lower "
      "config.sasrec.train.lr may train better"
    )
  if step < total_steps:
    log.settle()  # A resume that stopped at once: its cut written all the same.
    console.info(
      f"SASRec: stopped at step {step} of {total_steps} (train.stop_after_steps); "
      "re-run without it, or with a later step, to resume"
    )
    return None
  if finals is not None:
    log.settle()  # No record follows here: the pipeline's iLoRA stage reads the file.
    console.info(
      f"SASRec: finished at step {step}; its iLoRA stage has begun, so its final evaluations "
      + ("stand in metrics.jsonl" if finals else "are not run again")
    )
    val = [r for r in finals if r["split"] == "val"]
    return {k: v for k, v in val[0].items() if k not in _RECORD_KEYS} if val else {}
  log.hold()  # Written together at the end: see `MetricsLog.hold`.
  final = evaluate_params(config, dataset, model, mesh, state["params"], step, log, run=STAGE)
  log.release()
  if jax.process_index() == 0:
    console.info(f"report: {report.write(workdir)}")
  return final


def evaluate_params(
  config,
  dataset: Dataset,
  model: SASRec,
  mesh,
  params,
  step: int,
  log: MetricsLog,
  run: str,
  splits=("val", "test"),
) -> dict[str, float]:
  """Final evaluation on `splits`; a missing test file is reported as skipped."""
  result: dict[str, float] = {}
  for split in splits:
    if split == "test" and dataset.test is None:
      console.info(f"test evaluation skipped: {dataset.test_missing_reason}")
      log.write(
        {
          "run": run,
          "stage": STAGE,
          "split": "test",
          "step": step,
          "skipped": dataset.test_missing_reason,
        }
      )
      continue
    metrics = make_evaluator(config, dataset, split, model, mesh)(params)
    console.result(f"sasrec {split} step {step}: " + _fmt(metrics))  # Before the record.
    log.write({"run": run, "stage": STAGE, "split": split, "step": step, "final": True, **metrics})
    if split == "val":
      result = metrics
  return result


def new_state(params, optimizer) -> dict:
  """The SASRec stage's state: what a checkpoint holds."""
  return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def restore_target(cfg: SASRecConfig, placement) -> dict:
  """What a SASRec checkpoint holds (params, optimizer state, step) as shapes placed by
  `placement`, for `StageCheckpoints.restore`. Shapes only (`jax.eval_shape`): no weights
  are initialised to be overwritten."""
  optimizer = make_optimizer(1e-3, 0.0)  # The state's structure does not depend on the rates.
  shapes = jax.eval_shape(
    lambda k: new_state(init_params(cfg, k), optimizer), jax.random.PRNGKey(0)
  )
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placement), shapes)


def check_trained_as(ckpt: checkpointing.StageCheckpoints, step: int, cfg: SASRecConfig) -> dict:
  """The metadata of SASRec checkpoint `step`; a UserError naming each model setting it was
  trained with that differs from `cfg` (the dropout rate aside: evaluated or frozen, the
  model runs without dropout, so any rate fits its weights)."""
  meta = ckpt.restore_meta(step)
  trained = meta["settings"]["model"]
  current = checkpointing.jsonable(dataclasses.asdict(cfg))
  current.pop("dropout")
  diffs = checkpointing.setting_diffs(trained, current, current)
  if diffs:
    ckpt.close()
    keys = [_CONFIG_KEYS.get(k, f"config.sasrec.{k}") for k in current
            if k in trained and trained[k] != current[k]]  # fmt: skip
    settable = [k for k in keys if k.startswith("config.")]
    advice = [f"set {', '.join(settable)} as it was trained"] if settable else []
    if len(settable) < len(keys):
      advice.append("use the data set it was trained on (its item count)")
    raise UserError(
      f"the SASRec in {ckpt.directory} was trained with other settings ({'; '.join(diffs)}); "
      + "; ".join(advice)
    )
  return meta


# The config key of each model setting (`SASRecConfig`) a checkpoint records.
_CONFIG_KEYS = {"max_len": "config.data.max_len", "n_items": "n_items"}


def other_training_data(meta: dict, dataset: Dataset, directory: str) -> str | None:
  """Why the SASRec of checkpoint `meta` was trained on other rows than `dataset`'s training
  split (`split_fingerprint`), or None: the same rows, or a checkpoint of older code, which
  records no fingerprint."""
  trained_on, mine = meta["settings"].get("train_data"), split_fingerprint(dataset.train)
  if trained_on is None or trained_on == mine:
    return None
  return (
    f"the SASRec in {directory} was trained on other data: its training data differs from "
    f"this config's ({dataset.name}, {len(dataset.train)} training rows; fingerprint "
    f"{mine} vs the model's {trained_on})"
  )


def check_trained_on(config, meta: dict, dataset: Dataset, directory: str) -> None:
  """A UserError when the SASRec of checkpoint `meta` was trained on other rows than the
  config's training split (`split_fingerprint`; a checkpoint of older code records no
  fingerprint and is not compared), or from another `sasrec.init_from` than the config gives
  (none given: the workdir's SASRec, whatever it started from; a checkpoint of older code
  records no start, so init_from then only warns that it is not used)."""
  settings = meta["settings"]
  other = other_training_data(meta, dataset, directory)
  if other:
    raise UserError(f"{other}; evaluate it with config.data.* as it was trained")
  if "init_from" not in settings:
    _init_from_unused(config, directory, int(meta["step"]), "this evaluates")
    return
  if not config.sasrec.init_from:
    return
  cfg = model_config(config, dataset.n_items)
  given = init_from_setting(config.sasrec.init_from, initial_params(config, cfg, 0))
  if not same_init_from(settings["init_from"], given):
    raise UserError(
      f"the SASRec in {directory} was trained from {_started(settings['init_from'])}, not "
      f"from this config's {_started(given)}: an evaluation scores the workdir's SASRec; drop "
      "--config.sasrec.init_from (or give the run's), or score that .pt in a new workdir "
      "with --config.stage=sasrec --config.train.epochs=0"
    )


def evaluate(config, workdir: str) -> dict[str, float]:
  """The `evaluate` stage for SASRec: restore the latest checkpoint and score `eval.split`."""
  dataset = load_from_config(config, workdir)
  dataset.split(config.eval.split)  # Asked for by name: a missing test split is an error.
  cfg = model_config(config, dataset.n_items)
  mesh = sharding.make_mesh(config.mesh)
  ckpt = checkpointing.StageCheckpoints(
    workdir, STAGE, config.checkpoint.max_to_keep, False, read_only=True
  )
  latest = ckpt.latest_step()
  if latest is None:
    from ilora_jax import train_ilora

    if train_ilora.has_weights(workdir):  # An iLoRA run on a SASRec of elsewhere.
      raise UserError(
        f"no sasrec checkpoint in {ckpt.directory}, but an ilora one: evaluate it with "
        "--config.eval.stage=ilora (or auto; to score an original .pt, "
        "run --config.stage=sasrec with --config.train.epochs=0 and --config.sasrec.init_from)"
      )
    raise UserError(
      f"no sasrec checkpoint in {ckpt.directory}: run --config.stage=sasrec first (to score an "
      "original .pt, that stage with --config.train.epochs=0 and --config.sasrec.init_from "
      "evaluates it directly and saves no checkpoint)"
    )
  meta = check_trained_as(ckpt, latest, cfg)
  try:
    check_trained_on(config, meta, dataset, ckpt.directory)
  except UserError:
    ckpt.close()
    raise
  total = meta["settings"].get("total_steps")
  if total is not None and latest < int(total):  # As the iLoRA stage's evaluation says.
    console.info(
      f"SASRec: evaluating the latest checkpoint, step {latest} (an unfinished run: trained "
      f"{latest} of {int(total)} steps)"
    )
  restored, _ = ckpt.restore(latest, restore_target(cfg, sharding.replicated(mesh)))
  ckpt.close()
  log = MetricsLog(workdir, jax.process_index() == 0, MetricsLog.EVALUATION)
  metrics = evaluate_params(
    config,
    dataset,
    SASRec(cfg),
    mesh,
    restored["params"],
    latest,
    log,
    run="evaluate",
    splits=(config.eval.split,),
  )
  if jax.process_index() == 0:
    compare = report.run_compare(workdir, config.report.compare)  # The run's comparison kept.
    console.info(f"report: {report.write(workdir, compare)}")  # With the new record.
  return metrics
