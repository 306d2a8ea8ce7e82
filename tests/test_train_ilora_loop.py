"""The iLoRA training loop (`train_ilora.run`) and the `evaluate` stage, on a stand-in model.

`setup`, the jitted step and the `Evaluator` are replaced by stubs: each step adds 1 to every
trainable weight (so the weights tell the step they are of), its loss is scripted per step, and
the val metric is scripted per set of weights. Checkpoints (Orbax), metrics.jsonl, the
prefetching and the interrupt guard are the real ones: the tests check what the loop records,
saves, selects, restores and prints against values worked out by hand, in seconds.
"""

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, complete_steps, metrics_records

from ilora_jax import checkpointing, configuration, interrupts, train_ilora
from ilora_jax.errors import UserError

SPLITS = ("val", "test")


class Fake:
  """The stand-ins' script and what they saw."""

  def __init__(self):
    self.steps_per_epoch = 2
    self.total_steps = 6
    self.settings = {"llm": "tiny", "lora": {"rank": 4}, "seed": 0, "ilora.bucket_window": 16}
    self.test = True  # Whether the data has a test split.
    # Val metric of the weights of each step (hits_over_total; loss and hr@1 beside it).
    self.val = {2: 0.5, 4: 0.9, 6: 0.7}
    self.loss = {}  # Training loss of each step (default: the step's number).
    self.skipped = {}  # The run's skipped updates so far, after each step (default 0).
    self.finite = {}  # Whether each step's update was applied (default: its loss is finite).
    self.setups = 0
    self.batches = []  # (epoch, step, rows) of every train batch built.
    self.calls = []  # (split, step of the weights, baselines) of every evaluation.
    self.gate_tables = []  # Step of the weights each gate table was made of.
    self.signal_in_val = []  # Steps whose weights' next val gets SIGTERM before its batch 0.

  def metrics(self, split: str, at: int) -> dict:
    if split == "test":
      return {"hits_over_total": at / 100, "hr@1": at / 1000, "loss": float(at)}
    value = float(self.val.get(at, 0.0))
    return {"hits_over_total": value, "hr@1": value / 2, "loss": 1.0 - value}


def _weights_step(trainable) -> int:
  return int(np.asarray(trainable["lora"])[0])


@pytest.fixture
def fake(monkeypatch):
  f = Fake()

  def setup(config, workdir, check=None, dataset=None, trains=True):
    f.setups += 1
    f.trains = trains
    settings = {**f.settings, "total_steps": f.total_steps}
    if check is not None:
      check(settings, {"ilora.bucket_window": 16})
    trainable = {"lora": jnp.zeros(3), "router": jnp.zeros(2)}
    state = {"trainable": trainable, "stats": {"s": jnp.zeros(1)},
             "opt_state": {"m": jnp.zeros(3)}, "step": jnp.zeros((), jnp.int32)}  # fmt: skip
    splits = {"val": "val", "test": "test" if f.test else None}
    data = types.SimpleNamespace(train=np.arange(40), test_missing_reason="no test file",
                                 split=lambda name: name, **splits)  # fmt: skip
    return train_ilora.Setup(data, None, {"llm": {"w": np.zeros(1000)}}, state, None, None,
                             2, 2, f.steps_per_epoch, f.total_steps, 0, 1e-3, "router",
                             settings)  # fmt: skip

  def load_from_config(config, workdir):  # The config's data, without its test split.
    data = load(config, workdir)
    return (
      data if f.test else dataclasses.replace(data, test=None, test_missing_reason="no test file")
    )

  def step_fn(state, frozen, batch):
    at = int(state["step"]) + 1
    new = {**state, "trainable": jax.tree.map(lambda x: x + 1, state["trainable"]),
           "step": state["step"] + 1}  # fmt: skip
    loss = f.loss.get(at, float(at))
    metrics = {"loss": loss, "grad_norm": 2.0 * at, "gate_entropy": 0.5,
               "skipped": f.skipped.get(at, 0), "gate_mean": np.array([0.25, 0.75]),
               "finite": f.finite.get(at, np.isfinite(loss))}  # fmt: skip
    return new, metrics

  def jit_train_step(su, step=None):
    return step_fn, jax.sharding.SingleDeviceSharding(jax.devices()[0])

  class Evaluator:
    def __init__(self, parts, config, split, gate_kind, mesh):
      self.split = getattr(split, "name", split)  # The data's Split, or the fake's name.
      self.fingerprint = f"fp-{self.split}"
      self.idx, self.rows = np.arange(1), []  # The rows it scores: one.

    def __call__(self, trainable, stats, frozen, progress, baselines=False, stop=None):
      at = _weights_step(trainable)
      if at in f.signal_in_val:
        f.signal_in_val.remove(at)
        signal.raise_signal(signal.SIGTERM)
      if stop is not None and stop(0):  # As the evaluator asks before each batch.
        raise train_ilora.EvalStopped
      f.calls.append((self.split, at, baselines))
      self.rows = [{"row": 0, "weights": at}]
      return f.metrics(self.split, at)

  def train_batch(parts, config, train, mine, epoch, at, total_steps, seed, accum):
    f.batches.append((epoch, at, [int(x) for x in mine]))
    return {"input_ids": np.zeros((accum, 2, 4), np.int32)}

  monkeypatch.setattr(train_ilora, "setup", setup)
  load = train_ilora.load_from_config
  monkeypatch.setattr(train_ilora, "load_from_config", load_from_config)
  monkeypatch.setattr(train_ilora, "jit_train_step", jit_train_step)
  monkeypatch.setattr(train_ilora, "Evaluator", Evaluator)
  order = lambda parts, config, train, epoch, *a: np.arange(40) + 100 * epoch  # noqa: E731
  monkeypatch.setattr(train_ilora, "epoch_order", order)
  monkeypatch.setattr(train_ilora, "train_batch", train_batch)
  monkeypatch.setattr(train_ilora, "agree_length", lambda host, parts: host)

  def save_gate_table(parts, trainable, *args):
    f.gate_tables.append(_weights_step(trainable))

  monkeypatch.setattr(train_ilora, "save_gate_table", save_gate_table)
  monkeypatch.setattr(train_ilora.report, "write", lambda workdir, compare: "report.md")
  return f


def _config(*overrides):
  return configuration.load(
    os.path.join(ROOT, "configs", "tiny.py"),
    ["stage=ilora", "checkpoint.max_to_keep=10", "ilora.prefetch=0", *overrides],
  )


def _printed(out: str) -> list[str]:
  return [line for line in out.splitlines() if line.startswith("ilora ")]


def _val(split_metrics: dict, at: int, epoch: int) -> dict:
  return {"run": "ilora", "stage": "ilora", "split": "val", "step": at, "epoch": epoch,
          "candidates": "fp-val", **split_metrics}  # fmt: skip


# ----------------------------------------------------------------------------- selection


def test_a_tie_keeps_the_earlier_weights_and_says_so(fake, tmp_path, capsys):
  """Val 0 at every epoch (a short run whose answers are never valid): the first epoch's
  weights are kept (`better`: a tie keeps the earlier weights), and the line says it was a
  tie (it called them "the best of the epochs" and nothing more)."""
  fake.val = {2: 0.0, 4: 0.0, 6: 0.0}
  train_ilora.run(_config(), str(tmp_path))
  said = ("use the weights of step 2 (val hits_over_total 0.0000, the best of the epochs; "
          "step 6: 0.0000, a tie, which keeps the earlier weights")  # fmt: skip
  assert said in capsys.readouterr().err


def test_an_earlier_epochs_weights_are_selected_recorded_restored_and_printed(
  fake, tmp_path, capsys
):
  """Val by weights: step 2 0.5, step 4 0.9, step 6 (the last) 0.7: step 4's weights are kept
  in ilora_best, and the final val and test evaluations, the predictions, the gate table and
  the returned metrics are of them; step 6's val is an ordinary epoch record (epoch 3)."""
  workdir = str(tmp_path)
  result = train_ilora.run(_config(), workdir)
  m = fake.metrics
  assert result == m("val", 4)
  records = metrics_records(workdir)
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert [r for r in records if r["split"] != "train"] == [
    _val(m("val", 2), 2, 1),
    _val(m("val", 4), 4, 2),
    _val(m("val", 6), 6, 3),
    {"run": "ilora", "stage": "ilora", "split": "val", "step": 6, "final": True,
     "candidates": "fp-val", "rows": 1, "selected_step": 4, "selected_by": "hits_over_total",
     **m("val", 4)},
    {"run": "ilora", "stage": "ilora", "split": "test", "step": 6, "final": True,
     "candidates": "fp-test", "rows": 1, "selected_step": 4, "selected_by": "hits_over_total",
     **m("test", 4)},
  ]  # fmt: skip
  assert fake.calls == [("val", 2, False), ("val", 4, False), ("val", 6, True),
                        ("val", 4, True), ("test", 4, True)]  # fmt: skip
  assert fake.gate_tables == [4]
  assert complete_steps(workdir, train_ilora.BEST) == [4]
  assert complete_steps(workdir) == [2, 4, 6]  # Each epoch end (every_steps=10 comes later).
  for split in SPLITS:
    with open(os.path.join(workdir, "predictions", f"{split}.jsonl")) as f:
      head, row = [json.loads(line) for line in f]
    assert head == {"split": split, "candidates": f"fp-{split}", "rows": 1,
                    "metrics": m(split, 4)}  # fmt: skip
    assert row == {"row": 0, "weights": 4}
  out, err = capsys.readouterr()
  assert _printed(out) == [
    "ilora val step 6 (weights of step 4), 1 row: hits_over_total=0.9000 hr@1=0.4500 loss=0.1000",
    "ilora test step 6 (weights of step 4), 1 row: hits_over_total=0.0400 hr@1=0.0040 loss=4.0000",
  ]
  assert "use the weights of step 4 (val hits_over_total 0.9000, the best of the epochs; " \
         "step 6: 0.7000)" in err  # fmt: skip
  # The last epoch's val line, as every epoch's (recorded, it was not printed).
  assert "iLoRA step 6 val hits_over_total=0.7000 hr@1=0.3500 loss=0.3000" in err
  # Its meta: the selected value, the metric, and the records written up to it.
  with train_ilora.contextlib.closing(
    checkpointing.StageCheckpoints(workdir, train_ilora.BEST, 1, False, read_only=True)
  ) as best:
    meta = best.restore_meta(4)
  assert (meta["value"], meta["select_by"], meta["step"]) == (0.9, "hits_over_total", 4)
  assert meta["metrics_records"] == 6  # 4 train records and 2 val records.
  # `restore_for_use`: the selected weights, or the latest checkpoint's.
  abstract = checkpointing.abstract_like(train_ilora.setup(_config(), workdir).state)
  state, at, how, by = train_ilora.restore_for_use(workdir, abstract)
  assert (_weights_step(state["trainable"]), at, by) == (4, 4, "hits_over_total")
  assert how == "the weights of step 4, selected by val hits_over_total"
  state, at, how, by = train_ilora.restore_for_use(workdir, abstract, "latest")
  assert (_weights_step(state["trainable"]), at, by) == (6, 6, None)
  assert how == "the latest checkpoint, step 6"


def test_the_last_weights_when_they_are_the_best(fake, tmp_path, capsys):
  fake.val = {2: 0.1, 4: 0.2, 6: 0.3}
  workdir = str(tmp_path)
  result = train_ilora.run(_config(), workdir)
  assert result == fake.metrics("val", 6)
  vals = [r for r in metrics_records(workdir) if r["split"] == "val"]
  assert [(r["step"], r.get("final"), r.get("selected_step")) for r in vals] == [
    (2, None, None), (4, None, None), (6, True, 6)]  # fmt: skip
  assert fake.calls[2:] == [("val", 6, True), ("test", 6, True)]
  assert fake.gate_tables == [6]
  assert complete_steps(workdir, train_ilora.BEST) == [6]  # One kept: the newest.
  out = capsys.readouterr().out
  assert (
    _printed(out)[0] == "ilora val step 6, 1 row: hits_over_total=0.3000 hr@1=0.1500 loss=0.7000"
  )


@pytest.mark.parametrize(
  "select_by,val,chosen",
  [
    ("loss", {2: 0.5, 4: 0.4, 6: 0.45}, 2),  # Loss 1 - val: the lowest loss wins.
    ("hr@1", {2: 0.5, 4: 0.5, 6: 0.5}, 2),  # A tie keeps the earlier weights.
    ("hits_over_total", {2: 0.5, 4: float("nan"), 6: 0.4}, 2),  # Non-finite never wins.
    ("hits_over_total", {2: 0.5, 4: float("inf"), 6: 0.4}, 2),
    ("hits_over_total", {2: float("nan"), 4: 0.1, 6: 0.2}, 6),
  ],
)
def test_selection_follows_each_metrics_direction(fake, tmp_path, select_by, val, chosen):
  fake.val = val
  workdir = str(tmp_path)
  train_ilora.run(_config(f"ilora.select_by={select_by}"), workdir)
  finals = [r for r in metrics_records(workdir) if r.get("final")]
  assert [(r["selected_step"], r["selected_by"]) for r in finals] == [(chosen, select_by)] * 2
  assert fake.calls[-1] == ("test", chosen, True)


def test_selecting_nothing_uses_the_last_weights_and_keeps_no_folder(fake, tmp_path, capsys):
  workdir = str(tmp_path)
  result = train_ilora.run(_config("ilora.select_by="), workdir)
  assert result == fake.metrics("val", 6)
  finals = [r for r in metrics_records(workdir) if r.get("final")]
  assert [(r["split"], r["step"]) for r in finals] == [("val", 6), ("test", 6)]
  assert not any("selected_step" in r or "selected_by" in r for r in finals)
  assert not os.path.exists(os.path.join(workdir, "checkpoints", train_ilora.BEST))
  assert fake.calls[-2:] == [("val", 6, True), ("test", 6, True)]
  assert _printed(capsys.readouterr().out)[1].startswith("ilora test step 6, 1 row: ")


# ----------------------------------------------------------------------------- the loop


def test_cadence_of_checkpoints_val_evaluations_and_train_records(fake, tmp_path):
  """3 steps an epoch, 7 steps (the last epoch cut short), checkpoint.every_steps=2, a train
  record every 2 steps: checkpoints at 2 3 4 6 7, val at the epoch ends 3 and 6 (7's is the
  final one: with step 3's weights selected, also an ordinary record of epoch 3), train
  records at 2 4 6 and the last step, each the mean of its steps; each step's batch is its
  slice of its epoch's order."""
  fake.steps_per_epoch, fake.total_steps = 3, 7
  fake.val = {3: 0.9, 6: 0.5, 7: 0.6}
  fake.skipped = {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3}
  workdir = str(tmp_path)
  train_ilora.run(_config("checkpoint.every_steps=2", "train.log_every_steps=2"), workdir)
  assert complete_steps(workdir) == [2, 3, 4, 6, 7]
  records = metrics_records(workdir)
  train = [r for r in records if r["split"] == "train"]
  assert [(r["step"], r["epoch"], r["loss"], r["grad_norm"]) for r in train] == [
    (2, 0, 1.5, 3.0), (4, 1, 3.5, 7.0), (6, 1, 5.5, 11.0), (7, 2, 7.0, 14.0)]  # fmt: skip
  assert [r["skipped_updates"] for r in train] == [1, 2, 3, 3]  # The run's, as of the step.
  assert train[0]["gate_mean/1"] == 0.75 and train[0]["gate_entropy"] == 0.5
  lr = train_ilora.optim.learning_rates(1e-3, 7, 3)["lr/lora"]  # Step 4's rate (0-based 3).
  assert train[1]["lr"] == pytest.approx(float(lr))
  vals = [(r["step"], r.get("epoch"), r.get("final")) for r in records if r["split"] == "val"]
  assert vals == [(3, 1, None), (6, 2, None), (7, 3, None), (7, None, True)]
  rows = [list(range(4 * p, 4 * p + 4)) for p in range(3)]  # Each epoch's positions 0-2.
  second = [[100 + x for x in r] for r in rows]
  steps = [(0, 0, rows[0]), (0, 1, rows[1]), (0, 2, rows[2]), (1, 3, second[0])]
  steps += [(1, 4, second[1]), (1, 5, second[2]), (2, 6, [200, 201, 202, 203])]
  assert fake.batches == steps


def test_stop_and_resume_record_what_one_run_does(fake, tmp_path, capsys):
  """Stopped at step 3 (mid-epoch, mid-record with log_every_steps=4): a checkpoint at 3,
  the last val returned, no final records; the resume continues from 3 and leaves the
  records and selected weights of the uninterrupted run. A finished run re-run re-evaluates
  and leaves them too."""
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  every = "train.log_every_steps=4"
  train_ilora.run(_config(every), whole)
  expected = metrics_records(whole)
  assert [r["loss"] for r in expected if r["split"] == "train"] == [2.5, 5.5]
  capsys.readouterr()
  assert train_ilora.run(_config(every, "train.stop_after_steps=3"), parts) == fake.metrics(
    "val", 2
  )
  assert complete_steps(parts) == [2, 3]
  assert not any(r.get("final") for r in metrics_records(parts))
  out, err = capsys.readouterr()
  assert "iLoRA: stopped at step 3 of 6 (train.stop_after_steps); re-run without it, or " \
         "with a later step, to resume" in err and _printed(out) == []  # fmt: skip
  fake.calls.clear()
  fake.batches.clear()
  train_ilora.run(_config(every), parts)
  assert "iLoRA: resumed from step 3 of 6" in capsys.readouterr().err
  assert fake.calls[0] == ("val", 4, False)  # No epoch evaluated twice.
  assert fake.batches[0] == (1, 3, [104, 105, 106, 107]) and len(fake.batches) == 3
  assert metrics_records(parts) == expected
  assert complete_steps(parts, train_ilora.BEST) == [4]
  fake.calls.clear()
  train_ilora.run(_config(every), parts)  # Finished: only the final evaluations again.
  assert fake.calls == [("val", 6, True), ("val", 4, True), ("test", 4, True)]
  assert metrics_records(parts) == expected


def test_a_signal_during_an_epochs_val_saves_its_steps_and_the_resume_runs_that_val_first(
  fake, tmp_path, capsys
):
  """SIGTERM while an epoch's val runs (a preempted run, whose grace period may be shorter than
  a val: an audit's run waited for the whole val before saving) stops the val before its next
  batch and saves the epoch's steps with the val pending; the resume runs that val first,
  a signal there too leaves the checkpoint as it was, and a resume that stops at that step
  leaves the val to the next. The records and the selected weights end as the uninterrupted
  run's."""
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  train_ilora.run(_config(), whole)
  expected = metrics_records(whole)
  fake.signal_in_val = [4]
  fake.calls.clear()
  fake.batches.clear()
  with pytest.raises(interrupts.Interrupted) as info:
    train_ilora.run(_config(), parts)
  assert (info.value.step, info.value.signum) == (4, signal.SIGTERM)
  assert fake.calls == [("val", 2, False)]  # Step 4's val never ran a batch.
  assert complete_steps(parts) == [2, 4]
  assert [r["step"] for r in metrics_records(parts) if r["split"] == "val"] == [2]
  capsys.readouterr()
  fake.signal_in_val = [4]
  with pytest.raises(interrupts.Interrupted) as info:
    train_ilora.run(_config(), parts)
  assert info.value.step == 4 and complete_steps(parts) == [2, 4]
  assert not info.value.saved  # Said so: "checkpoint 4 kept as it was".
  assert len(fake.batches) == 4  # No step of the resume ran.
  fake.calls.clear()
  # A resume stopping at that step (`stop_after_steps`) leaves the val to the next: no
  # checkpoint would record it (a review's run ran it twice).
  assert train_ilora.run(_config("train.stop_after_steps=4"), parts) == {}
  assert fake.calls == [] and complete_steps(parts) == [2, 4]
  train_ilora.run(_config(), parts)
  assert "iLoRA: resumed from step 4 of 6" in capsys.readouterr().err
  assert fake.calls[0] == ("val", 4, False) and fake.batches[-2][1] == 4
  assert metrics_records(parts) == expected
  assert complete_steps(parts, train_ilora.BEST) == [4]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_the_speed_line_shows_the_epochs_row_ordering_apart(fake, tmp_path, capsys, monkeypatch,
                                                             prefetch):  # fmt: skip
  """Each epoch's row order (every row's prompt size: a tokenisation of the split) is built
  once, by the first batch of its epoch; its time was spread over the steps' host batches,
  1,106 ms "built per step" on a 2-step run of an audit. Here an order takes 0.4 s and a batch
  next to nothing: 3 epochs of 2 steps."""
  order = train_ilora.epoch_order

  def slow_order(*args):
    time.sleep(0.4)
    return order(*args)

  monkeypatch.setattr(train_ilora, "epoch_order", slow_order)
  train_ilora.run(_config(f"ilora.prefetch={prefetch}"), str(tmp_path))
  (line,) = [x for x in capsys.readouterr().err.splitlines() if " ms per step (" in x]
  built_ms = float(line.split("): ")[-1].split(" ms built")[0])
  ordered_s = float(line.split("rows ordered in ")[1].split(" s apart (3 epochs)")[0])
  assert built_ms < 40, line  # Was (2 x 0.4 s in the batches) / 6 = 133 ms or more.
  assert 1.2 <= ordered_s < 3, line


@pytest.mark.parametrize("stage", [train_ilora.STAGE, train_ilora.BEST])
def test_a_checkpoint_folder_that_is_a_file_stops_the_run_before_it_starts(fake, tmp_path,
                                                                           stage):  # fmt: skip
  """An audit's run in a workdir whose checkpoints/ilora was a file started from scratch,
  cutting metrics.jsonl's records, and failed at its first save as if its folder had been
  removed; with checkpoints/ilora_best a file, it trained an epoch first. Now one line at
  the start says so, before anything is trained or written."""
  workdir = str(tmp_path)
  train_ilora.run(_config("train.stop_after_steps=3"), workdir)
  before = metrics_records(workdir)
  path = os.path.join(workdir, "checkpoints", stage)
  shutil.rmtree(path)
  open(path, "w").close()
  fake.batches.clear()
  with pytest.raises(UserError, match=rf"^checkpoint folder {re.escape(path)} is a file, not a "
                     "folder: move it away, or use another --workdir$"):  # fmt: skip
    train_ilora.run(_config(), workdir)
  assert metrics_records(workdir) == before and fake.batches == []


def test_the_bar_draws_each_steps_loss_beside_its_count(fake, tmp_path, monkeypatch):
  """An audit saw "13/78 ... loss=10.5539" with step 12's loss: the bar was drawn at the
  step's count before its loss was set."""
  fake.loss = {at: 10.0 + at for at in range(1, 7)}
  drawn = []

  class Bar:
    def __init__(self, iterable=None, *, enabled, total, initial=0, desc=""):
      self.n, self.postfix = initial, {}

    def set_postfix(self, refresh=True, **values):
      self.postfix = values

    def update(self, n):
      self.n += n
      drawn.append((self.n, self.postfix))

    def close(self):
      pass

  monkeypatch.setattr(train_ilora.console, "bar", Bar)
  train_ilora.run(_config(), str(tmp_path))
  assert drawn == [(at, {"loss": f"{10.0 + at:.4f}"}) for at in range(1, 7)]


def test_records_of_an_attempt_killed_before_its_first_checkpoint_are_dropped(fake, tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"run": "ilora", "split": "train", "step": 1}) + "\n")
    f.write(json.dumps({"run": "sasrec", "split": "train", "step": 1}) + "\n")
  train_ilora.run(_config("ilora.select_by="), workdir)
  records = metrics_records(workdir)
  assert records[0] == {"run": "sasrec", "split": "train", "step": 1}
  assert [r["step"] for r in records[1:] if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_kill_after_the_best_weights_before_the_steps_checkpoint_resumes_exactly(
  fake, tmp_path, monkeypatch
):
  """Killed right after step 4's weights were kept (its own checkpoint never written): the
  resume from step 2 replays epoch 2, this time with a higher val of step 4 (0.95: not the
  value kept), and keeps the weights kept already, not saving step 4 anew."""
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  train_ilora.run(_config(), whole)

  class Killed(BaseException):
    pass

  save = checkpointing.StageCheckpoints.save
  saved, dying = [], []

  def save_then_die(self, at, state, meta):
    save(self, at, state, meta)
    saved.append((self.stage, at))
    if self.stage == train_ilora.BEST and at == 4:
      dying.append(self)
      raise Killed

  monkeypatch.setattr(checkpointing.StageCheckpoints, "save", save_then_die)
  with pytest.raises(Killed):
    train_ilora.run(_config(), killed)
  assert complete_steps(killed) == [2] and complete_steps(killed, train_ilora.BEST) == [4]
  assert dying[0]._closed  # The run's exit closed the selected weights' folder all the same.
  saved.clear()
  fake.val = {**fake.val, 4: 0.95}
  train_ilora.run(_config(), killed)
  assert saved == [("ilora", 4), ("ilora", 6)]
  assert complete_steps(killed, train_ilora.BEST) == [4]
  ours, theirs = metrics_records(killed), metrics_records(whole)
  assert [r for r in ours if r["split"] == "train"] == [r for r in theirs if r["split"] == "train"]
  assert [(r["step"], r.get("selected_step")) for r in ours if r["split"] != "train"] == [
    (2, None), (4, None), (6, None), (6, 4), (6, 4)]  # fmt: skip


def test_persistent_non_finite_losses_stop_the_run(fake, tmp_path):
  fake.loss = {2: float("nan"), 4: float("nan"), 5: float("inf")}  # 2 and 4 alone: not in a row
  with pytest.raises(UserError) as err:
    train_ilora.run(_config("ilora.max_bad_steps=2"), str(tmp_path))
  # Both folders: the selected weights record the rate too (found by the diff review).
  assert str(err.value) == (
    "2 optimizer steps in a row had a non-finite loss or gradient (last at step 5); lower the "
    "learning rate (config.ilora.train.lr; config.train.lr where the command sets it) and "
    f"train anew: another --workdir, or remove {tmp_path}/checkpoints/ilora and "
    f"{tmp_path}/checkpoints/ilora_best (a resume keeps the run's own), or check the data"
  )
  train = [r for r in metrics_records(str(tmp_path)) if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]


def test_skipped_updates_with_a_finite_loss_count_towards_the_stop(fake, tmp_path):
  """A finite loss whose gradient was not (optax skipped the update): a bad step all the same,
  so a run whose every update is skipped cannot go on to its end."""
  fake.finite = {3: False, 4: False}
  with pytest.raises(UserError, match=r"^2 optimizer steps in a row had a non-finite loss or "
                     r"gradient \(last at step 4\)"):  # fmt: skip
    train_ilora.run(_config("ilora.max_bad_steps=2"), str(tmp_path))


def test_float16_training_is_warned_of(fake, tmp_path, capsys):
  """No loss scaling is done, which float16's range needs (bfloat16 and float32 do not)."""
  train_ilora.run(_config("llm.dtype=float16"), str(tmp_path / "fp16"))
  assert "warning: llm.dtype=float16 trains without loss scaling" in capsys.readouterr().err
  train_ilora.run(_config("llm.dtype=bfloat16"), str(tmp_path / "bf16"))
  assert "loss scaling" not in capsys.readouterr().err


def test_a_resume_counts_the_non_finite_losses_in_a_row_before_it(fake, tmp_path):
  """Stopped after two non-finite losses in a row (steps 2 and 3): the resume's first one
  (step 4) is the third, as in one run, so preemptions cannot keep a diverged run going."""
  fake.loss = {2: float("nan"), 3: float("nan"), 4: float("nan")}
  workdir = str(tmp_path)
  train_ilora.run(_config("ilora.max_bad_steps=3", "train.stop_after_steps=3"), workdir)
  with pytest.raises(UserError, match=r"^3 optimizer steps in a row had a non-finite loss or "
                     r"gradient \(last at step 4\)"):  # fmt: skip
    train_ilora.run(_config("ilora.max_bad_steps=3"), workdir)
  fake.loss = {2: float("nan"), 3: float("nan")}  # A finite loss at the resumed step 4.
  train_ilora.run(_config("ilora.max_bad_steps=3"), workdir)
  assert complete_steps(workdir)[-1] == 6


def test_a_data_set_without_test_records_the_skip(fake, tmp_path, capsys):
  fake.test = False
  workdir = str(tmp_path)
  train_ilora.run(_config(), workdir)
  last = metrics_records(workdir)[-1]
  assert last == {"run": "ilora", "stage": "ilora", "split": "test", "step": 6,
                  "skipped": "no test file"}  # fmt: skip
  assert not os.path.exists(os.path.join(workdir, "predictions", "test.jsonl"))
  assert "test evaluation skipped: no test file" in capsys.readouterr().err
  # Asked for by name, it is an error, before the model is set up (the LLM loaded).
  fake.setups = 0
  with pytest.raises(UserError, match="^split 'test' is not available: no test file$"):
    train_ilora.evaluate(_config("stage=evaluate", "eval.split=test"), workdir)
  assert fake.setups == 0


# ----------------------------------------------------------------------------- refused resumes


def _other_settings(directory, seed):
  return (f"the checkpoint in {directory} was made with other settings (seed: checkpoint 0 vs "
          f"config {seed}); use another --workdir or restore the settings")  # fmt: skip


def test_resumes_selecting_otherwise_or_of_other_settings_are_refused(fake, tmp_path):
  """Each refused before anything is written: metrics.jsonl and config.json stay."""
  workdir = str(tmp_path)
  train_ilora.run(_config("train.stop_after_steps=3"), workdir)
  paths = [os.path.join(workdir, name) for name in ("metrics.jsonl", "config.json")]
  before = [open(p).read() for p in paths]
  for value, selected in (("hr@1", "hits_over_total"), ("", "hits_over_total")):
    with pytest.raises(UserError) as err:
      train_ilora.run(_config(f"ilora.select_by={value}"), workdir)
    assert str(err.value) == (
      f"this run selects its final weights by val {selected}: resume with "
      f"--config.ilora.select_by='{selected}' (the epochs before step 3 were compared by it)"
    )
  fake.settings["seed"] = 1
  with pytest.raises(UserError) as err:
    train_ilora.run(_config(), workdir)
  assert str(err.value) == _other_settings(os.path.join(workdir, "checkpoints", "ilora"), 1)
  assert [open(p).read() for p in paths] == before
  # Without its step checkpoints, the kept weights still name their metric and settings.
  fake.settings["seed"] = 0
  shutil.rmtree(os.path.join(workdir, "checkpoints", "ilora"))
  with pytest.raises(UserError) as err:
    train_ilora.run(_config("ilora.select_by=hr@1"), workdir)
  best = os.path.join(workdir, "checkpoints", "ilora_best")
  assert str(err.value) == (
    f"{best} holds the weights this run selected by val hits_over_total: resume with "
    "--config.ilora.select_by='hits_over_total', or remove that folder to select anew"
  )
  fake.settings["seed"] = 2
  with pytest.raises(UserError) as err:
    train_ilora.run(_config(), workdir)
  assert str(err.value) == _other_settings(best, 2)
  assert [open(p).read() for p in paths] == before
  # Kept weights of code before 2026-12-07 (no templates recorded: its LastFM ones) are
  # refused by their prompt templates (found by a review: only the step checkpoints were).
  fake.settings.update({"seed": 0, "data": "lastfm", "prompt templates": "ec67243239e3c647"})
  for path in glob.glob(os.path.join(best, "*", "meta", "metadata")):
    with open(path) as f:
      meta = json.load(f)
    meta["settings"] = {k: v for k, v in fake.settings.items() if k != "prompt templates"}
    with open(path, "w") as f:
      json.dump(meta, f)
  with pytest.raises(UserError, match=rf"^the checkpoint in {re.escape(best)} was trained on "
                     r"prompt templates of other wording \(digest 0dc290193f146d2b\)"):  # fmt: skip
    train_ilora.run(_config(), workdir)
  assert [open(p).read() for p in paths] == before


def test_a_resume_before_the_first_epochs_end_may_select_by_another_metric(fake, tmp_path):
  """Stopped at step 1 (an epoch is 2 steps): no val was compared yet, so the resume may
  select by hr@1, and does; a checkpoint without the epoch's length (older code) is
  refused as one after an epoch's end."""
  workdir = str(tmp_path)
  train_ilora.run(_config("train.stop_after_steps=1"), workdir)
  fake.val = {2: 0.5, 4: 0.3, 6: 0.2}  # hr@1 = val / 2: step 2's weights win.
  train_ilora.run(_config("ilora.select_by=hr@1", "train.stop_after_steps=2"), workdir)
  with pytest.raises(UserError, match=r"selects its final weights by val hr@1: resume with "):
    train_ilora.run(_config("ilora.select_by=loss"), workdir)
  train_ilora.run(_config("ilora.select_by=hr@1"), workdir)
  finals = [r for r in metrics_records(workdir) if r.get("final")]
  assert [(r["selected_step"], r["selected_by"]) for r in finals] == [(2, "hr@1")] * 2
  older = str(tmp_path / "older")
  save = checkpointing.StageCheckpoints.save

  def save_as_older_code(self, at, state, meta):
    save(self, at, state, {k: v for k, v in meta.items() if k != "steps_per_epoch"})

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpointing.StageCheckpoints, "save", save_as_older_code)
    train_ilora.run(_config("train.stop_after_steps=1"), older)
  with pytest.raises(UserError, match=r"the epochs before step 1 were compared by it"):
    train_ilora.run(_config("ilora.select_by=hr@1"), older)
  # Stopped by a signal in the first epoch's val: saved at its end, no val compared yet (a
  # review's resume was refused as one after a compared epoch).
  pending = str(tmp_path / "pending")
  fake.signal_in_val = [2]
  with pytest.raises(interrupts.Interrupted):
    train_ilora.run(_config(), pending)
  assert complete_steps(pending) == [2]
  train_ilora.run(_config("ilora.select_by=hr@1"), pending)
  finals = [r for r in metrics_records(pending) if r.get("final")]
  assert [(r["selected_step"], r["selected_by"]) for r in finals] == [(2, "hr@1")] * 2


def test_a_kept_selection_carries_its_value_into_a_new_attempt(fake, tmp_path):
  """ilora_best at step 2 (val 0.5) and no step checkpoint past it: a new attempt compares
  its epochs with the kept value, so an epoch below it selects nothing new."""
  workdir = str(tmp_path)
  fake.val = {2: 0.5, 4: 0.3, 6: 0.2}
  train_ilora.run(_config("train.stop_after_steps=2"), workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "ilora"))
  train_ilora.run(_config(), workdir)
  assert complete_steps(workdir, train_ilora.BEST) == [2]
  finals = [r for r in metrics_records(workdir) if r.get("final")]
  assert [r["selected_step"] for r in finals] == [2, 2]


def test_a_checkpoint_of_older_code_without_select_by_resumes_selecting_from_there(fake, tmp_path):
  """Older code recorded no `select_by` and kept no ilora_best: its run resumes under any
  `ilora.select_by`, selecting among the epochs from there on."""
  workdir = str(tmp_path)
  train_ilora.run(_config("train.stop_after_steps=3"), workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", train_ilora.BEST))
  for at in complete_steps(workdir):
    path = os.path.join(workdir, "checkpoints", "ilora", str(at), "meta", "metadata")
    with open(path) as f:
      meta = json.load(f)
    del meta["select_by"]
    with open(path, "w") as f:
      json.dump(meta, f)
  fake.val = {2: 0.9, 4: 0.2, 6: 0.1}
  train_ilora.run(_config("ilora.select_by=hr@1"), workdir)
  finals = [r for r in metrics_records(workdir) if r.get("final")]
  assert [(r["selected_step"], r["selected_by"]) for r in finals] == [(4, "hr@1")] * 2


# ----------------------------------------------------------------------------- evaluate


def test_restore_for_use_refuses_weights_of_another_model_shape(fake, tmp_path):
  workdir = str(tmp_path)
  train_ilora.run(_config(), workdir)
  abstract = checkpointing.abstract_like(train_ilora.setup(_config(), workdir).state)
  other = {**fake.settings, "lora": {"rank": 8}}
  for weights, folder in (("selected", "ilora_best"), ("latest", "ilora")):
    with pytest.raises(UserError) as err:
      train_ilora.restore_for_use(workdir, abstract, weights, settings=other)
    assert f"checkpoints/{folder} was made with other model settings (lora.rank 4 vs config " \
           "8); set them as the run had them" in str(err.value)  # fmt: skip
    state, at, _, _ = train_ilora.restore_for_use(workdir, abstract, weights,
                                                  settings=fake.settings)  # fmt: skip
    assert _weights_step(state["trainable"]) == at == {"selected": 4, "latest": 6}[weights]


@pytest.mark.parametrize("weights,at,selected", [("selected", 4, True), ("latest", 6, False)])
def test_evaluate_prints_records_and_writes_predictions(fake, tmp_path, capsys, weights, at,
                                                        selected):  # fmt: skip
  workdir = str(tmp_path)
  train_ilora.run(_config(), workdir)
  assert fake.trains  # Training checks its batch against the devices; evaluate does not.
  capsys.readouterr()
  fake.calls.clear()
  config = _config("stage=evaluate", f"eval.weights={weights}", "eval.split=test")
  assert train_ilora.evaluate(config, workdir) == fake.metrics("test", at)
  assert fake.calls == [("test", at, True)] and fake.trains is False
  out, err = capsys.readouterr()
  assert _printed(out) == [
    f"ilora test step {at}, 1 row: " + train_ilora._fmt(fake.metrics("test", at))
  ]
  how = "the weights of step 4, selected by val hits_over_total" if selected else (
    "the latest checkpoint, step 6")  # fmt: skip
  assert f"iLoRA: evaluating {how}\n" in err and "report: report.md" in err  # Rebuilt.
  last = metrics_records(workdir)[-1]
  chosen = {"selected_step": 4, "selected_by": "hits_over_total"} if selected else {}
  assert last == {"run": "evaluate", "stage": "ilora", "split": "test", "step": at,
                  "final": True, "candidates": "fp-test", "rows": 1, **chosen,
                  **fake.metrics("test", at)}  # fmt: skip
  with open(os.path.join(workdir, "predictions", "test.jsonl")) as f:
    head, row = [json.loads(line) for line in f]
  assert head["metrics"] == fake.metrics("test", at) and row["weights"] == at


def test_evaluate_keeps_the_runs_comparison_unless_it_gives_one(fake, tmp_path, monkeypatch):
  """The rebuilt report compares with the run's config.report.compare (its config.json's)
  when the evaluation gives none: it had dropped the run's comparison rows and compare.png."""
  workdir = str(tmp_path)
  train_ilora.run(_config("report.compare=lora=/runs/lora"), workdir)
  written = []
  monkeypatch.setattr(train_ilora.report, "write", lambda w, compare: written.append(compare))
  train_ilora.evaluate(_config("stage=evaluate"), workdir)
  train_ilora.evaluate(_config("stage=evaluate", "report.compare=b=/runs/b"), workdir)
  assert written == ["lora=/runs/lora", "b=/runs/b"]


def test_selected_weights_that_are_gone_are_an_error_or_the_callers_warning(fake, tmp_path):
  """checkpoints/ilora_best removed: the evaluation scored the latest weights (step 6) as
  if nothing were amiss, though metrics.jsonl says val selected step 4's. Now it is refused,
  naming the way out; recommend's `on_lost` goes on with the latest weights after its warning.
  A run whose selection is its last step needs no ilora_best."""
  workdir = str(tmp_path)
  train_ilora.run(_config(), workdir)
  best = os.path.join(workdir, "checkpoints", train_ilora.BEST)
  shutil.rmtree(best)
  fake.calls.clear()
  message = (
    f"the weights of step 4, which val hits_over_total selected (metrics.jsonl), are not in {best}"
  )
  way_out = ": evaluate the latest checkpoint (step 6) with --config.eval.weights=latest"
  with pytest.raises(UserError, match=re.escape(message + way_out)):
    train_ilora.evaluate(_config("stage=evaluate"), workdir)
  assert fake.calls == []
  train_ilora.evaluate(_config("stage=evaluate", "eval.weights=latest"), workdir)
  assert fake.calls == [("val", 6, True)]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          train_ilora.setup(_config(), workdir).state)  # fmt: skip
  said = []
  _, at, how, by = train_ilora.restore_for_use(workdir, abstract, "selected", 10, None, said.append)
  assert (at, how, by, said) == (6, "the latest checkpoint, step 6", None, [message])
  fake.val = {2: 0.5, 4: 0.6, 6: 0.7}  # The last epoch is the best: selected step 6.
  again = str(tmp_path / "again")
  train_ilora.run(_config(), again)
  shutil.rmtree(os.path.join(again, "checkpoints", train_ilora.BEST))
  assert train_ilora.evaluate(_config("stage=evaluate"), again) == fake.metrics("val", 6)


def test_evaluate_names_an_unfinished_run_and_refuses_no_checkpoint(fake, tmp_path, capsys):
  workdir = str(tmp_path)
  train_ilora.run(_config("train.stop_after_steps=3", "ilora.select_by="), workdir)
  capsys.readouterr()
  train_ilora.evaluate(_config("stage=evaluate"), workdir)
  err = capsys.readouterr().err
  assert "iLoRA: evaluating the latest checkpoint, step 3 (an unfinished run: trained 3 of 6 " \
         "steps)" in err  # fmt: skip
  fake.setups = 0
  with pytest.raises(UserError, match="no ilora checkpoint in "):
    train_ilora.evaluate(_config("stage=evaluate"), str(tmp_path / "none"))
  assert fake.setups == 0  # Refused before the model is set up.


def test_predictions_that_cannot_be_written_are_one_error(tmp_path):
  (tmp_path / "predictions").write_text("a file, not a folder")
  evaluator = types.SimpleNamespace(fingerprint="abc", rows=[])
  with pytest.raises(UserError) as err:
    train_ilora.write_predictions(str(tmp_path), "val", evaluator, {"hr@1": 0.5})
  path = os.path.join(str(tmp_path), "predictions", "val.jsonl")
  assert str(err.value).startswith(f"cannot write {path}: ")
  assert str(err.value).endswith("; the final metrics are in metrics.jsonl")
