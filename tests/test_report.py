"""The end-of-run report: plots, summary table and TensorBoard scalars from metrics.jsonl."""

import glob
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, run_cli, unshare_works

from ilora_jax import report
from ilora_jax.errors import UserError
from ilora_jax.metrics import MetricsLog


def _events(path):
  """Scalars (tag, step, value) read back from a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  out = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      for v in event.summary.value:
        out.append((v.tag, event.step, v.simple_value))
  return out


def test_kmeans_separates_blobs():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 0.1, (20, 3)), rng.normal(5, 0.1, (30, 3))])
  labels = report.kmeans(x, 2)
  assert len(set(labels[:20].tolist())) == 1 and len(set(labels[20:].tolist())) == 1
  assert labels[0] != labels[-1]


def test_report_from_metrics(tmp_path):
  records = [
    {"run": "ilora", "stage": "ilora", "split": "train", "step": s, "loss": 3.0 - s / 10,
     "lr": 1e-3 * s, "gate_mean/0": 0.4, "gate_mean/1": 0.6, "epoch": 0}
    for s in range(1, 6)
  ]  # fmt: skip
  records.append({"run": "ilora", "stage": "ilora", "split": "val", "step": 5, "hr@1": 0.25})
  records.append(
    {
      "run": "ilora",
      "stage": "ilora",
      "split": "val",
      "step": 5,
      "final": True,
      "rows": 8,  # How many it scored: in the step's cell, not a metric of its own.
      "hr@1": 0.3125,
      "hit_ratio@1": 0.5,
    }
  )
  records.append(
    {"run": "ilora", "stage": "ilora", "split": "test", "step": 5, "skipped": "no file"}
  )
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in records) + "\n")
  rng = np.random.default_rng(1)
  (tmp_path / "report").mkdir()
  g = rng.dirichlet([1, 1], 12)
  np.savez(tmp_path / "report" / "gates.npz", gates=g, users=rng.normal(size=(12, 4)))
  out = report.write(str(tmp_path))
  import matplotlib.image

  for name in ("train_loss.png", "val_metrics.png", "gates.png"):
    image = matplotlib.image.imread(f"{out}/{name}")
    assert image.ndim == 3 and image.shape[0] > 100
  summary = open(f"{out}/summary.md").read()
  assert "| ilora | ilora | val | 5, 8 rows | 0.3125 | 0.5000 |" in summary
  # The comparison's heading says on how many rows (the SASRec stage's own final record,
  # of the whole split, differed from its row there without a word: the README audit).
  assert "## val: methods on the same candidates (fingerprint ?, step 5, 8 rows)" in summary
  assert "skipped: no file" in summary
  # The viewer is not among the package's dependencies (tensorboardX writes the files): the
  # command alone was "command not found" (found by the README audit).
  hint = f"`tensorboard --logdir {out}/tb` (the viewer is not installed with this package: "
  assert summary.rstrip().endswith(hint + "`pip install tensorboard`).")
  (events,) = glob.glob(f"{out}/tb/events.*")
  scalars = _events(events)
  assert ("ilora/train/loss", 3, np.float32(2.7)) in [(t, s, np.float32(v)) for t, s, v in scalars]
  assert ("ilora/val_final/hr_1", 5, 0.3125) in scalars  # TensorBoard tags turn @ into _.


def test_a_stage_without_training_steps_says_so_in_its_loss_plot(tmp_path, monkeypatch):
  """A run evaluated without training (`train.epochs=0` on an original .pt) drew an empty
  0..1 frame in train_loss.png without a word (found by the README audit)."""
  import matplotlib.figure

  texts, real = {}, matplotlib.figure.Figure.savefig

  def record(fig, path, *args, **kwargs):
    name = os.path.basename(path).split(".tmp-")[0]  # Written to a temporary name first.
    texts[name] = [t.get_text() for ax in fig.axes for t in ax.texts]
    return real(fig, path, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
  final = {"run": "sasrec", "stage": "sasrec", "split": "val", "step": 0, "final": True}
  (tmp_path / "metrics.jsonl").write_text(json.dumps({**final, "hr@1": 0.25, "rows": 1}) + "\n")
  out = report.write(str(tmp_path))
  assert texts["train_loss.png"] == ["no training steps recorded"]
  assert "| sasrec | sasrec | val | 0, 1 row | 0.2500 |" in open(f"{out}/summary.md").read()


def test_comparison_needs_the_same_candidates(tmp_path):
  def run_dir(name, fingerprint, gate, experts, hit):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
      {"stage": "ilora", "lora": {"gate": gate, "num_experts": experts, "rank": 8},
       "router": {"kind": "mlp"}}))  # fmt: skip
    record = {"run": "ilora", "stage": "ilora", "split": "val", "step": 3, "final": True,
              "candidates": fingerprint, "hit_ratio@1": hit, "hr@1": hit / 2,
              "base/hr@1": 0.05, "sasrec/hr@1": 0.2}  # fmt: skip
    (d / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return str(d)

  ours = run_dir("ilora", "abc", "router", 4, 0.5)
  same = run_dir("lora", "abc", "constant", 1, 0.375)
  other = run_dir("uniform", "xyz", "uniform", 4, 0.25)
  out = report.write(ours, f"plain={same},{other}")
  summary = open(f"{out}/summary.md").read()
  assert "| iLoRA (E=4, router mlp), this run |  | 0.5000 |  | 0.2500 |" in summary
  assert "| plain: plain LoRA (r=8) |  | 0.3750 |  | 0.1875 |" in summary
  assert "| base LLM, no adapters (text-only prompt) |  |  |  | 0.0500 |" in summary
  assert "| SASRec |  |  |  | 0.2000 |" in summary
  assert "| uniform: LoRA experts, uniform gate (E=4) | different candidates" in summary
  assert "0.1250" not in summary  # The incomparable run's numbers are left out.


def test_a_compared_sasrec_only_run_says_why_it_is_not_compared(tmp_path):
  """A compared workdir whose only stage is sasrec (a grid's `W/sasrec/seed0`) has final val
  records, without the candidate fingerprint to match: its row says so (and where SASRec on
  these candidates is), not that it has no final evaluation; a run without any final
  evaluation still says that."""

  def run_dir(name, stage, records):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"stage": stage}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(d)

  ours = run_dir("ours", "ilora", [{"run": "ilora", "stage": "ilora", "split": "val", "step": 3,
                                    "final": True, "candidates": "abc", "hr@1": 0.5,
                                    "sasrec/hr@1": 0.25}])  # fmt: skip
  sas = run_dir("sas", "sasrec", [{"run": "sasrec", "stage": "sasrec", "split": "val", "step": 9,
                                   "final": True, "hr@1": 0.875}])  # fmt: skip
  going = run_dir("going", "ilora", [{"run": "ilora", "stage": "ilora", "split": "train",
                                      "step": 1, "loss": 2.0}])  # fmt: skip
  summary = open(f"{report.write(ours, {'sas': sas, 'going': going})}/summary.md").read()
  rows = {line.split(" | ")[0]: line for line in summary.splitlines() if line.startswith("| ")}
  assert "no candidate fingerprint" in rows["| sas: SASRec"], rows
  assert "the SASRec row is SASRec on these candidates" in rows["| sas: SASRec"]
  assert "no final val evaluation" not in rows["| sas: SASRec"]
  assert rows["| SASRec"].split(" | ")[4] == "0.2500"  # hr@1: this run's SASRec baseline.
  assert "0.8750" not in summary  # The SASRec-only run's numbers are left out.
  (going_row,) = (line for key, line in rows.items() if key.startswith("| going: "))
  assert f"no final val evaluation in {going}" in going_row


def test_a_report_of_a_run_without_ilora_finals_says_why_nothing_is_compared(tmp_path):
  """--compare given to a SASRec-only workdir (or an iLoRA run not yet evaluated) names the
  compared runs and the reason there is no comparison table, instead of dropping it."""
  other = tmp_path / "other"
  other.mkdir()
  (other / "metrics.jsonl").write_text(json.dumps(
    {"run": "ilora", "stage": "ilora", "split": "val", "step": 3, "final": True,
     "candidates": "abc", "hr@1": 0.5}) + "\n")  # fmt: skip
  for name, record, reason in (
    (
      "sas",
      {"run": "sasrec", "stage": "sasrec", "split": "val", "step": 9, "final": True, "hr@1": 0.875},
      "SASRec stage only",
    ),  # fmt: skip
    (
      "going",
      {"run": "ilora", "stage": "ilora", "split": "train", "step": 1, "loss": 2.0},
      "no final iLoRA evaluation yet",
    ),
  ):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    summary = open(f"{report.write(str(d), {'theirs': str(other)})}/summary.md").read()
    (line,) = [x for x in summary.splitlines() if x.startswith("No comparison with theirs: ")]
    assert reason in line, line
    assert "0.5000" not in summary and "## val: methods" not in summary


def test_a_pipe_in_a_compare_name_or_a_record_keeps_the_tables_columns(tmp_path):
  """A compare name holding `|` (or a record's text, such as a skipped split's reason) is one
  cell of summary.md's tables, with its `|` escaped, not a column break."""
  records = [{"run": "ilora", "stage": "ilora", "split": "val", "step": 3, "final": True,
              "candidates": "abc", "hr@1": 0.5},
             {"run": "ilora", "stage": "ilora", "split": "test", "step": 3,
              "skipped": "no file a|b.txt"}]  # fmt: skip
  for name in ("ours", "other"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  out = report.write(str(tmp_path / "ours"), {"a|b": str(tmp_path / "other")})
  text = open(f"{out}/summary.md").read()
  tables = [t.splitlines() for t in re.findall(r"(?m)(?:^\|.*\n)+", text)]
  assert len(tables) == 2  # The comparison and every final metric.
  cells = []
  for table in tables:  # Cells split at the pipes that are not escaped.
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table]
    assert len({len(row) for row in rows}) == 1, table  # Each row as wide as its header.
    cells += [c.replace("\\|", "|") for row in rows for c in row]
  assert "a|b: model" in cells and "skipped: no file a|b.txt" in cells


def test_compared_runs_losses_share_one_plot(tmp_path):
  """`compare.png`: this run's iLoRA losses beside those of compared runs on the same val
  candidates or not finished yet; a run on other candidates is left out."""
  rng = np.random.default_rng(0)

  def run_dir(name, fingerprint, steps=60, final=True):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
      {"stage": "ilora", "lora": {"gate": "router", "num_experts": 4, "rank": 8},
       "router": {"kind": "linear"}}))  # fmt: skip
    loss = rng.uniform(0.5, 2.0, steps)
    records = [{"run": "ilora", "stage": "ilora", "split": "train", "step": s + 1, "loss": v}
               for s, v in enumerate(loss)]  # fmt: skip
    records.append({"run": "ilora", "stage": "ilora", "split": "val", "step": 30, "loss": 1.5})
    if final:
      records.append({"run": "ilora", "stage": "ilora", "split": "val", "step": steps,
                      "final": True, "candidates": fingerprint, "loss": 1.25})  # fmt: skip
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(d), loss

  ours, loss = run_dir("ours", "abc")
  same, _ = run_dir("same", "abc")
  going, _ = run_dir("going", None, steps=20, final=False)
  other, _ = run_dir("other", "xyz")
  compare = {"same": same, "going": going, "other": other}
  curves = report.comparison_curves(ours, report.read_records(ours), compare)
  assert [k.split(":")[0] for k in curves] == ["iLoRA (E=4, router linear), this run", "same",
                                               "going"]  # fmt: skip
  steps, mean = curves["iLoRA (E=4, router linear), this run"]["train"]
  np.testing.assert_array_equal(steps, np.arange(1, 61))
  window = 3  # A twentieth of 60 steps.
  full = np.convolve(loss, np.ones(window) / window, mode="valid")
  np.testing.assert_allclose(mean[window - 1 :], full, rtol=1e-12)
  np.testing.assert_allclose(mean[: window - 1], [loss[0], loss[:2].mean()], rtol=1e-12)
  val_steps, val_loss = curves["same: iLoRA (E=4, router linear)"]["val"]
  assert val_steps.tolist() == [30, 60] and val_loss.tolist() == [1.5, 1.25]
  out = report.write(ours, compare)
  import matplotlib.image

  assert matplotlib.image.imread(f"{out}/compare.png").shape[1] > 600
  assert "`compare.png`" in open(f"{out}/summary.md").read()
  alone = report.write(same)  # Nothing to compare: no such plot.
  assert not os.path.exists(f"{alone}/compare.png")
  assert report.write(ours) == out  # Rebuilt without --compare: the earlier plot goes.
  assert not os.path.exists(f"{out}/compare.png")


def test_compare_curves_leave_skipped_steps_as_gaps(tmp_path):
  """A skipped step's loss, written "nan" (and a text "inf" val loss), is a gap in
  `compare.png`'s curves: the running mean of the other steps is that of the finite losses in
  their window, and the val losses are numbers (text made matplotlib's y axis categorical)."""
  rng = np.random.default_rng(4)
  loss = rng.uniform(0.5, 2.0, 40)
  loss[[9, 10]] = np.nan  # Steps 10 and 11: skipped updates.
  records = [{"run": "ilora", "stage": "ilora", "split": "train", "step": s + 1,
              "loss": "nan" if np.isnan(v) else v} for s, v in enumerate(loss)]  # fmt: skip
  records += [{"run": "ilora", "stage": "ilora", "split": "val", "step": s, "loss": v}
              for s, v in ((20, "inf"), (40, 1.1))]  # fmt: skip
  ours = tmp_path / "ours"
  ours.mkdir()
  (ours / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  other = tmp_path / "other"
  other.mkdir()
  (other / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
  (curve, _) = report.comparison_curves(
    str(ours), report.read_records(str(ours)), {"other": str(other)}
  ).values()
  steps, mean = curve["train"]
  window = 2  # A twentieth of 40 steps.
  want = [np.nan if np.isnan(loss[i]) else np.nanmean(loss[max(0, i - window + 1) : i + 1])
          for i in range(40)]  # fmt: skip
  np.testing.assert_array_equal(steps, np.arange(1, 41))
  np.testing.assert_allclose(mean, want, rtol=1e-12)  # NaN where `want` is NaN, only there.
  val_steps, val_loss = curve["val"]
  assert val_steps.tolist() == [20, 40] and val_loss.dtype == np.float64
  assert np.isnan(val_loss[0]) and val_loss[1] == 1.1


SASREC_TRAIN = {"run": "sasrec", "stage": "sasrec", "split": "train", "step": 1, "loss": 2.5}


@pytest.mark.parametrize("records", [[], [SASREC_TRAIN]], ids=["empty", "sasrec"])
def test_summary_lists_the_plots_written(tmp_path, records):
  """summary.md's "Plots:" line names the plots in the folder, no `gates.png` where none was
  drawn (a SASRec-only or an empty run)."""
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  out = report.write(str(tmp_path))
  (line,) = [x for x in open(f"{out}/summary.md").read().splitlines() if x.startswith("Plots:")]
  assert sorted(re.findall(r"`([^`]+\.png)`", line)) == sorted(
    name for name in os.listdir(out) if name.endswith(".png")
  )


def test_sign_test_matches_scipys_binomial_test():
  from scipy import stats

  for a, b in [(0, 0), (3, 0), (0, 7), (5, 5), (2, 9), (13, 4), (40, 25)]:
    want = 1.0 if a + b == 0 else stats.binomtest(a, a + b, 0.5).pvalue
    assert report.sign_test_p(a, b) == pytest.approx(want, rel=1e-12), (a, b)


def test_comparison_pairs_the_rows_of_two_runs(tmp_path, capsys):
  """With both runs' predictions on the same rows and candidates, the summary counts the rows
  only one of them got right, by generation and by likelihood."""
  rng = np.random.default_rng(3)
  n = 40
  hits = {"ours": rng.random(n) < 0.5, "plain": rng.random(n) < 0.3}
  ranks = {"ours": rng.integers(0, 4, n), "plain": rng.integers(0, 4, n)}

  def run_dir(name, fingerprint, rows=range(n), like=None):
    d = tmp_path / name
    (d / "predictions").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(
      {"stage": "ilora", "lora": {"gate": "constant", "num_experts": 1, "rank": 8},
       "router": {"kind": "linear"}}))  # fmt: skip
    final = {"run": "ilora", "stage": "ilora", "split": "val", "step": 3, "final": True,
             "candidates": fingerprint, "hr@1": 0.5}  # fmt: skip
    (d / "metrics.jsonl").write_text(json.dumps(final) + "\n")
    lines = [{"split": "val", "candidates": fingerprint, "rows": len(rows)}]
    of = like or name
    lines += [{"row": i, "hit": bool(hits[of][i]), "rank": int(ranks[of][i])} for i in rows]
    (d / "predictions" / "val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(d)

  ours, plain = run_dir("ours", "abc"), run_dir("plain", "abc")
  a = int(np.sum(hits["ours"] & ~hits["plain"]))
  b = int(np.sum(hits["plain"] & ~hits["ours"]))
  c = int(np.sum((ranks["ours"] == 0) & (ranks["plain"] != 0)))
  d = int(np.sum((ranks["plain"] == 0) & (ranks["ours"] != 0)))
  out = report.write(ours, f"plain={plain}")
  summary = open(f"{out}/summary.md").read()
  line = next(x for x in summary.splitlines() if x.startswith("Paired with plain"))
  rows = {k: f"{k} row" if k == 1 else f"{k} rows" for k in (a, c)}  # "1 rows" before.
  assert line == (
    f"Paired with plain on the same {n} rows: generation hits: {rows[a]} only this run, {b} "
    f"only plain (exact sign test p = {report.sign_test_p(a, b):.3g}); top-1 by likelihood: "
    f"{rows[c]} only this run, {d} only plain (exact sign test p = "
    f"{report.sign_test_p(c, d):.3g})."
  )
  # One row apart: "1 row", not "1 rows".
  hits["one"], ranks["one"] = hits["plain"].copy(), ranks["plain"]
  hits["one"][np.flatnonzero(~hits["plain"])[0]] = True
  summary = open(f"{report.write(run_dir('one', 'abc'), f'plain={plain}')}/summary.md").read()
  assert "generation hits: 1 row only this run, 0 only plain (exact sign test p = 1)" in summary
  # Other rows (a shorter evaluation) are not paired.
  fewer = run_dir("fewer", "abc", rows=range(n - 1), like="plain")
  summary = open(f"{report.write(ours, f'fewer={fewer}')}/summary.md").read()
  assert "Paired with" not in summary
  # Damaged predictions of a compared run: the line says so (it was left out without a word),
  # and so does stderr; a `hit` of another type was counted as a hit.
  path = tmp_path / "plain" / "predictions" / "val.jsonl"
  good = path.read_text().splitlines()
  for line, why in (("{broken", "not a JSON record"), ('{"row": 0, "hit": "yes", "rank": 0}',
                    "hit='yes' is not true or false"), ('{"row": 0, "rank": -1}',
                    "rank=-1 is not a count from 0"), ("[1]", "not a JSON object")):  # fmt: skip
    path.write_text("\n".join([*good[:2], line, *good[3:]]) + "\n")
    summary = open(f"{report.write(ours, f'plain={plain}')}/summary.md").read()
    assert "Paired with" not in summary
    assert f"No row-by-row comparison with plain: damaged predictions ({path}:3: " in summary
    assert why in summary
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {path}:3: ") and why in err
    assert err.endswith("the report leaves out the val row-by-row comparison with plain\n")


def test_group_metrics_get_their_own_table():
  final = {"run": "ilora", "stage": "ilora", "split": "val", "step": 3, "final": True,
           "hr@1": 0.25, "group/0/rows": 3, "group/0/hr@1": 0.125, "group/0/gate/0": 0.75,
           "group/1/rows": 1, "group/1/hr@1": 0.625}  # fmt: skip
  lines = report.group_table([final])
  assert lines[3] == "| run | split | group | rows | hr@1 | gate/0 |"
  assert lines[5] == "| ilora | val | 0 | 3 | 0.1250 | 0.7500 |"  # A count as a count.
  assert lines[6] == "| ilora | val | 1 | 1 | 0.6250 |  |"
  assert report.group_table([{k: v for k, v in final.items() if "group" not in k}]) == []


def test_runs_without_ranking_metrics_plot_without_warnings(tmp_path):
  """A run with both evaluation modes off has val records with the loss only: its validation
  panel says so instead of matplotlib warning of a legend with no entries."""
  import matplotlib.image

  records = [
    {"run": "ilora", "stage": "ilora", "split": split, "step": s, "loss": 3.0 - s / 10}
    for s in range(1, 4)
    for split in ("train", "val")
  ]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in records) + "\n")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = report.write(str(tmp_path))
  image = matplotlib.image.imread(f"{out}/val_metrics.png")
  assert image.ndim == 3 and image.shape[0] > 100


def test_the_val_panel_draws_every_val_metric_and_marks_the_selected_weights():
  """hits_over_total (the default select_by with generation on) was not drawn, nor the step
  whose weights the final evaluations used; lines at 0 lay on the axis's edge, and a single
  evaluation had fractional steps for ticks."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  base = {"run": "ilora", "stage": "ilora", "split": "val"}
  metrics = {"hr@1": 0.0, "hit_ratio@1": 0.0, "valid_ratio": 0.5, "hits_over_total": 0.25}
  records = [{**base, "step": s, "epoch": s // 3, **metrics} for s in (3, 6)]
  records.append({**base, "step": 6, "final": True, **metrics, "selected_step": 3,
                  "selected_by": "hits_over_total"})  # fmt: skip
  fig, ax = plt.subplots()
  report._val_axes(ax, "ilora", records)
  lines = {line.get_label(): line for line in ax.get_lines()}
  assert list(lines["hits_over_total"].get_ydata()) == [0.25, 0.25]
  assert list(lines["selected by hits_over_total (step 3)"].get_xdata()) == [3, 3]
  assert ax.get_ylim()[0] < 0 < 1 < ax.get_ylim()[1]
  plt.close(fig)
  fig, ax = plt.subplots()
  report._val_axes(ax, "ilora", records[:1])  # One evaluation, no selection.
  fig.canvas.draw()
  assert all(float(t).is_integer() for t in ax.get_xticks())
  assert [line.get_label() for line in ax.get_lines() if "selected" in line.get_label()] == []
  plt.close(fig)


def test_report_does_not_import_torch(tmp_path):
  """tensorboardX imports torch where it is installed; the report's writer must not (the
  package never uses torch). In a fresh interpreter, with torch installed as in the tests."""
  pytest.importorskip("torch")
  records = [{"run": "sasrec", "stage": "sasrec", "split": "train", "step": 1, "loss": 2.5}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write(json.dumps(records[0]) + "\n")
  code = (
    "import sys; from ilora_jax import report; out = report.write(sys.argv[1]); "
    "print('torch' in sys.modules, out)"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr
  imported, out = proc.stdout.split()
  assert imported == "False"
  (events,) = glob.glob(f"{out}/tb/events.*")
  assert ("sasrec/train/loss", 1, 2.5) in _events(events)
  import torch  # noqa: F401  (imported here, the writer class comes as before)

  assert report._summary_writer_class().__name__ == "SummaryWriter"


def _report_cli(capsys, *args):
  """`python -m ilora_jax.report args...` in this process (cheaper than a subprocess): the
  exit code and the captured output as a CompletedProcess."""
  code = 0
  try:
    report.main(["report", *args])
  except SystemExit as exc:
    code = exc.code
  out, err = capsys.readouterr()
  return subprocess.CompletedProcess(args, code, out, err)


GOOD = '{"run": "ilora", "stage": "ilora", "split": "train", "step": 1, "loss": 2.5}\n'


@pytest.mark.parametrize(
  "text, fragments",
  [
    ("[1, 2]\n" + GOOD, ["metrics.jsonl:1", "JSON object"]),
    ('{"step": "abc", "loss": 1}\n', ["metrics.jsonl:1", "step", "integer"]),
    ('{"step": 1e30, "loss": 1}\n', ["metrics.jsonl:1", "step", "integer"]),
    ('{"step": 1, "split": [1]}\n', ["metrics.jsonl:1", "split", "string"]),
    (GOOD + '{"broken\n' + GOOD, ["metrics.jsonl:2", "not a JSON record"]),
    (GOOD + "\xff\n" + GOOD, ["metrics.jsonl:2", "not a JSON record"]),
    (GOOD + '{"broken\n', ["metrics.jsonl:2", "not a JSON record"]),  # Its newline: not cut.
  ],
  ids=[
    "list",
    "step_text",
    "step_1e30",
    "split_list",
    "middle_cut",
    "middle_not_utf8",
    "bad_last_line_with_newline",
  ],  # fmt: skip
)
def test_bad_metrics_lines_are_one_error_naming_file_and_line(tmp_path, capsys, text, fragments):
  (tmp_path / "metrics.jsonl").write_bytes(text.encode("latin-1"))
  proc = _report_cli(capsys, f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert_one_line_error(proc, str(tmp_path), *fragments)


def test_a_cut_last_line_is_skipped_and_numbers_too_big_become_inf(tmp_path, capsys):
  """A job being written (or killed mid-write) leaves its last line cut: that one alone is
  skipped. An integer too large for a float is infinite, as the log writes non-finite values."""
  big = '{"run": "ilora", "stage": "ilora", "split": "val", "step": 2, "final": true, '
  big += f'"hr@1": {10**400}}}\n'
  (tmp_path / "metrics.jsonl").write_text(GOOD + big + '{"run": "ilora", "st')
  records = report.read_records(str(tmp_path))
  assert len(records) == 2 and records[1]["hr@1"] == float("inf")
  proc = _report_cli(capsys, f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr
  assert "| ilora | ilora | val | 2 | inf |" in (tmp_path / "report" / "summary.md").read_text()
  # Said, not silent (a final record cut off vanished from the tables without a word).
  path = tmp_path / "metrics.jsonl"
  assert f"warning: {path}:3 is cut (a run writing it now, or one killed mid-write, which " \
         "rewrites it when resumed): that record is left out" in proc.stderr  # fmt: skip
  report.read_records(str(tmp_path))  # Read again (a grid's tables do): said once.
  assert "is cut" not in capsys.readouterr().err


@pytest.mark.parametrize("case", ["metrics_dir", "report_file", "tb_file", "read_only"])
def test_unusable_files_and_folders_are_one_error(tmp_path, capsys, case):
  (tmp_path / "metrics.jsonl").write_text(GOOD)
  fragments = [str(tmp_path)]
  if case == "metrics_dir":
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()
    fragments.append("not a file")
  elif case == "report_file":
    (tmp_path / "report").write_text("")
    fragments.append("not a folder")
  elif case == "tb_file":
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "tb").write_text("")
    fragments.append("cannot write the report")
  else:
    fragments.append("cannot write the report")
    tmp_path.chmod(0o555)
    if os.access(tmp_path, os.W_OK):  # Root writes anyway: a read-only mount, in a namespace.
      tmp_path.chmod(0o755)
      if not unshare_works(str(tmp_path.parent / f"{tmp_path.name}_probe")):
        pytest.skip("root writes into read-only folders, and no `unshare --user --mount`")
      script = (f"mount --bind {tmp_path} {tmp_path} && mount -o remount,bind,ro {tmp_path} && "
                f"{sys.executable} -m ilora_jax.report --workdir={tmp_path}")  # fmt: skip
      proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
      assert_one_line_error(proc, *fragments)
      assert proc.returncode == 2 and not (tmp_path / "report").exists()
      return
  try:
    proc = _report_cli(capsys, f"--workdir={tmp_path}")
  finally:
    tmp_path.chmod(0o755)
  assert proc.returncode == 2
  assert_one_line_error(proc, *fragments)


@pytest.mark.parametrize(
  "compare, fragments",
  [
    ("a={ok},a={ok}", ["--compare", "'a' given twice"]),
    ("={ok}", ["--compare", "name=DIR"]),
    ("a=", ["--compare", "name=DIR"]),
    ("{ok}/missing", ["--compare", "no metrics.jsonl", "name=DIR"]),
  ],
  ids=["duplicate", "no_name", "no_dir", "no_metrics"],
)
def test_bad_compare_lists_are_one_error(tmp_path, capsys, compare, fragments):
  (tmp_path / "metrics.jsonl").write_text(GOOD)
  proc = _report_cli(capsys, f"--workdir={tmp_path}", f"--compare={compare.format(ok=tmp_path)}")
  assert proc.returncode == 2
  assert_one_line_error(proc, *fragments)


def test_a_workdir_that_is_no_folder_is_named_as_such(tmp_path, capsys):
  """A file or a missing path given as --workdir was 'no metrics.jsonl in ...'."""
  (tmp_path / "afile").write_text("")
  for path, what in ((tmp_path / "afile", "is a file, not a run's folder"),
                     (tmp_path / "gone", "does not exist")):  # fmt: skip
    proc = _report_cli(capsys, f"--workdir={path}")
    assert_one_line_error(proc, f"error: --workdir={path} {what}")


def test_flags_take_the_forms_main_takes(tmp_path, capsys):
  """`--workdir DIR` (a space for the `=`, as absl and `ilora_jax.main` take it), `-workdir`
  and a --flagfile work; a flag that is not the report's, or a word that is no flag, is one
  error line with the usage."""
  (tmp_path / "metrics.jsonl").write_text(GOOD)
  other = tmp_path / "other"
  other.mkdir()
  (other / "metrics.jsonl").write_text(GOOD)
  (tmp_path / "flags").write_text(f"--workdir={tmp_path}\n--compare=b={other}\n")
  for args in (["--workdir", str(tmp_path), "--compare", f"b={other}"],
               ["-workdir", str(tmp_path), f"-compare=b={other}"],
               [f"--flagfile={tmp_path / 'flags'}"]):  # fmt: skip
    for name in ("summary.md", "compare.png"):
      (tmp_path / "report" / name).unlink(missing_ok=True)
    proc = _report_cli(capsys, *args)
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "report"), proc
    assert (tmp_path / "report" / "compare.png").exists()  # With the run named by --compare.
  proc = _report_cli(capsys, "--workdr", str(tmp_path))
  assert_one_line_error(proc, "'workdr'", "usage:")
  proc = _report_cli(capsys, f"--workdir={tmp_path}", "x")
  assert_one_line_error(proc, "'x'", "usage:")


def test_the_cli_keeps_the_runs_own_comparison_unless_told(tmp_path, capsys):
  """Without --compare the report command dropped the comparison the run was trained with
  (its rows and compare.png, which stage=evaluate keeps): it keeps it now; `--compare=`
  compares with none; a compared run of the saved config that is gone is a warning."""
  (tmp_path / "metrics.jsonl").write_text(GOOD)
  other = tmp_path / "other"
  other.mkdir()
  (other / "metrics.jsonl").write_text(GOOD)
  saved = {"report": {"compare": f"b={other}"}}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  proc = _report_cli(capsys, f"--workdir={tmp_path}")
  assert proc.returncode == 0 and (tmp_path / "report" / "compare.png").exists(), proc
  proc = _report_cli(capsys, f"--workdir={tmp_path}", "--compare=")
  assert proc.returncode == 0 and not (tmp_path / "report" / "compare.png").exists(), proc
  saved["report"]["compare"] = f"b={tmp_path / 'gone'}"
  (tmp_path / "config.json").write_text(json.dumps(saved))
  proc = _report_cli(capsys, f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc
  assert f"warning: config.report.compare: no metrics.jsonl in {tmp_path / 'gone'}" in proc.stderr
  # The run itself among the compared: refused, given or saved (its rows beside themselves).
  proc = _report_cli(capsys, f"--workdir={tmp_path}", f"--compare=me={tmp_path}/")
  assert_one_line_error(proc, f"--compare: me={tmp_path}/ is this run's own workdir")
  saved["report"]["compare"] = f"me={tmp_path}"
  (tmp_path / "config.json").write_text(json.dumps(saved))
  proc = _report_cli(capsys, f"--workdir={tmp_path}")
  assert_one_line_error(proc, "the run's config.report.compare: me=", "own workdir",
                        "give --compare=name=DIR")  # fmt: skip
  # One the command refuses (a folder named twice) says how to give another.
  saved["report"]["compare"] = f"b={other},c={other}"
  (tmp_path / "config.json").write_text(json.dumps(saved))
  proc = _report_cli(capsys, f"--workdir={tmp_path}")
  assert_one_line_error(proc, "the run's config.report.compare: the run", "is given twice",
                        "give --compare=name=DIR,... (or --compare= for none)")  # fmt: skip


def test_compare_of_the_config_names_each_run_once(tmp_path):
  with pytest.raises(UserError, match="config.report.compare: name 'x' given twice"):
    report.write(str(tmp_path), "x=a,x=b")
  # One folder under two names (here one written with a trailing slash) gave its rows twice.
  with pytest.raises(UserError, match=re.escape(
      f"the run {tmp_path}/b/ is given twice (as 'x' and 'y'): name it once")):  # fmt: skip
    report.parse_compare(f"x={tmp_path}/b,y={tmp_path}/b/")


def test_non_finite_values_and_gates_without_records_report_quietly(tmp_path):
  """NaN and Infinity metric values (tensorboardX logs a warning per value) and a gates.npz
  with no gate records (matplotlib warns of a legend without entries): nothing on stderr."""
  records = [
    {"run": "ilora", "stage": "ilora", "split": "train", "step": 3, "loss": float("nan")},
    {"run": "ilora", "stage": "ilora", "split": "train", "step": 4, "loss": float("inf")},
  ]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
  (tmp_path / "report").mkdir()
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "report" / "gates.npz", gates=rng.dirichlet([1, 1], 8),
           users=rng.normal(size=(8, 3)))  # fmt: skip
  proc = run_cli(f"--workdir={tmp_path}", module="ilora_jax.report")
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  assert (tmp_path / "report" / "gates.png").exists()


def test_gates_of_a_diverged_run_plot_their_finite_rows_quietly(tmp_path):
  """A gates.npz with NaN or infinite gates or user vectors (a run that diverged): those
  users are left out of the gate plots and counted in their titles, without numpy's
  RuntimeWarnings on stderr; with none finite, the plots say so and the report is written."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rng = np.random.default_rng(1)
  gates, users = rng.dirichlet([1, 1, 1], 8), rng.normal(size=(8, 3))
  gates[2, 1], users[5, 0] = np.nan, np.inf
  fig, (a, b) = plt.subplots(1, 2)
  report._plot_gates(a, b, gates, users)
  assert a.get_title() == "gate entropy per user (6 val users, 2 non-finite left out)"
  assert sum(bar.get_height() for bar in a.patches) == 6  # The histogram counts 6 users.
  plt.close(fig)
  record = {"run": "ilora", "stage": "ilora", "split": "train", "step": 1, "loss": 2.0}
  (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
  (tmp_path / "report").mkdir()
  for g in (gates, np.full((4, 2), np.nan)):
    np.savez(tmp_path / "report" / "gates.npz", gates=g, users=users[: len(g)])
    proc = run_cli(f"--workdir={tmp_path}", module="ilora_jax.report")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert (tmp_path / "report" / "gates.png").exists()


def test_non_finite_values_the_log_writes_as_text_stay_in_the_report(tmp_path, capsys):
  """The log writes NaN and the infinities as the texts "nan", "inf" (JSON has none): the
  summary shows them in their columns and the loss plot keeps the finite points, instead of
  dropping the values as if they were not metrics."""
  log = MetricsLog(str(tmp_path))
  base = {"run": "ilora", "stage": "ilora"}
  for step, loss in ((1, 2.5), (2, float("nan")), (3, 2.0)):
    log.write({**base, "split": "train", "step": step, "loss": loss})
  log.write({**base, "split": "val", "step": 3, "final": True, "hr@1": 0.5,
             "loss": float("inf"), "selected_by": "hr@1"})  # fmt: skip
  assert '"loss": "inf"' in (tmp_path / "metrics.jsonl").read_text()
  proc = _report_cli(capsys, f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr
  summary = (tmp_path / "report" / "summary.md").read_text()
  assert "| ilora | ilora | val | 3 | 0.5000 | inf |" in summary, summary
  train = [r for r in report.read_records(str(tmp_path)) if r["split"] == "train"]
  assert [report.number(r["loss"]) for r in train][::2] == [2.5, 2.0]
  assert math.isnan(report.number(train[1]["loss"]))
  assert report.number("hr@1") is None and report.number(True) is None


def test_a_selected_step_must_be_an_integer_and_damaged_predictions_are_named(tmp_path):
  """`selected_step` is a step like `step` (TensorBoard's x): checked the same way. A
  predictions file with a line that is no JSON object is an error naming it (the report
  leaves out its pairing, saying why)."""
  for value in ("x", [6], 2**70, 1.5):
    with pytest.raises(UserError, match="metrics.jsonl:3: selected_step=.* must be an integer"):
      report._checked({"step": 6, "selected_step": value}, "metrics.jsonl:3")
  assert report._checked({"step": 6, "selected_step": 6.0}, "w")["selected_step"] == 6
  assert report._checked({"step": 6, "selected_step": None}, "w")["selected_step"] is None
  folder = tmp_path / "predictions"
  folder.mkdir()
  good = [{"split": "val", "candidates": "c"}, {"row": 0, "hit": True, "rank": 0}]
  (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
  assert report.read_predictions(str(tmp_path), "val") == (good[0], good[1:])
  (folder / "val.jsonl").write_text(json.dumps(good[0]) + "\n[1, 2]\n")
  with pytest.raises(UserError, match=r"val.jsonl:2: not a JSON object"):
    report.read_predictions(str(tmp_path), "val")
  shutil.rmtree(folder)  # A file in the folder's place was read as no predictions at all.
  folder.write_text("")
  with pytest.raises(UserError, match=f"^{re.escape(str(folder))} is not a folder$"):
    report.read_predictions(str(tmp_path), "val")


def test_a_damaged_gates_npz_leaves_the_rest_of_the_report_written(tmp_path, capsys):
  """A gates.npz that cannot be read stopped the rebuild half way (train_loss.png and
  val_metrics.png new, summary.md and the TensorBoard files stale): a warning now, and the
  rest of the report is written, gates.png with its val panels saying why they are empty."""
  record = {"run": "ilora", "stage": "ilora", "split": "train", "step": 1, "loss": 2.5,
            "gate_mean/0": 0.4, "gate_mean/1": 0.6}  # fmt: skip
  (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
  (tmp_path / "report").mkdir()
  path = tmp_path / "report" / "gates.npz"
  path.write_text("garbage")
  proc = _report_cli(capsys, f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr
  assert f"warning: cannot read {path}: it is no .npz archive" in proc.stderr
  for name in ("summary.md", "gates.png", "train_loss.png"):
    assert (tmp_path / "report" / name).exists(), name
  assert glob.glob(str(tmp_path / "report" / "tb" / "events.*"))


def test_gate_panels_of_a_run_stopped_before_its_evaluation_say_so(tmp_path):
  """No gates.npz (the run stopped before its iLoRA evaluation wrote it): the two val-user
  panels say so, as val_metrics.png does for a run without metrics, instead of two empty
  unlabelled axes; with it, they plot the gates."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [{"run": "ilora", "stage": "ilora", "split": "train", "step": s, "gate_mean/0": 0.4,
            "gate_mean/1": 0.6} for s in (1, 2)]  # fmt: skip
  experts = ["gate_mean/0", "gate_mean/1"]
  fig, axes = plt.subplots(1, 3)
  report._gate_axes(axes, train, experts, str(tmp_path / "gates.npz"))
  assert len(axes[0].get_lines()) == 2 and not axes[0].texts
  for ax in axes[1:]:
    assert ax.get_title() and [t.get_text() for t in ax.texts] == [
      "no val gates recorded\n(no gates.npz: the run stopped\nbefore its iLoRA evaluation)"
    ]
  plt.close(fig)
  # A run whose records hold its final evaluation wrote one: removed since (report/ deleted
  # to rebuild it), which the note said was a run stopped before its evaluation.
  fig, axes = plt.subplots(1, 3)
  report._gate_axes(axes, train, experts, str(tmp_path / "gates.npz"), evaluated=True)
  assert [t.get_text() for t in axes[2].texts] == [
    "no gates.npz (removed since the final\nevaluation?): re-run the run's command\nto "
    "evaluate and write it again"
  ]
  plt.close(fig)
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "gates.npz", gates=rng.dirichlet([1, 1], 8), users=rng.normal(size=(8, 3)))
  fig, axes = plt.subplots(1, 3)
  report._gate_axes(axes, train, experts, str(tmp_path / "gates.npz"))
  assert not axes[1].texts and axes[1].patches and axes[2].patches
  plt.close(fig)


def _sign_p(a, b):
  """The exact two-sided sign test, written out: twice the binomial(a + b, 1/2) tail at the
  smaller count, at most 1."""
  n = a + b
  return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(a, b) + 1)) / 2**n)


def test_steps_must_be_int64_integers_and_huge_integers_are_signed_infinities():
  """`step` (TensorBoard's int64 x) is checked against both ends of int64 and is an int
  afterwards; a bool is no step. A metric too large for a float keeps its sign as an infinity."""
  for value in (2**63, -(2**63) - 1, True, False):
    with pytest.raises(UserError, match="w: step=.* must be an integer"):
      report._checked({"step": value}, "w")
  for value in (2**63 - 1, -(2**63)):
    assert report._checked({"step": value}, "w")["step"] == value
  step = report._checked({"step": 5.0}, "w")["step"]
  assert step == 5 and type(step) is int
  record = report._checked({"step": 1, "hi": 10**400, "lo": -(10**400)}, "w")
  assert record["hi"] == math.inf and record["lo"] == -math.inf


def test_number_reads_the_texts_of_non_finite_values_in_any_case():
  assert math.isnan(report.number("NaN")) and math.isnan(report.number(" nan "))
  assert report.number("Inf") == math.inf and report.number("inf") == math.inf
  assert report.number("-inf") == -math.inf and report.number("-INF") == -math.inf
  assert report.number(3) == 3.0 and type(report.number(3)) is float
  assert report.number(None) is None and report.number([1]) is None


def test_numeric_leaves_out_the_fields_that_are_not_metrics():
  record = {"run": "ilora", "stage": "ilora", "split": "val", "step": 4, "epoch": 1,
            "final": True, "skipped": 0, "candidates": 7, "selected_step": 2,
            "selected_by": 0, "hr@1": 0.5, "loss": "inf"}  # fmt: skip
  assert report._numeric(record) == {"hr@1": 0.5, "loss": math.inf}


def test_kmeans_finds_separated_blobs_for_every_seed_and_ends_at_a_fixed_point():
  """k-means++ seeding puts one centre in each of three far-apart blobs whatever the seed (a
  uniform start often puts two in one blob, and Lloyd's steps then join the other two); the
  labels are those of converged centres: each point is nearest its own cluster's mean."""
  rng = np.random.default_rng(5)
  blobs = [rng.normal(c, 0.1, (10, 2)) for c in ((0, 0), (10, 0), (20, 0))]
  x = np.concatenate(blobs)
  for seed in range(20):
    labels = report.kmeans(x, 3, seed=seed).tolist()
    parts = [set(labels[i : i + 10]) for i in (0, 10, 20)]
    assert all(len(p) == 1 for p in parts) and len(set().union(*parts)) == 3, (seed, labels)
  for seed in range(10):
    y = rng.normal(size=(30, 2))
    labels = report.kmeans(y, 3, seed=seed)
    means = {c: y[labels == c].mean(0) for c in set(labels.tolist())}
    for point, label in zip(y, labels):
      dist = {c: float(((point - m) ** 2).sum()) for c, m in means.items()}
      assert dist[label] == min(dist.values()), (seed, dist, label)


def test_parse_compare_forms():
  """Names and folders are stripped, the name ends at the first `=`, a bare folder (with a
  trailing `/`) is named by its last part, and empty entries are skipped."""
  got = report.parse_compare(" a = d1 , ,runs/plain/ ,b=x=y,")
  assert got == {"a": "d1", "plain": "runs/plain/", "b": "x=y"}
  assert report.parse_compare("") == {} and report.parse_compare(None) == {}


def test_describe_run_names_methods_from_their_config(tmp_path):
  def named(config):
    d = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    if config is not None:
      (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return report.describe_run(str(d))

  lora = {"gate": "router", "num_experts": 4, "rank": 8}
  assert named({"lora": lora, "router": {"kind": "mlp"}}) == "iLoRA (E=4, router mlp)"
  assert named({"lora": {**lora, "gate": "constant"}}) == "plain LoRA (r=8)"
  assert named({"lora": {**lora, "num_experts": 1, "rank": 4}}) == "plain LoRA (r=4)"
  assert named({"lora": {**lora, "gate": "uniform"}}) == "LoRA experts, uniform gate (E=4)"
  assert named({"stage": "sasrec", "lora": lora}) == "SASRec"
  assert named({"lora": [1], "router": "x"}) == "iLoRA (E=None, router None)"
  for config in (None, "{", "[1, 2]", "3"):  # Absent, not JSON, not an object.
    assert named(config) == "model", config


def test_finals_by_split_takes_each_splits_latest_final_ilora_record():
  def rec(run, stage, split, step, final=True):
    return {"run": run, "stage": stage, "split": split, "step": step, "final": final}

  first, later = rec("ilora", "ilora", "val", 3), rec("ilora", "ilora", "val", 6)
  evaluated = rec("evaluate", "ilora", "test", 6)
  records = [first, rec("ilora", "ilora", "val", 5, final=False), later, evaluated,
             rec("sasrec", "sasrec", "val", 9)]  # fmt: skip
  assert report.finals_by_split(records) == {"val": later, "test": evaluated}
  assert report.finals_by_split(records, run="ilora") == {"val": later}
  assert report.finals_by_split(records[:2]) == {"val": first}  # Not a later non-final one.
  assert report.finals_by_split(records[-1:]) == {}


def test_why_a_compared_run_has_no_row():
  ilora_train = {"run": "ilora", "stage": "ilora", "split": "train", "step": 1, "loss": 2.0}
  sas_val = {"run": "sasrec", "stage": "sasrec", "split": "val", "step": 9, "final": True}
  sas_test = {**sas_val, "split": "test"}
  only = ("SASRec stage only: its final val records hold no candidate fingerprint (SASRec "
          "scores every row of the split), so not comparable")  # fmt: skip
  # A whole pipeline stopped in its iLoRA stage: it has an iLoRA stage, just no final record.
  none = "no final val evaluation in W"
  assert report._no_final([sas_val, ilora_train], "val", "W", True) == none
  assert report._no_final([sas_test], "val", "W", True) == none
  assert report._no_final([{**sas_val, "split": "val", "final": False}], "val", "W", True) == none
  assert report._no_final([sas_val], "val", "W", False) == only
  assert report._no_final([sas_val], "val", "W", True) == (
    only + "; the SASRec row is SASRec on these candidates"
  )


def test_table_cells_keep_to_one_line_and_their_column():
  assert report._table_row(["a\nb  c", "x|y", 1.5]) == "| a b c | x\\|y | 1.5 |"


def test_group_table_keeps_group_1_apart_from_group_10():
  final = {"run": "ilora", "split": "val", "group/1/hr@1": 0.5, "group/10/hr@1": 0.25,
           "group/10/rows": 4}  # fmt: skip
  assert report.group_table([final])[3:] == [
    "| run | split | group | hr@1 | rows |",
    "|---|---|---|---|---|",
    "| ilora | val | 1 | 0.5000 |  |",
    "| ilora | val | 10 | 0.2500 | 4 |",
  ]


def test_paired_counts_rows_only_one_run_got():
  def rows(*pairs):
    return [{"row": i, "hit": hit, "rank": rank} for i, (hit, rank) in enumerate(pairs)]

  ours = ({"candidates": "c"}, rows((True, 0), (True, 0), (False, 2), (True, 1), (False, 0)))
  theirs = ({"candidates": "c"}, rows((False, 1), (True, 0), (False, 0), (False, 3), (True, 0)))
  # hit: rows 0 and 3 only ours, row 4 only theirs; top1: row 0 only ours, row 2 only theirs.
  assert report.paired(ours, theirs) == {"hit": (2, 1, 1.0), "top1": (1, 1, 1.0)}
  assert _sign_p(2, 0) == 0.5 and report.paired(ours, (theirs[0], rows(*[(False, 1)] * 5))) == {
    "hit": (3, 0, _sign_p(3, 0)),
    "top1": (3, 0, _sign_p(3, 0)),
  }
  assert report.paired(ours, ({"candidates": "d"}, theirs[1])) is None  # Other candidates.
  assert report.paired(ours, (theirs[0], theirs[1][:4])) is None  # Other rows.
  assert report.paired(ours, None) is None and report.paired(None, theirs) is None
  no_rank = [{"row": r["row"], "hit": r["hit"]} for r in theirs[1]]
  assert report.paired(ours, (theirs[0], no_rank)) == {"hit": (2, 1, 1.0)}  # Hits only.


def test_sign_test_matches_the_binomial_formula():
  for a, b in [(0, 0), (1, 0), (1, 1), (4, 4), (0, 6), (7, 2), (30, 12)]:
    assert report.sign_test_p(a, b) == pytest.approx(_sign_p(a, b), rel=1e-12), (a, b)
  assert report.sign_test_p(3, 0) == 0.25 and report.sign_test_p(1, 1) == 1.0


def test_empty_predictions_are_named_and_absent_ones_pair_nothing(tmp_path):
  (tmp_path / "predictions").mkdir()
  (tmp_path / "predictions" / "val.jsonl").write_text("")
  with pytest.raises(UserError, match=r"val.jsonl holds no record"):
    report.read_predictions(str(tmp_path), "val")
  assert report.read_predictions(str(tmp_path), "test") is None  # Absent.


def test_no_comparison_lines_without_compare_and_why_not_with_it():
  train = [{"run": "ilora", "stage": "ilora", "split": "train", "step": 1, "loss": 2.0}]
  assert report.comparison("W", train, {}) == []
  # A SASRec stage still training (no final record): not yet a SASRec-only run.
  assert report.comparison("W", [SASREC_TRAIN], {"x": "D"}) == [
    "No comparison with x: it has no final iLoRA evaluation yet.",
    "",
  ]


def test_cell_forms():
  assert report.cell(None) == "" and report.cell(0.5) == "0.5000" and report.cell(2) == "2"
  assert report.cell("nan") == "nan" and report.cell("0.25") == "0.2500"
  assert report.cell(True) == "True"  # Not 1.0000.
  assert report.cell("a long  text\nthat goes on and on") == "a long text that goe"
  assert report.cell(10**400) == "1" + "0" * 19
  assert report.cell([1, 2]) == "[1, 2]"


@pytest.mark.parametrize(
  "case", ["no_rows", "no_experts", "npy", "junk", "no_users", "rows_differ", "three_d"]
)
def test_unusable_gates_files_are_one_error(tmp_path, case):
  path = str(tmp_path / "gates.npz")
  arrays = {
    "no_rows": {"gates": np.zeros((0, 2)), "users": np.zeros((0, 3))},
    "no_experts": {"gates": np.zeros((3, 0)), "users": np.zeros((3, 2))},
    "no_users": {"gates": np.zeros((3, 2))},
    "rows_differ": {"gates": np.zeros((3, 2)), "users": np.zeros((2, 2))},
    "three_d": {"gates": np.zeros((3, 2, 1)), "users": np.zeros((3, 2))},
  }
  if case == "npy":
    with open(path, "wb") as f:
      np.save(f, np.zeros((3, 2)))
  elif case == "junk":
    with open(path, "wb") as f:
      f.write(b"\x00garbage, not written by numpy")
  else:
    np.savez(path, **arrays[case])
  with pytest.raises(UserError, match=re.escape(path)) as info:
    report.read_gates(path)
  if case in ("npy", "junk"):  # Not called a pickle, as numpy would.
    # stage=evaluate writes no gates.npz: the run's own command does (the error-message audit).
    assert str(info.value) == (f"cannot read {path}: it is no .npz archive; remove it, or re-run "
                               "the run's own command (its final evaluation writes it again; "
                               "stage=evaluate does not)")  # fmt: skip
  if case == "no_users":
    assert str(info.value) == (
      f"cannot read {path} (KeyError: 'users is not a file in the archive'); remove it, or "
      "re-run the run's own command (its final evaluation writes it again; stage=evaluate "
      "does not)"
    )


def test_compare_curves_choose_runs_and_records(tmp_path):
  """This run without a final val record yet: a compared run is plotted whatever its
  candidates; a run with val losses only has a curve; an `evaluate` run's record (a later
  re-evaluation) is no point of the val curve; a run of under 20 steps is its own running
  mean (a window of one step)."""
  base = {"run": "ilora", "stage": "ilora"}
  loss = [2.0, 1.5, "nan", 1.0, 0.5]
  ours = [{**base, "split": "train", "step": s + 1, "loss": v} for s, v in enumerate(loss)]
  ours.append({**base, "split": "val", "step": 5, "loss": 1.25})
  final = {**base, "split": "val", "step": 4, "final": True, "candidates": "abc", "loss": 1.75}
  theirs = [{**base, "split": "val", "step": 4, "loss": 1.75}, final,
            {**final, "run": "evaluate", "loss": 9.0, "selected_step": 4}]  # fmt: skip
  (tmp_path / "theirs").mkdir()
  (tmp_path / "theirs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in theirs))
  curves = report.comparison_curves(str(tmp_path), ours, {"t": str(tmp_path / "theirs")})
  assert list(curves) == ["model, this run", "t: model"]
  mine, other = curves.values()
  steps, mean = mine["train"]
  assert steps.tolist() == [1, 2, 3, 4, 5]
  np.testing.assert_array_equal(mean, [2.0, 1.5, np.nan, 1.0, 0.5])
  assert mine["val"][0].tolist() == [5] and mine["val"][1].tolist() == [1.25]
  assert len(other["train"][0]) == 0 and len(other["train"][1]) == 0
  assert other["val"][0].tolist() == [4, 4] and other["val"][1].tolist() == [1.75, 1.75]


def test_running_mean_by_hand():
  np.testing.assert_allclose(report.running_mean([1.0, 2.0, 4.0, 8.0], 2), [1, 1.5, 3, 6])
  np.testing.assert_allclose(report.running_mean([1.0, 2.0, 4.0], 1), [1, 2, 4])


def test_a_final_of_earlier_weights_is_reported_at_their_step(tmp_path, monkeypatch):
  """A final record of the weights `select_by` picked at an earlier step: the summary notes
  that step (in both tables), TensorBoard puts it at that step, and the val plot leaves it out
  (its values are that step's val record's). A final at its own step gets no note. The main
  table has neither the fields that name a record nor per-group metrics (they have a table of
  their own)."""
  base = {"run": "ilora", "stage": "ilora"}
  records = [{**base, "split": "train", "step": s, "loss": 2.0, "epoch": 0} for s in (1, 2)]
  records += [
    {**base, "split": "val", "step": 1, "hr@1": 0.5, "loss": 1.0},
    {**base, "split": "val", "step": 2, "hr@1": 0.25, "loss": 1.5},
    {**base, "split": "val", "step": 2, "final": True, "candidates": "abc", "hr@1": 0.5,
     "loss": 1.0, "selected_step": 1, "selected_by": "hr@1", "group/0/hr@1": 0.75},
    {**base, "split": "test", "step": 2, "final": True, "candidates": "abc", "hr@1": 0.125,
     "selected_step": 2, "selected_by": "hr@1"},
  ]  # fmt: skip
  # A later stage=evaluate of the same weights: its own TensorBoard tags (it landed on the
  # training run's final tags, two values at one step).
  evaluation = {**records[-1], "run": "evaluate", "hr@1": 0.25}
  ours, other = tmp_path / "ours", tmp_path / "other"
  for d, recs in ((ours, [*records, evaluation]), (other, records[-2:])):
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  plotted, plot = [], report._plot_series

  def plot_series(ax, recs, key, label):
    plotted.append((key, [(r["split"], r["step"]) for r in recs]))
    return plot(ax, recs, key, label)

  monkeypatch.setattr(report, "_plot_series", plot_series)
  out = report.write(str(ours), {"other": str(other)})
  lines = open(f"{out}/summary.md").read().splitlines()
  note = " (weights of step 1, best val hr@1)"
  assert f"| model, this run{note} |  |  |  | 0.5000 |  |  |  |" in lines
  start = lines.index("## Every final metric")
  assert lines[start + 2 : start + 6] == [
    "| run | stage | split | step | hr@1 | loss |",
    "|---|---|---|---|---|---|",
    f"| ilora | ilora | val | 2{note} | 0.5000 | 1.0000 |",
    "| ilora | ilora | test | 2 | 0.1250 |  |",
  ]
  assert start > lines.index("## val: methods on the same candidates (fingerprint abc, step 2)")
  assert "| ilora | val | 0 | 0.7500 |" in lines
  assert ("hr@1", [("val", 1), ("val", 2)]) in plotted  # The val plot: not the final.
  (events,) = glob.glob(f"{out}/tb/events.*")
  assert sorted(_events(events)) == sorted(
    [
      ("ilora/train/loss", 1, 2.0),
      ("ilora/train/loss", 2, 2.0),
      ("ilora/val/hr_1", 1, 0.5),
      ("ilora/val/loss", 1, 1.0),
      ("ilora/val/hr_1", 2, 0.25),
      ("ilora/val/loss", 2, 1.5),
      ("ilora/val_final/hr_1", 1, 0.5),  # At the weights' step.
      ("ilora/val_final/loss", 1, 1.0),
      ("ilora/val_final/group/0/hr_1", 1, 0.75),
      ("ilora/test_final/hr_1", 2, 0.125),
      ("ilora/test_evaluate/hr_1", 2, 0.25),
    ]
  )
  # compare.png's val curve: the val records' losses, not the final's (step 1's again).
  (curve,) = report.comparison_curves(str(ours), report.read_records(str(ours)), {}).values()
  assert curve["val"][0].tolist() == [1, 2] and curve["val"][1].tolist() == [1.0, 1.5]


def test_the_training_loss_plot_leaves_out_evaluations_of_the_train_split(tmp_path, monkeypatch):
  """`stage=evaluate` with eval.split=train writes a final record of split train (run
  "evaluate"): it was drawn in the training-loss curve, a point at the evaluated weights' step
  (SASRec's curve dropped there; iLoRA's drew a line back to its selected step)."""
  records = []
  for stage in ("sasrec", "ilora"):
    base = {"stage": stage, "split": "train"}
    records += [{**base, "run": stage, "step": s, "loss": 2.0 + s} for s in (5, 10)]
    records.append({**base, "run": "evaluate", "step": 5, "final": True, "loss": 0.5})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  plotted, plot = [], report._plot_series

  def plot_series(ax, recs, key, label):
    plotted.append((label, [(r["stage"], r["step"], r[key]) for r in recs if key in r]))
    return plot(ax, recs, key, label)

  monkeypatch.setattr(report, "_plot_series", plot_series)
  report.write(str(tmp_path))
  assert [points for label, points in plotted if label == "train loss"] == [
    [("sasrec", 5, 7.0), ("sasrec", 10, 12.0)],
    [("ilora", 5, 7.0), ("ilora", 10, 12.0)],
  ]


def test_one_runs_losses_alone_make_no_compare_plot(tmp_path):
  """compare.png is drawn only beside another run's losses: a compared run with none (its
  final record only) leaves it out."""
  final = {"run": "ilora", "stage": "ilora", "split": "val", "step": 2, "final": True,
           "candidates": "abc", "hr@1": 0.5}  # fmt: skip
  for name, recs in (("ours", [json.loads(GOOD), final]), ("other", [final])):
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  out = report.write(str(tmp_path / "ours"), {"other": str(tmp_path / "other")})
  assert not os.path.exists(f"{out}/compare.png")
  assert "compare.png" not in open(f"{out}/summary.md").read()


def test_a_rebuilt_report_replaces_what_the_last_one_wrote(tmp_path):
  """Rebuilt after gates.npz went away, the report drops its gates.png and keeps one TensorBoard
  event file; a record without a step (allowed) is left out of the plots, not an error."""
  no_step = {"run": "ilora", "stage": "ilora", "split": "train", "loss": 2.0}
  records = [no_step, {**no_step, "step": 1}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (tmp_path / "report").mkdir()
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "report" / "gates.npz", gates=rng.dirichlet([1, 1], 6),
           users=rng.normal(size=(6, 3)))  # fmt: skip
  out = report.write(str(tmp_path))
  assert os.path.exists(f"{out}/gates.png")
  os.remove(f"{out}/gates.npz")
  assert report.write(str(tmp_path)) == out
  assert not os.path.exists(f"{out}/gates.png")
  assert "gates.png" not in open(f"{out}/summary.md").read()
  (events,) = glob.glob(f"{out}/tb/events.*")
  assert _events(events) == [("ilora/train/loss", 1, 2.0)]


def test_help_and_a_missing_workdir(capsys):
  """--help prints the module's description and usage; without --workdir, one error line with
  the usage."""
  proc = _report_cli(capsys, "--help")
  assert proc.returncode == 0 and proc.stdout.startswith("End-of-run report: `W/report/`")
  assert proc.stdout.rstrip().endswith(
    "usage: python -m ilora_jax.report --workdir=DIR [--compare=name=DIR2,...]"
  )
  proc = _report_cli(capsys, "--compare=")
  assert_one_line_error(proc, "usage: python -m ilora_jax.report --workdir=DIR")


def test_a_compared_run_without_metrics_is_a_warning_at_the_start(tmp_path, capsys):
  """A typo in config.report.compare was found only in summary.md, after the training."""
  (tmp_path / "done").mkdir()
  (tmp_path / "done" / "metrics.jsonl").write_text(GOOD)
  report.warn_unfound_compared(
    report.parse_compare(f"ok={tmp_path / 'done'},typo={tmp_path / 'dnoe'}")
  )
  assert capsys.readouterr().err == (
    f"warning: config.report.compare: no metrics.jsonl in {tmp_path / 'dnoe'} (entry typo) "
    "yet: the report compares with it once it has a final evaluation\n"
  )
  report.warn_unfound_compared(report.parse_compare(""))
  assert capsys.readouterr().err == ""


def test_a_damaged_compared_run_is_refused_first_and_left_out_after_the_work(tmp_path, capsys):
  """A compared run whose metrics.jsonl has a bad line was found by the report at the end of
  the run: a trained run ended with exit 2, its report half rewritten, the line not naming the
  entry. `check_compared` (at a run's start, and the report command's) names it; at the end,
  damaged since, the report leaves it out with a warning and says so in summary.md."""

  def run_dir(name, hit):
    d = tmp_path / name
    d.mkdir()
    record = {"run": "ilora", "stage": "ilora", "split": "val", "step": 3, "final": True,
              "candidates": "abc", "hit_ratio@1": hit}  # fmt: skip
    (d / "metrics.jsonl").write_text(GOOD + json.dumps(record) + "\n")
    return str(d)

  ours, ok, bad = run_dir("ours", 0.5), run_dir("ok", 0.375), run_dir("bad", 0.25)
  with open(f"{bad}/metrics.jsonl", "r+") as f:
    f.write("x")  # For the first line's "{": the line no longer parses.
  with pytest.raises(UserError, match=re.escape(f"entry b: {bad}/metrics.jsonl:1: not a JSON")):
    report.check_compared(report.parse_compare(f"a={ok},b={bad}"))
  report.check_compared(report.parse_compare(f"a={ok}"))
  capsys.readouterr()
  out = report.write(ours, f"a={ok},b={bad}")
  err = capsys.readouterr().err
  assert err.startswith(f"warning: compared run b: {bad}/metrics.jsonl:1: not a JSON record"), err
  assert err.rstrip().endswith("; the report leaves it out"), err
  summary = open(f"{out}/summary.md").read()
  assert "| a: " in summary and "0.3750" in summary
  assert f"No comparison with b: its records cannot be read ({bad}/metrics.jsonl:1:" in summary
  proc = _report_cli(capsys, f"--workdir={ours}", f"--compare=a={ok},b={bad}")
  assert_one_line_error(proc, f"--compare: entry b: {bad}/metrics.jsonl:1: not a JSON record")


def test_a_report_stopped_midway_keeps_the_earlier_plots_and_scalars(tmp_path, monkeypatch):
  """A SIGTERM (or a full disk) while the report was written left a PNG of 0 bytes that
  summary.md still named, and the TensorBoard files were removed before the new ones were
  written. Each plot now replaces its file once complete; the earlier event files go once the
  new one is."""
  import errno

  import matplotlib.figure

  (tmp_path / "metrics.jsonl").write_text(GOOD)
  out = report.write(str(tmp_path))
  before = {name: (tmp_path / "report" / name).read_bytes() for name in os.listdir(out)
            if name.endswith(".png")}  # fmt: skip
  events = glob.glob(f"{out}/tb/events.*")
  assert before and len(events) == 1

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  def cut_short(self, fname, **kwargs):
    with open(fname, "wb") as f:
      f.write(b"\x89PNG")  # The start of a plot, then the disk is full.
    full_disk()

  with monkeypatch.context() as patched:
    patched.setattr(matplotlib.figure.Figure, "savefig", cut_short)
    with pytest.raises(UserError, match="cannot write the report"):
      report.write(str(tmp_path))
  for name, content in before.items():
    assert (tmp_path / "report" / name).read_bytes() == content, name
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
  with monkeypatch.context() as patched:
    patched.setattr(report._summary_writer_class(), "add_scalar", full_disk)
    with pytest.raises(UserError, match="cannot write the report"):
      report.write(str(tmp_path))
  assert set(events) < set(glob.glob(f"{out}/tb/events.*"))  # The earlier file kept.
  report.write(str(tmp_path))
  (latest,) = glob.glob(f"{out}/tb/events.*")  # A complete report leaves its own alone.
  assert [tag for tag, _, _ in _events(latest)] == ["ilora/train/loss"]


def test_a_damaged_config_json_is_a_warning_not_a_silent_model(tmp_path, capsys):
  """The report named a run whose config.json could not be read "model" without a word."""
  (tmp_path / "metrics.jsonl").write_text(GOOD)
  report.write(str(tmp_path))
  assert capsys.readouterr().err == ""  # No config.json at all: nothing to say.
  for damaged in ("{bad", "[1, 2]"):
    (tmp_path / "config.json").write_text(damaged)
    report.write(str(tmp_path))
    assert capsys.readouterr().err == (
      f"warning: {tmp_path}/config.json cannot be read as a JSON object: the report names "
      'this run "model", not by its method\n'
    )


def test_an_evaluation_keeps_the_comparison_the_run_was_trained_with(tmp_path):
  """stage=evaluate rebuilds the report: without config.report.compare it dropped the run's
  comparison rows and compare.png; it now takes the run's config.json's, its own if given."""
  assert report.run_compare(str(tmp_path), "") == ""  # No config.json.
  (tmp_path / "config.json").write_text(json.dumps({"report": {"compare": "lora=/runs/lora"}}))
  assert report.run_compare(str(tmp_path), "") == "lora=/runs/lora"
  assert report.run_compare(str(tmp_path), "b=/runs/b") == "b=/runs/b"
  for damaged in ("[", '{"report": {"compare": 3}}', '{"report": null}'):
    (tmp_path / "config.json").write_text(damaged)
    assert report.run_compare(str(tmp_path), "") == ""
