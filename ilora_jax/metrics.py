"""Ranking metrics over fixed candidate sets, and the metrics.jsonl log."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from ilora_jax.files import atomic_write


def target_ranks(scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
  """0-based rank of the target among the candidates.

  Args:
    scores: [rows, candidates] higher is better.
    target_index: [rows] position of the target.

  Returns:
    [rows] int: number of candidates scored strictly higher than the target, plus half
    of the other candidates tied with it, rounded up, so ties are not rewarded (a target
    tied at the top with one other, two items of one title say, is no hit at 1). A NaN
    score counts as the worst: a NaN target ranks last, a NaN candidate below every number
    (`nonfinite_rows` counts the rows that hold one, for a warning).
  """
  scores = np.asarray(scores, dtype=np.float64)
  rows = np.arange(scores.shape[0])
  nan = np.isnan(scores)
  target = scores[rows, target_index][:, None]
  higher = ((scores > target) & ~nan).sum(-1)
  ties = ((scores == target) & ~nan).sum(-1) - 1
  return np.where(nan[rows, target_index], scores.shape[1] - 1, higher + (ties + 1) // 2)


def nonfinite_rows(scores: np.ndarray) -> int:
  """Rows of `scores` holding a NaN or an infinity: a model that gives them is broken (NaN
  or overflowing weights) and its ranking metrics say little."""
  return int((~np.isfinite(np.asarray(scores, dtype=np.float64))).any(-1).sum())


def warn_nonfinite(scores: np.ndarray, who: str, metrics: dict, advice: str) -> None:
  """Adds `nonfinite_rows` to `metrics` and warns on stderr, with `advice`, when `scores`
  hold any."""
  bad = nonfinite_rows(scores)
  if bad:
    from ilora_jax import console

    metrics["nonfinite_rows"] = bad
    console.info(
      f"warning: {who} gave NaN or infinite scores in {bad} of {len(scores)} rows (a NaN "
      f"ranks last): {advice}"
    )


def ranking_metrics(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
  """HR@k and NDCG@k (one relevant item) and MRR from 0-based ranks."""
  ranks = np.asarray(ranks)
  out: dict[str, float] = {}
  for k in ks:
    hit = ranks < k
    out[f"hr@{k}"] = float(hit.mean())
    if k > 1:
      out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
  out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
  return out


class MetricsLog:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl` (process 0 only)."""

  # What a failed write leaves, in its error: training's checkpoints; an evaluation's
  # metrics, printed before they are recorded (`EVALUATION`).
  TRAINING = (
    "checkpoints written so far are kept: free space or fix permissions and re-run to resume"
  )
  EVALUATION = (
    "the metrics are printed above: free space or fix permissions and re-run the evaluation to "
    "record them"
  )

  def __init__(self, workdir: str, enabled: bool = True, advice: str = TRAINING):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.advice = advice
    self._cut: tuple[str, int] | None = None  # A `truncate` not yet written to the file.
    self._held: list[dict] | None = None  # Records kept back by `hold`.

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    clean = {k: plain(v) for k, v in record.items()}
    if self._held is not None:
      self._held.append(clean)
      return
    self.settle()
    try:
      _drop_cut_last_line(self.path)
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(clean, sort_keys=False) + "\n")
    except OSError as exc:
      from ilora_jax.errors import UserError

      raise UserError(
        f"cannot append to {self.path}: {exc.strerror or exc}; {self.advice}"
      ) from None

  def records(self) -> list[dict]:
    return self._written() + list(self._held or [])

  def _written(self) -> list[dict]:
    """The file's records, less those a pending `truncate` drops."""
    records = [record for _, record in read_jsonl(self.path)]
    return records if self._cut is None else _cut(records, *self._cut)

  def hold(self) -> None:
    """Keeps the records written from here in memory until `release`: a stage's last
    evaluations reach the file together, after the last of them, with a pending cut, so an
    interrupted evaluation of a finished run run again leaves its earlier records."""
    if self.enabled:
      self._held = []

  def release(self) -> None:
    """Writes the records `hold` kept back."""
    held, self._held = self._held or [], None
    for record in held:
      self.write(record)

  def count(self, run: str) -> int:
    """Number of records written by training run `run` (a stage's training loop)."""
    return sum(1 for r in self.records() if r.get("run") == run)

  def truncate(self, run: str, keep: int) -> None:
    """Keeps only the first `keep` records of `run` (those covered by the restored checkpoint).

    Records of other runs (other stages, separate evaluations) are kept as they are. `records`
    and `count` leave the others out at once; the file loses them at this log's next `write`
    (or `settle`): a resume interrupted before it records anything leaves the file as it was
    (a finished run's final evaluations, evaluated again, stay until the new ones come).
    """
    if not self.enabled:
      return
    self.settle()
    have = self.count(run) if keep else 0  # Nothing to count against: no read.
    if have < keep:  # Shortened or removed since the checkpoint: a gap a resume cannot fill.
      from ilora_jax import console

      console.info(
        f"warning: {self.path} holds {have} of the {keep} records of the {run} stage that its "
        "checkpoint counts (shortened or removed since): the missing ones are lost, the run "
        "goes on recording from here"
      )
    self._cut = (run, keep)

  def settle(self) -> None:
    """Writes a pending `truncate` to the file."""
    if self._cut is None:
      return
    kept = self._written()
    self._cut = None
    if not os.path.exists(self.path):
      return
    try:
      with atomic_write(self.path, encoding="utf-8") as f:
        for record in kept:
          f.write(json.dumps(record) + "\n")
    except OSError as exc:
      from ilora_jax.errors import UserError

      raise UserError(f"cannot rewrite {self.path}: {exc.strerror or exc}; {self.advice}") from None


def _cut(records: list[dict], run: str, keep: int) -> list[dict]:
  """`records` without those of `run` past its first `keep`."""
  kept, seen = [], 0
  for record in records:
    if record.get("run") == run:
      seen += 1
      if seen > keep:
        continue
    kept.append(record)
  return kept


def read_jsonl(path: str, on_cut=None) -> list[tuple[int, object]]:
  """(line number, parsed value) for each non-blank line of the JSON-lines file `path`
  ([] when absent); the one reader of `metrics.jsonl` for resuming, reports and grids.

  A last line without its newline that does not parse is skipped: a job writing right now, or
  one killed in the middle of a write, leaves it cut, and the run rewrites that record when it
  resumes. Any other line that does not parse is a `UserError` naming the file and line: the
  log is written one whole line at a time, so a bad line elsewhere means a damaged or
  hand-edited file, and a resume, report or table without that record would be silently wrong.
  `on_cut`, when given, is called with the skipped line's number.
  """
  from ilora_jax.errors import UserError

  if not os.path.lexists(path):
    return []
  if not os.path.isfile(path):
    raise UserError(f"{path} is not a file")
  try:
    with open(path, "rb") as f:
      lines = f.read().split(b"\n")
  except OSError as exc:
    raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
  out = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      out.append((number, json.loads(line)))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError.
      if number == len(lines):  # No newline after it: cut by a kill mid-write.
        if on_cut is not None:
          on_cut(number)
        break
      reason = " ".join(str(exc).split())[:80]
      raise UserError(
        f"{path}:{number}: not a JSON record ({reason}); only a cut last line is skipped: "
        "fix or remove that line"
      ) from None
  return out


def _drop_cut_last_line(path: str) -> None:
  """Mends a last line that lacks its newline (a write cut by a kill) so that the next record
  starts a line of its own: a complete record gets its newline (`records` counted it), a cut
  one is removed (`records` skipped it)."""
  try:
    f = open(path, "rb+")
  except FileNotFoundError:
    return
  with f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    data = f.read()
    start = data.rfind(b"\n") + 1
    try:
      json.loads(data[start:].decode("utf-8"))
    except ValueError:
      f.truncate(start)
    else:
      f.write(b"\n")


def plain(value):
  """A JSON-ready scalar: numpy scalars as Python numbers, a non-finite float as its text."""
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if hasattr(value, "item") and getattr(value, "shape", None) == ():
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def plain_tree(value):
  """`plain` through nested dicts, lists and tuples: what `json.dump(..., allow_nan=False)`
  writes (JSON has no NaN; the log's texts "nan", "inf", "-inf" stand for them)."""
  if isinstance(value, dict):
    return {k: plain_tree(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain_tree(v) for v in value]
  return plain(value)


def match_generation(
  text: str, candidate_titles: list[str], target_index: int
) -> tuple[bool, bool]:
  """The paper's metric for one row: (valid, hit).

  The first line of the generated text, lower-cased, is valid when exactly one candidate
  title (lower-cased) occurs in it as a substring; a hit when that title is the target.
  """
  first = text.strip().split("\n", 1)[0].strip().lower() if text.strip() else ""
  if not first:
    return False, False
  found = [k for k, title in enumerate(candidate_titles) if title.lower() in first]
  valid = len(found) == 1
  return valid, valid and found[0] == target_index


def generation_metrics(valid: np.ndarray, hit: np.ndarray) -> dict[str, float]:
  """ValidRatio, HitRatio@1 = hits / valid (the paper's definition) and hits / total."""
  valid, hit = np.asarray(valid, bool), np.asarray(hit, bool)
  total = max(len(valid), 1)
  n_valid = int(valid.sum())
  return {
    "valid_ratio": n_valid / total,
    "hit_ratio@1": float(hit.sum()) / n_valid if n_valid else 0.0,
    "hits_over_total": float(hit.sum()) / total,
  }
