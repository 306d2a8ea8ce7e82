"""Ranking metrics against hand-computed values."""

import math
import os

import numpy as np
import pytest

from ilora_jax.metrics import nonfinite_rows, ranking_metrics, target_ranks


def test_ranks_by_hand():
  scores = np.array([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
  target = np.array([2, 0, 1])
  # Row 0: one higher -> 1. Row 1: none -> 0. Row 2: two ties -> half of them -> 1.
  np.testing.assert_array_equal(target_ranks(scores, target), [1, 0, 1])


def test_odd_numbers_of_ties_round_up_by_hand():
  """The tie rule with 1 and 3 other candidates tied with the target: rank = strictly higher
  + ceil(ties / 2) (the rows above only had 0 or 2 ties, where rounding is moot). Rounded
  down, a target tied at the top with one other (two items of one title) was a hit at 1."""
  scores = np.array(
    [[1.0, 1.0, 0.0, -1.0, -2.0, -3.0], [2.0, 1.0, 1.0, 0.5, 0.0, -1.0],
     [1.0, 1.0, 1.0, 1.0, 0.0, -1.0], [5.0, 3.0, 3.0, 3.0, 3.0, 9.0]]
  )  # fmt: skip
  target = np.array([0, 2, 3, 1])
  # Row 0: none higher, 1 tie (index 1) -> 0 + ceil(1 / 2) = 1.
  # Row 1: 2.0 higher, 1 tie (index 1) -> 1 + ceil(1 / 2) = 2.
  # Row 2: none higher, 3 ties (indices 0, 1, 2) -> 0 + ceil(3 / 2) = 2.
  # Row 3: 5.0 and 9.0 higher, 3 ties (indices 2, 3, 4) -> 2 + ceil(3 / 2) = 4.
  ranks = target_ranks(scores, target)
  np.testing.assert_array_equal(ranks, [1, 2, 2, 4])
  m = ranking_metrics(ranks, ks=(1, 3, 5))
  assert m["hr@1"] == 0 and m["hr@3"] == 3 / 4 and m["hr@5"] == 1.0
  assert math.isclose(m["ndcg@3"], (1 / math.log2(3) + 2 / math.log2(4)) / 4)
  assert math.isclose(m["ndcg@5"], (1 / math.log2(3) + 2 / math.log2(4) + 1 / math.log2(6)) / 4)
  assert math.isclose(m["mrr"], (1 / 2 + 1 / 3 + 1 / 3 + 1 / 5) / 4)


def test_nan_scores_rank_worst_by_hand():
  """A broken model's NaN scores are never a hit: a NaN target ranks last (rank 3 of 4
  candidates), a NaN candidate below every number; an all-NaN row ranks its target last."""
  nan = float("nan")
  scores = np.array(
    [[nan, 0.9, 0.5, 0.1], [3.0, nan, 2.0, 1.0], [nan] * 4, [0.2, -np.inf, 0.1, np.inf],
     [-np.inf, nan, nan, 0.0]]
  )  # fmt: skip
  target = np.array([0, 0, 2, 0, 0])
  # Row 0: NaN target -> 3. Row 1: target highest, NaN below it -> 0. Row 2: NaN target -> 3.
  # Row 3: +inf is higher, -inf lower -> 1 (infinities are numbers; only counted as non-finite).
  # Row 4: a -inf target: 0.0 is higher, the NaNs are below even -inf (not ties) -> 1.
  np.testing.assert_array_equal(target_ranks(scores, target), [3, 0, 3, 1, 1])
  assert nonfinite_rows(scores) == 5
  assert nonfinite_rows(scores[:, 2:3]) == 2
  m = ranking_metrics(target_ranks(scores, target))
  assert m["hr@1"] == 0.2 and math.isclose(m["mrr"], (1 / 4 + 1 + 1 / 4 + 1 / 2 + 1 / 2) / 5)


def test_non_finite_scores_are_counted_and_warned(capsys):
  from ilora_jax.metrics import warn_nonfinite

  clean: dict = {}
  warn_nonfinite(np.ones((3, 4)), "model", clean, "advice")
  assert clean == {} and capsys.readouterr().err == ""
  out: dict = {}
  scores = np.array([[1.0, np.nan], [2.0, 3.0], [np.inf, 0.0]])
  warn_nonfinite(scores, "SASRec on val", out, "retrain it")
  assert out == {"nonfinite_rows": 2}
  err = capsys.readouterr().err.splitlines()
  assert err == [
    "warning: SASRec on val gave NaN or infinite scores in 2 of 3 rows (a NaN ranks last): "
    "retrain it"
  ]


def test_hr_ndcg_mrr_by_hand():
  ranks = np.array([0, 1, 4, 7])
  m = ranking_metrics(ranks)
  # The SASRec report's four numbers, no more: NDCG@1 would only repeat HR@1.
  assert sorted(m) == ["hr@1", "hr@5", "mrr", "ndcg@5"]
  assert m["hr@1"] == 0.25
  assert m["hr@5"] == 0.75
  expected_ndcg = (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4
  assert math.isclose(m["ndcg@5"], expected_ndcg)
  assert math.isclose(m["mrr"], (1 + 1 / 2 + 1 / 5 + 1 / 8) / 4)


def test_generation_matching_by_hand():
  from ilora_jax.metrics import generation_metrics, match_generation

  titles = ["Heat", "Alien", "Aliens", "Fargo"]
  assert match_generation(" Fargo\nHeat", titles, 3) == (True, True)
  assert match_generation("FARGO (1996)", titles, 3) == (True, True)  # case, extra text
  assert match_generation("Heat", titles, 3) == (True, False)  # valid, wrong
  assert match_generation("Heat or Fargo", titles, 3) == (False, False)  # two matches
  assert match_generation("Aliens", titles, 2) == (False, False)  # substring: Alien too
  assert match_generation("Brazil", titles, 0) == (False, False)  # none
  assert match_generation("\n", titles, 0) == (False, False)
  # The first line of the stripped output (REFERENCE.md, Evaluation): blank lines before the
  # answer are skipped, and only the answer's own line counts.
  assert match_generation("\n\nFargo\nHeat", titles, 3) == (True, True)
  assert match_generation("  \n Fargo", titles, 3) == (True, True)
  assert match_generation("\n \nHeat\nFargo", titles, 3) == (True, False)
  m = generation_metrics([True, True, False, True], [True, False, False, True])
  assert m == {"valid_ratio": 0.75, "hit_ratio@1": 2 / 3, "hits_over_total": 0.5}


def test_metrics_log_drops_a_cut_last_line_and_refuses_a_damaged_middle(tmp_path):
  from ilora_jax.errors import UserError
  from ilora_jax.metrics import MetricsLog

  log = MetricsLog(str(tmp_path))
  log.write({"run": "ilora", "step": 1})
  with open(log.path, "a") as f:
    f.write('{"run": "ilora", "st')  # A kill in the middle of a write.
  assert log.records() == [{"run": "ilora", "step": 1}]
  log.write({"run": "ilora", "step": 2})  # Starts its own line: the cut one is gone.
  assert log.records() == [{"run": "ilora", "step": 1}, {"run": "ilora", "step": 2}]
  with open(log.path, "a") as f:
    f.write('{"run": "ilora", "step": 3}')  # Cut just before its newline: a whole record.
  assert len(log.records()) == 3
  log.write({"run": "ilora", "step": 4})
  assert [r["step"] for r in log.records()] == [1, 2, 3, 4]
  log.truncate("ilora", 1)
  log.settle()
  assert open(log.path).read() == '{"run": "ilora", "step": 1}\n'
  with open(log.path, "a") as f:
    f.write('{"broken\n{"run": "ilora", "step": 3}\n')
  with pytest.raises(UserError, match="metrics.jsonl:2: not a JSON record"):
    log.records()


def test_truncate_keeps_every_record_of_other_runs_byte_for_byte(tmp_path):
  """A resumed iLoRA stage cuts its own records back to its checkpoint; the SASRec stage's
  records and a separate evaluation's, before and between them, stay as they were."""
  from ilora_jax.metrics import MetricsLog

  lines = [
    '{"run": "sasrec", "stage": "sasrec", "step": 1, "loss": 0.5}',
    '{"run": "sasrec", "stage": "sasrec", "step": 2, "loss": 0.25}',
    '{"run": "ilora", "stage": "ilora", "step": 1, "loss": 2.5}',
    '{"run": "sasrec", "stage": "sasrec", "step": 3, "final": true, "hr@1": 0.125}',
    '{"run": "evaluate", "stage": "ilora", "split": "test", "hr@1": 0.75}',
    '{"run": "ilora", "stage": "ilora", "step": 2, "loss": 1.5}',
    '{"run": "ilora", "stage": "ilora", "step": 3, "loss": 1.25}',
  ]
  (tmp_path / "metrics.jsonl").write_bytes("".join(f"{line}\n" for line in lines).encode())
  log = MetricsLog(str(tmp_path))
  log.truncate("ilora", 1)
  log.settle()
  kept = [lines[0], lines[1], lines[2], lines[3], lines[4]]  # iLoRA's steps 2 and 3 go.
  assert (tmp_path / "metrics.jsonl").read_bytes() == "".join(f"{x}\n" for x in kept).encode()
  log.truncate("sasrec", 0)
  log.settle()
  kept = [lines[2], lines[4]]
  assert (tmp_path / "metrics.jsonl").read_bytes() == "".join(f"{x}\n" for x in kept).encode()
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_a_log_shorter_than_the_checkpoint_counts_is_warned_of(tmp_path, capsys):
  """A metrics.jsonl shortened or removed after the checkpoint: the resume went on without a
  word (an audit), its records with a gap. It still goes on, and a line names the gap."""
  from ilora_jax.metrics import MetricsLog

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"run": "sasrec", "step": 1}\n{"run": "ilora", "step": 1}\n')
  log = MetricsLog(str(tmp_path))
  log.truncate("ilora", 1)
  log.truncate("sasrec", 0)
  assert capsys.readouterr().err == ""
  log.truncate("ilora", 3)
  assert capsys.readouterr().err == (
    f"warning: {path} holds 1 of the 3 records of the ilora stage that its checkpoint counts "
    "(shortened or removed since): the missing ones are lost, the run goes on recording from "
    "here\n"
  )
  path.unlink()
  log.truncate("sasrec", 2)
  assert "holds 0 of the 2 records of the sasrec stage" in capsys.readouterr().err


def test_a_cut_reaches_the_file_only_with_the_next_record(tmp_path):
  """A finished run evaluated again and interrupted (Ctrl-C) before its first new record lost
  its final records (seen by an audit: 433 lines to 430, the report then without them). The
  cut of a resume is seen by `records` and `count` at once and written with the next record;
  a second cut before any record applies both."""
  from ilora_jax.metrics import MetricsLog

  path = tmp_path / "metrics.jsonl"
  lines = [
    '{"run": "sasrec", "step": 1}',
    '{"run": "ilora", "step": 1}',
    '{"run": "ilora", "step": 2, "final": true}',
    '{"run": "sasrec", "step": 2, "final": true}',
  ]
  path.write_text("".join(f"{line}\n" for line in lines))
  log = MetricsLog(str(tmp_path))
  log.truncate("ilora", 1)
  assert path.read_text() == "".join(f"{line}\n" for line in lines)  # An interrupt here.
  assert [(r["run"], r["step"]) for r in log.records()] == [("sasrec", 1), ("ilora", 1),
                                                            ("sasrec", 2)]  # fmt: skip
  assert log.count("ilora") == 1
  log.truncate("sasrec", 1)  # The first cut is written before the second is taken.
  assert log.records() == [{"run": "sasrec", "step": 1}, {"run": "ilora", "step": 1}]
  log.write({"run": "ilora", "step": 2, "final": True})
  assert path.read_text() == (
    '{"run": "sasrec", "step": 1}\n{"run": "ilora", "step": 1}\n'
    '{"run": "ilora", "step": 2, "final": true}\n'
  )
  MetricsLog(str(tmp_path), enabled=False).truncate("ilora", 0)  # Another process's: no cut.
  assert len(log.records()) == 3


def test_held_records_reach_the_file_together_with_the_cut(tmp_path):
  """A stage's last evaluations (an epoch's val record, then the final val and test, each
  after a long evaluation) are held and written together: an interrupt between them, when a
  finished run is evaluated again, leaves the file as it was; `records` sees them at once."""
  from ilora_jax.metrics import MetricsLog

  path = tmp_path / "metrics.jsonl"
  old = '{"run": "ilora", "step": 1}\n{"run": "ilora", "step": 2, "final": true}\n'
  path.write_text(old)
  log = MetricsLog(str(tmp_path))
  log.truncate("ilora", 1)
  log.hold()
  log.write({"run": "ilora", "step": 2, "split": "val"})
  log.write({"run": "ilora", "step": 2, "final": True})
  assert path.read_text() == old  # An interrupt here loses nothing.
  assert [r.get("split", r.get("final")) for r in log.records()] == [None, "val", True]
  log.release()
  assert path.read_text() == (
    '{"run": "ilora", "step": 1}\n{"run": "ilora", "step": 2, "split": "val"}\n'
    '{"run": "ilora", "step": 2, "final": true}\n'
  )
  log.write({"run": "ilora", "step": 3})  # Released: written at once.
  assert path.read_text().endswith('{"run": "ilora", "step": 3}\n')


def test_a_rewrite_that_fails_is_one_error_with_the_advice(tmp_path, monkeypatch):
  """A resume on a read-only mount rewrote metrics.jsonl (its records past the checkpoint
  dropped) and ended as an unexpected OSError."""
  import contextlib
  import errno

  from ilora_jax import metrics
  from ilora_jax.errors import UserError

  log = metrics.MetricsLog(str(tmp_path))
  log.write({"run": "ilora", "step": 1})

  @contextlib.contextmanager
  def read_only(path, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", path)
    yield

  monkeypatch.setattr(metrics, "atomic_write", read_only)
  log.truncate("ilora", 0)
  with pytest.raises(UserError) as raised:
    log.settle()
  assert str(raised.value) == (
    f"cannot rewrite {log.path}: Read-only file system; {metrics.MetricsLog.TRAINING}"
  )
