"""End-of-run report: `W/report/` with plots, `summary.md` and TensorBoard event files.

Everything is derived from `W/metrics.jsonl` (and, for the gate plots, `W/report/gates.npz`
written by the iLoRA stage), so a report can be rebuilt at any time:

  python -m ilora_jax.report --workdir=W [--compare=plain_lora=W2,...]

Without --compare, the report compares with the runs the run itself named
(`config.report.compare` in W/config.json); `--compare=` compares with none.

`summary.md` also has a comparison table per split: this run's model, the baselines it
evaluated on the same candidates (base LLM, SASRec) and the final metrics of other runs named
by `compare` (`config.report.compare`), e.g. a plain-LoRA run (`--config.lora.num_experts=1
--config.lora.gate=constant`). A run is only compared when its candidate fingerprint equals
this run's (same data, split, rows, `data.candidate_seed` and prompt templates); otherwise
the row says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import zipfile
from collections import defaultdict

import numpy as np

from ilora_jax import metrics
from ilora_jax.errors import UserError, counted, require
from ilora_jax.files import atomic_path, atomic_write

# Record fields that are not metrics (selected_step/_by: which weights a final record evaluated).
_SKIP = {"run", "stage", "split", "step", "epoch", "final", "skipped", "candidates",
         "selected_step", "selected_by", "rows"}  # fmt: skip
# Columns of the comparison table: the paper's generation metrics, then candidate scoring.
COMPARE_KEYS = ("valid_ratio", "hit_ratio@1", "hits_over_total", "hr@1", "hr@5", "ndcg@5", "mrr")


_TEXT_KEYS = ("run", "stage", "split")  # Strings where present: they name groups and tags.
_INT64 = 2**63  # TensorBoard steps are int64.
GROUP_KEY = re.compile(r"group/(\d+)/(.+)")  # Per-user-group metrics: group/<g>/<metric>.


_SAID_CUT: set[tuple[str, int]] = set()  # Cut last lines warned of (path, line), once each.


def read_records(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl` ([] when absent), each checked for a usable `step`
  and string names; a cut last line is skipped (see `metrics.read_jsonl`) with a warning."""
  path = os.path.join(workdir, "metrics.jsonl")

  def cut(number: int) -> None:
    from ilora_jax import console

    if (path, number) in _SAID_CUT:  # A grid's tables read a run's records more than once.
      return
    _SAID_CUT.add((path, number))
    console.info(
      f"warning: {path}:{number} is cut (a run writing it now, or one killed mid-write, which "
      "rewrites it when resumed): that record is left out"
    )

  return [_checked(record, f"{path}:{n}") for n, record in metrics.read_jsonl(path, cut)]


def _checked(record, where: str) -> dict:
  """`record` if it is a JSON object with a usable `step` and string names; integers too large
  for a float become +-inf (as the log writes other non-finite values)."""
  if not isinstance(record, dict):
    raise UserError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
  for key in ("step", "selected_step"):  # Steps: TensorBoard's and the plots' x values.
    if key not in record or (key == "selected_step" and record[key] is None):
      continue
    step = record[key]
    whole = isinstance(step, int) or (isinstance(step, float) and step.is_integer())
    if isinstance(step, bool) or not whole or not -_INT64 <= step < _INT64:
      raise UserError(f"{where}: {key}={json.dumps(step)[:40]} must be an integer (int64)")
    record[key] = int(step)
  for key in _TEXT_KEYS:
    if key in record and not isinstance(record[key], str):
      raise UserError(f"{where}: {key}={json.dumps(record[key])[:40]} must be a string")
  for key, value in record.items():
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INT64:
      try:
        record[key] = float(value)
      except OverflowError:
        record[key] = math.inf if value > 0 else -math.inf
  return record


# How the log writes non-finite values (`metrics.plain`): as text, since JSON has no NaN.
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def number(value) -> float | None:
  """A metric value as a float: numbers, and the texts the log writes for NaN and the
  infinities (a diverged loss stays in the report, as nan); None for anything else."""
  if isinstance(value, bool):
    return None
  if isinstance(value, int | float):
    return float(value)
  if isinstance(value, str):
    return _NON_FINITE.get(value.strip().lower())
  return None


def _numeric(record: dict) -> dict[str, float]:
  out = {}
  for k, v in record.items():
    value = None if k in _SKIP else number(v)
    if value is not None:
      out[k] = value
  return out


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
  """Cluster labels [rows] of Lloyd's k-means (k-means++ start), deterministic for a seed."""
  x = np.asarray(x, np.float64)
  k = max(1, min(k, len(x)))
  rng = np.random.default_rng(seed)
  centers = [x[rng.integers(len(x))]]
  for _ in range(1, k):
    d = np.min(((x[:, None] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
    p = d / d.sum() if d.sum() > 0 else np.full(len(x), 1 / len(x))
    centers.append(x[rng.choice(len(x), p=p)])
  centers = np.asarray(centers)
  labels = np.zeros(len(x), int)
  for _ in range(iters):
    labels = np.argmin(((x[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    new = np.array(
      [x[labels == c].mean(0) if np.any(labels == c) else centers[c] for c in range(k)]
    )
    if np.allclose(new, centers):
      break
    centers = new
  return labels


def _points(records, key) -> list[tuple[int, float]]:
  """(step, value) of the records whose `key` is a number (`number`); a non-finite value (a
  skipped step's loss) is NaN, a gap in a line."""
  pts = [(r["step"], number(r[key])) for r in records if "step" in r and key in r]
  return [(step, value if math.isfinite(value) else math.nan) for step, value in pts
          if value is not None]  # fmt: skip


def _plot_series(ax, records, key, label):
  pts = _points(records, key)
  if pts:
    steps, values = zip(*pts)
    ax.plot(steps, values, marker="o" if len(pts) < 30 else None, label=label)
  return bool(pts)


COMPARE_FORM = "comma-separated name=DIR entries (a bare DIR is named by its folder)"


def warn_unfound_compared(compare: dict[str, str]) -> None:
  """A warning line on stderr (process 0) for each run of `config.report.compare` (parsed,
  `parse_compare`) that holds no metrics.jsonl (a typo, or a relative path from another
  folder): the run goes on, and the report says the same of it."""
  from ilora_jax import console

  for name, path in unfound(compare).items():
    console.info(f"warning: config.report.compare: no metrics.jsonl in {path} (entry {name}) "
                 "yet: the report compares with it once it has a final evaluation")  # fmt: skip


def check_not_itself(compare: dict[str, str], workdir: str) -> None:
  """A UserError where `compare` names the run's own workdir (its rows beside themselves)."""
  for name, path in compare.items():
    if os.path.realpath(path) == os.path.realpath(workdir):
      raise UserError(f"{name}={path} is this run's own workdir: compare with other runs")


def check_compared(compare: dict[str, str]) -> None:
  """A UserError naming the entry of `compare` whose metrics.jsonl cannot be read (a damaged
  line): checked before a run's work, at whose end the report refused it (a trained run that
  ended with exit 2, its report half rewritten)."""
  for name, path in compare.items():
    try:
      read_records(path)
    except UserError as exc:
      raise UserError(f"entry {name}: {exc}") from None


def _read_compared(compare: dict[str, str]) -> tuple[dict, list[str]]:
  """The records of each compared run by name, and the summary's lines for those that cannot
  be read (damaged since the run began), each also a warning on stderr: the report leaves
  them out."""
  from ilora_jax import console

  theirs, lines = {}, []
  for name, path in compare.items():
    try:
      theirs[name] = read_records(path)
    except UserError as exc:
      console.info(f"warning: compared run {name}: {exc}; the report leaves it out")
      lines += [f"No comparison with {name}: its records cannot be read ({exc}).", ""]
  return theirs, lines


def unfound(compare: dict[str, str]) -> dict[str, str]:
  """The entries of `compare` ({name: workdir}) whose workdir holds no metrics.jsonl."""
  return {n: p for n, p in compare.items() if not os.path.lexists(os.path.join(p, "metrics.jsonl"))}


def parse_compare(text: str) -> dict[str, str]:
  """`name=workdir,name=workdir` -> {name: workdir}; a bare workdir is named by its folder.

  The name ends at the first `=` (a folder may hold one); names and folders must be unique.
  """
  out = {}
  for part in (p.strip() for p in (text or "").split(",")):
    if not part:
      continue
    name, eq, path = part.partition("=")
    name, path = (name.strip(), path.strip()) if eq else ("", part)
    if not path or (eq and not name):
      raise UserError(f"entry {part!r}: expected {COMPARE_FORM}")
    name = name or os.path.basename(os.path.normpath(path))
    if name in out:
      raise UserError(f"name {name!r} given twice ({out[name]} and {path}): names must differ")
    same = [n for n, p in out.items() if os.path.realpath(p) == os.path.realpath(path)]
    if same:  # Its rows twice, under two names.
      raise UserError(f"the run {path} is given twice (as {same[0]!r} and {name!r}): name it once")
    out[name] = path
  return out


def describe_run(workdir: str) -> str:
  """Short method name of a run from its `config.json` (iLoRA, plain LoRA, ...)."""
  from ilora_jax import configuration

  config = configuration.saved(workdir)
  if config is None:
    return "model"
  lora, rtr = config.get("lora"), config.get("router")
  lora, rtr = lora if isinstance(lora, dict) else {}, rtr if isinstance(rtr, dict) else {}
  gate, experts = lora.get("gate"), lora.get("num_experts")
  if config.get("stage") == "sasrec":
    return "SASRec"
  if gate == "constant" or experts == 1:
    return f"plain LoRA (r={lora.get('rank')})"
  if gate == "uniform":
    return f"LoRA experts, uniform gate (E={experts})"
  return f"iLoRA (E={experts}, router {rtr.get('kind')})"


def _warn_unread_config(workdir: str) -> None:
  """A warning where the run's config.json is there but cannot be read (damaged, a folder):
  the report names the run by its method from that file, and without it said "model" without
  a word of why."""
  from ilora_jax import configuration, console

  path = os.path.join(workdir, "config.json")
  if os.path.lexists(path) and configuration.saved(workdir) is None:
    console.info(f"warning: {path} cannot be read as a JSON object: the report names this run "
                 '"model", not by its method')  # fmt: skip


def _of_earlier_weights(record: dict) -> bool:
  """A final record of the weights `ilora.select_by` picked at an earlier step (its values are
  that step's, which has its own val record)."""
  return record.get("selected_step") not in (None, record.get("step"))


def _weights_note(record: dict) -> str:
  """ " (weights of step N, best val M)" for a record `_of_earlier_weights`, else ""."""
  if not _of_earlier_weights(record):
    return ""
  return f" (weights of step {record['selected_step']}, best val {record.get('selected_by')})"


def finals_by_split(records: list[dict], run: str | None = None) -> dict[str, dict]:
  """The latest final record per split of the ilora stage (of one `run` when given)."""
  out = {}
  for r in records:
    if r.get("final") and r.get("stage") == "ilora" and run in (None, r.get("run")):
      out[r.get("split", "?")] = r
  return out


def _no_final(records: list[dict], split: str, workdir: str, sasrec_row: bool) -> str:
  """Why a compared run has no row for `split`: no final iLoRA evaluation of it. A run with a
  SASRec stage only has final records, but without the candidate fingerprint to match
  (`sasrec_row`: this run's table has SASRec on its own candidates)."""
  sasrec = any(r.get("final") and r.get("stage") == "sasrec" and r.get("split") == split
               for r in records)  # fmt: skip
  if not sasrec or any(r.get("stage") == "ilora" for r in records):
    return f"no final {split} evaluation in {workdir}"
  where = "; the SASRec row is SASRec on these candidates" if sasrec_row else ""
  return (f"SASRec stage only: its final {split} records hold no candidate fingerprint (SASRec "
          f"scores every row of the split), so not comparable{where}")  # fmt: skip


def _table_row(cells) -> str:
  """A markdown table row of `cells`: a `|` in one (a compare name, a text in a record) is
  escaped and a line break is a space, so the row keeps its columns."""
  return "| " + " | ".join(" ".join(str(c).split()).replace("|", "\\|") for c in cells) + " |"


def group_table(finals: list[dict]) -> list[str]:
  """Markdown lines of the per-user-group metrics (`group/<g>/<metric>`) of final records."""
  rows, columns = [], []
  for r in finals:
    groups = sorted({int(m[1]) for k in r if (m := GROUP_KEY.fullmatch(k))})
    for g in groups:
      prefix = f"group/{g}/"
      vals = {k[len(prefix) :]: r[k] for k in _numeric(r) if k.startswith(prefix)}  # As written.
      columns += [k for k in vals if k not in columns]
      rows.append((r.get("run", ""), r.get("split", ""), g, vals))
  if not rows:
    return []
  lines = ["", "## Per user group", ""]
  lines.append(_table_row(["run", "split", "group", *columns]))
  lines.append("|---" * (3 + len(columns)) + "|")
  for run, split, g, vals in rows:
    cells = [cell(vals.get(k)) for k in columns]
    lines.append(_table_row([run, split, g, *cells]))
  return lines


_PAIRED = {"hit": "generation hits", "top1": "top-1 by likelihood"}  # `paired`'s keys.


def sign_test_p(a: int, b: int) -> float:
  """Two-sided exact sign test (McNemar's exact test) of `a` rows won by one method and `b`
  by the other: the probability, with each of the a + b rows a fair coin, of a split at
  least as uneven."""
  n = a + b
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, k) for k in range(min(a, b) + 1)) / 2**n
  return min(1.0, 2 * tail)


PREDICTIONS = "predictions"  # DIR/predictions/<split>.jsonl: each row of a final evaluation.


def predictions_path(workdir: str, split: str) -> str:
  return os.path.join(workdir, PREDICTIONS, f"{split}.jsonl")


def read_predictions(workdir: str, split: str) -> tuple[dict, list[dict]] | None:
  """(head, rows) of DIR/predictions/<split>.jsonl, or None when absent; a damaged file (a
  line that is no JSON object, a row whose `row`, `hit` or `rank` is of another type, no
  line at all, a file in place of the folder) is a UserError naming it."""
  path = predictions_path(workdir, split)
  folder = os.path.dirname(path)
  if os.path.lexists(folder) and not os.path.isdir(folder):  # Not "absent": say so.
    raise UserError(f"{folder} is not a folder")
  records = metrics.read_jsonl(path)
  if not os.path.lexists(path):
    return None
  if not records:
    raise UserError(f"{path} holds no record")
  for number, record in records:
    if not isinstance(record, dict):
      raise UserError(f"{path}:{number}: not a JSON object")
  for number, row in records[1:]:  # After the head: the rows.
    for key, ok, what in _ROW_FIELDS:
      if key in row and not ok(row[key]):
        raise UserError(f"{path}:{number}: {key}={row[key]!r} is not {what}")
  head, *rows = [record for _, record in records]
  return head, rows


def _count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# A prediction row's fields that the pairing reads: (key, check, what it must be).
_ROW_FIELDS = (("row", _count, "a count from 0"), ("hit", lambda v: isinstance(v, bool),
               "true or false"), ("rank", _count, "a count from 0"))  # fmt: skip


def paired(ours, theirs) -> dict[str, tuple[int, int, float]] | None:
  """Row by row, for generation hits (`hit`) and the likelihood's top candidate (`rank` 0):
  (rows only `ours` got, rows only `theirs` got, sign-test p). None unless both hold the
  same rows on the same candidates."""
  if ours is None or theirs is None:
    return None
  (head, rows), (their_head, their_rows) = ours, theirs
  same_rows = [r.get("row") for r in rows] == [r.get("row") for r in their_rows]
  if head.get("candidates") != their_head.get("candidates") or not same_rows:
    return None
  out = {}
  for key, field, won in (
    ("hit", "hit", lambda r: bool(r["hit"])),
    ("top1", "rank", lambda r: r["rank"] == 0),
  ):
    if all(field in r for r in rows + their_rows):
      a = sum(won(x) and not won(y) for x, y in zip(rows, their_rows))
      b = sum(won(y) and not won(x) for x, y in zip(rows, their_rows))
      out[key] = (a, b, sign_test_p(a, b))
  return out


def comparison(
  workdir: str, records: list[dict], compare: dict[str, str], theirs: dict | None = None
) -> list[str]:
  """Markdown lines of the per-split comparison tables (empty when nothing to compare);
  `theirs`: the compared runs' records by name, where already read."""
  lines = []
  if compare and not finals_by_split(records):  # Nothing of this run to compare: say why.
    sasrec = any(r.get("final") and r.get("stage") == "sasrec" for r in records)
    why = "it has no final iLoRA evaluation yet"
    if sasrec:
      why = ("it has a SASRec stage only, whose final records hold no candidate fingerprint; "
             "give --compare to an iLoRA run's report")  # fmt: skip
    return [f"No comparison with {', '.join(compare)}: {why}.", ""]
  theirs = theirs if theirs is not None else {n: read_records(p) for n, p in compare.items()}
  others = {name: finals_by_split(theirs[name]) for name in compare}
  for split, rec in finals_by_split(records).items():
    label = f"{describe_run(workdir)}, this run{_weights_note(rec)}"
    rows = [(label, {k: rec.get(k) for k in COMPARE_KEYS})]
    for prefix, label in (
      ("base/", "base LLM, no adapters (text-only prompt)"),
      ("sasrec/", "SASRec"),
    ):
      vals = {k: rec.get(prefix + k) for k in COMPARE_KEYS}
      if any(v is not None for v in vals.values()):
        rows.append((label, vals))
    for name, finals in others.items():
      label = f"{name}: {describe_run(compare[name])}"
      other = finals.get(split)
      if other is None:
        sasrec_row = any(row == "SASRec" for row, _ in rows)
        rows.append((label, _no_final(theirs[name], split, compare[name], sasrec_row)))
      elif other.get("candidates") != rec.get("candidates"):
        rows.append(
          (
            label,
            "different candidates (data, rows, candidate_seed or prompt templates differ): "
            "not comparable",
          )
        )
      else:
        rows.append((label, {k: other.get(k) for k in COMPARE_KEYS}))
    # The rows every method here was scored on (`ilora.eval_rows` may cut the split: the
    # SASRec stage's own final record, in the table of every final metric, scores it whole).
    scored = f", {counted(rec['rows'], 'row')}" if isinstance(rec.get("rows"), int) else ""
    lines += [
      f"## {split}: methods on the same candidates (fingerprint "
      f"{rec.get('candidates', '?')}, step {rec.get('step')}{scored})",
      "",
      _table_row(["method", *COMPARE_KEYS]),
      "|---" * (1 + len(COMPARE_KEYS)) + "|",
    ]
    for label, vals in rows:
      if isinstance(vals, str):
        cells = [vals] + [""] * (len(COMPARE_KEYS) - 1)
      else:
        cells = [cell(vals[k]) for k in COMPARE_KEYS]
      lines.append(_table_row([label, *cells]))
    lines += [
      "",
      "valid_ratio, hit_ratio@1 (hits / valid, the paper's) and hits_over_total come "
      "from greedy generation; hr@k, ndcg@5 and mrr rank the candidates by likelihood.",
      "",
    ]
    try:
      ours = read_predictions(workdir, split)
    except UserError as exc:
      lines += _unpaired(split, None, exc)
      continue
    for name in others:
      try:
        pairs = paired(ours, read_predictions(compare[name], split))
      except UserError as exc:
        lines += _unpaired(split, name, exc)
        continue
      if not pairs:
        continue
      parts = [f"{_PAIRED[k]}: {counted(a, 'row')} only this run, {b} only {name} (exact sign "
               f"test p = {p:.3g})" for k, (a, b, p) in pairs.items()]  # fmt: skip
      count = len(ours[1])
      lines += [f"Paired with {name} on the same {count} rows: " + "; ".join(parts) + ".", ""]
  return lines


def _unpaired(split: str, name: str | None, exc: UserError) -> list[str]:
  """The summary's line, and a warning on stderr, for damaged predictions (this run's, or
  those of the compared run `name`): the row-by-row comparison is left out."""
  what = f"with {name}" if name else "of this run"
  print(f"warning: {exc}: the report leaves out the {split} row-by-row comparison {what}",
        file=sys.stderr, flush=True)  # fmt: skip
  return [f"No row-by-row comparison {what}: damaged predictions ({exc}).", ""]


def running_mean(values, window: int) -> np.ndarray:
  """The trailing mean of `values` over `window` points (fewer at the start), of the finite
  ones among them; NaN where the value itself is not finite (a skipped step: a gap, as in
  `train_loss.png`, that leaves the points after it as they are)."""
  values = np.asarray(values, np.float64)
  finite = np.isfinite(values)
  sums = np.cumsum(np.concatenate([[0.0], np.where(finite, values, 0.0)]))
  counts = np.cumsum(np.concatenate([[0], finite]))
  ends = np.arange(1, len(values) + 1)
  starts = np.maximum(ends - window, 0)
  out = np.full(len(values), np.nan)
  return np.divide(sums[ends] - sums[starts], counts[ends] - counts[starts], out=out,
                   where=finite)  # fmt: skip


def comparison_curves(
  workdir: str, records: list[dict], compare: dict[str, str], theirs: dict | None = None
) -> dict:
  """{label: {"train": (steps, loss running mean), "val": (steps, loss)}} of the iLoRA stage of
  this run and of each compared run on the same val candidates (or not finished yet: no final
  val record), for `compare.png`. The running mean spans a twentieth of the run's steps
  (`running_mean`: a non-finite loss is a gap, left out of its neighbours' means).
  `theirs`: the compared runs' records by name, where already read."""
  theirs = theirs if theirs is not None else {n: read_records(p) for n, p in compare.items()}
  ours = finals_by_split(records).get("val", {}).get("candidates")
  runs = {f"{describe_run(workdir)}, this run": records}
  for name, path in compare.items():
    final = finals_by_split(theirs[name]).get("val")
    if final is None or ours is None or final.get("candidates") == ours:
      runs[f"{name}: {describe_run(path)}"] = theirs[name]
  curves = {}
  for label, recs in runs.items():
    mine = [r for r in recs if r.get("stage") == "ilora" and r.get("run", "ilora") == "ilora"]
    train = _points([r for r in mine if r.get("split") == "train"], "loss")
    val = _points([r for r in mine if r.get("split") == "val" and not _of_earlier_weights(r)],
                  "loss")  # fmt: skip
    if not train and not val:
      continue
    steps, loss = (np.asarray(x) for x in zip(*train)) if train else (np.zeros(0),) * 2
    window = max(1, len(loss) // 20)
    val_steps, val_loss = (np.asarray(x) for x in zip(*val)) if val else (np.zeros(0),) * 2
    curves[label] = {"train": (steps, running_mean(loss, window)), "val": (val_steps, val_loss)}
  return curves


def cell(value) -> str:
  """A metric as a table cell: 4 decimals, a count (an integer) as it is, "" when absent, as
  written when not a number."""
  if value is None:
    return ""
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)[:20]
  if isinstance(value, int | float | str) and not isinstance(value, bool):
    with contextlib.suppress(ValueError, OverflowError):
      return f"{float(value):.4f}"
  return " ".join(str(value).split())[:20]


def run_compare(workdir: str, given: str) -> str:
  """The comparison of a report that `stage=evaluate` rebuilds: `given` (its
  config.report.compare), else the one the run was trained with (its config.json's), so that
  an evaluation without the flag keeps the run's comparison rows and compare.png."""
  from ilora_jax import configuration

  if given:
    return given
  report_section = (configuration.saved(workdir) or {}).get("report")
  compare = report_section.get("compare") if isinstance(report_section, dict) else None
  return compare if isinstance(compare, str) else ""  # None, or damaged: no comparison.


def write(workdir: str, compare: dict[str, str] | str | None = None) -> str:
  """Writes `workdir/report/` and returns its path."""
  if isinstance(compare, str) or compare is None:
    try:
      compare = parse_compare(compare or "")
    except UserError as exc:
      raise UserError(f"config.report.compare: {exc}") from None
  records = read_records(workdir)
  _warn_unread_config(workdir)
  out = os.path.join(workdir, "report")
  if os.path.lexists(out) and not os.path.isdir(out):
    raise UserError(f"{out} is not a folder: move it away to write the report there")
  try:
    _write(workdir, out, records, compare)
  except OSError as exc:  # A read-only workdir, a full disk, a folder where a file goes, ...
    where = f" ({exc.filename})" if exc.filename else ""
    raise UserError(f"cannot write the report in {out}: {exc.strerror or exc}{where}") from None
  return out


def read_gates(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(gates [users, experts], users [users, dim]) of the iLoRA stage's `gates.npz`."""
  advice = (
    "remove it, or re-run the run's own command (its final evaluation writes it again; "
    "stage=evaluate does not)"
  )
  try:
    with open(path, "rb") as f:
      archive = f.read(4) == b"PK\x03\x04"  # What every .npz (a zip file) starts with.
    if not archive:  # numpy would take any other file for a pickle, and refuse it as one.
      raise UserError(f"cannot read {path}: it is no .npz archive; {advice}")
    with np.load(path) as data:
      gates = np.asarray(data["gates"], np.float64)
      users = np.asarray(data["users"], np.float64)
  except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as exc:
    # TypeError: an archive member that is no plain array.
    reason = " ".join(str(exc).split())
    raise UserError(f"cannot read {path} ({type(exc).__name__}: {reason}); {advice}") from None
  require(
    gates.ndim == 2 and users.ndim == 2 and len(gates) == len(users) > 0 and gates.shape[1] > 0,
    f"{path}: gates [users, experts] and users [users, dim] must be non-empty 2-D arrays "
    f"with the same rows, not {gates.shape} and {users.shape}",
  )
  return gates, users


def _plot_gates(entropy_ax, cluster_ax, gates: np.ndarray, users: np.ndarray) -> None:
  """The val users' gate entropies, and their mean gates by k-means cluster of their SASRec
  user vectors. A diverged run's rows (NaN or infinite gates or user vectors) are left out and
  counted in the titles."""
  finite = np.isfinite(gates).all(-1) & np.isfinite(users).all(-1)
  dropped = int(np.sum(~finite))
  gates, users = gates[finite], users[finite]
  if not len(gates):
    for ax in (entropy_ax, cluster_ax):
      ax.text(0.5, 0.5, f"no finite gates ({dropped} val users non-finite)", ha="center",
              va="center", transform=ax.transAxes, fontsize=9)  # fmt: skip
    return
  left_out = f", {dropped} non-finite left out" if dropped else ""
  p = np.clip(gates, 1e-9, 1.0)
  entropy = -(p * np.log(p)).sum(-1)
  entropy_ax.hist(entropy, bins=20, range=(0, np.log(gates.shape[1]) + 1e-6))
  entropy_ax.set_title(f"gate entropy per user ({len(gates)} val users{left_out})")
  entropy_ax.set_xlabel("entropy (nats)")
  labels = kmeans(users, 4)
  clusters = sorted(set(labels.tolist()))
  width = 0.8 / gates.shape[1]
  for e in range(gates.shape[1]):
    means = [gates[labels == c, e].mean() for c in clusters]
    cluster_ax.bar(np.arange(len(clusters)) + e * width, means, width, label=f"expert {e}")
  cluster_ax.set_xticks(np.arange(len(clusters)) + 0.4 - width / 2)
  cluster_ax.set_xticklabels([f"cluster {c}\n({np.sum(labels == c)} users)" for c in clusters])
  cluster_ax.set_title(f"mean gate weights by SASRec user cluster (k-means{left_out})")
  cluster_ax.legend(fontsize=8)


def _note(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9)


def _gate_axes(
  axes, ilora_train: list[dict], experts: list[str], gates_path: str, evaluated: bool = False
) -> None:
  """gates.png's three panels: the train batches' mean gate per expert, then the val users'
  gate plots from `gates_path` (`_plot_gates`); a panel without its data says so (a run
  stopped before its iLoRA evaluation has no gates.npz; one `evaluated`, whose records hold
  its final evaluation, had one, removed since)."""
  for key in experts:
    _plot_series(axes[0], ilora_train, key, "expert " + key.split("/")[1])
  axes[0].set_title("mean gate weight per expert (train batches)")
  axes[0].set_xlabel("step")
  if experts:  # A gates.npz without gate_mean records: no lines, so no legend.
    axes[0].legend(fontsize=8)
  else:
    _note(axes[0], "no gate records in the train records")
  unreadable = False
  if os.path.exists(gates_path):
    try:
      gates = read_gates(gates_path)
    except UserError as exc:  # The rest of the report is still written.
      from ilora_jax import console

      console.info(f"warning: {exc}; gates.png is drawn without its val gate panels")
      unreadable = True
    else:
      _plot_gates(axes[1], axes[2], *gates)
      return
  axes[1].set_title("gate entropy per user")
  axes[2].set_title("mean gate weights by SASRec user cluster")
  if unreadable:
    note = (
      "gates.npz cannot be read\n(see the warning): re-run the run's\ncommand to write it again"
    )
  elif evaluated:
    note = ("no gates.npz (removed since the final\nevaluation?): re-run the run's command\n"
            "to evaluate and write it again")  # fmt: skip
  else:
    note = "no val gates recorded\n(no gates.npz: the run stopped\nbefore its iLoRA evaluation)"
  for ax in axes[1:]:
    ax.set_xticks([])
    ax.set_yticks([])
    _note(ax, note)


VAL_KEYS = ("hr@1", "hr@5", "ndcg@5", "hit_ratio@1", "valid_ratio", "hits_over_total")


def _val_axes(ax, stage: str, records: list[dict]) -> None:
  """val_metrics.png's panel of `stage`: its val metrics per evaluation, and the step whose
  weights its final evaluations used where `ilora.select_by` picked them."""
  from matplotlib.ticker import MaxNLocator

  val = [r for r in records if r.get("split") == "val" and r.get("run") == stage
         and not _of_earlier_weights(r)]  # fmt: skip
  plotted = [_plot_series(ax, val, key, key) for key in VAL_KEYS]
  finals = [r for r in records if r.get("split") == "val" and r.get("run") == stage
            and r.get("final")]  # fmt: skip
  if finals and finals[-1].get("selected_step") is not None:
    step, by = finals[-1]["selected_step"], finals[-1].get("selected_by")
    ax.axvline(step, color="gray", linestyle="--", linewidth=1,
               label=f"selected by {by} (step {step})")  # fmt: skip
  ax.set_title(f"{stage}: validation")
  ax.set_xlabel("step")
  lo, hi = ax.get_xlim()
  if hi - lo < 2:  # A single step: room for integer ticks around it.
    ax.set_xlim((lo + hi) / 2 - 1, (lo + hi) / 2 + 1)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # Steps, not fractions of one.
  ax.set_ylim(-0.03, 1.03)  # A line at 0 or 1 stays in sight.
  if any(plotted):
    ax.legend(loc="best", fontsize=8)
  else:  # e.g. a run with both evaluation modes off: its val records hold the loss only
    ax.text(0.5, 0.5, "no ranking or generation metrics recorded", ha="center",
            va="center", transform=ax.transAxes, fontsize=9)  # fmt: skip


def training_records(records: list[dict], stage: str) -> list[dict]:
  """The training-loss records of `stage`'s own run: not those of `stage=evaluate` on the
  train split (`run` "evaluate", one final record of other weights' loss)."""
  return [r for r in records if r.get("split") == "train" and r.get("run", stage) == stage]


def _write(workdir: str, out: str, records: list[dict], compare: dict[str, str]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out, exist_ok=True)
  by_stage: dict[str, list[dict]] = defaultdict(list)
  for r in records:
    by_stage[r.get("stage", "?")].append(r)
  stages = [s for s in ("sasrec", "ilora") if s in by_stage]

  # Training loss and learning rate.
  fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(6 * max(len(stages), 1), 4))
  axes = np.atleast_1d(axes)
  for ax, stage in zip(axes, stages):
    train = training_records(by_stage[stage], stage)
    _plot_series(ax, train, "loss", "train loss")
    if not train:  # Evaluated without training (train.epochs=0): an empty 0..1 frame before.
      ax.text(0.5, 0.5, "no training steps recorded", ha="center", va="center",
              transform=ax.transAxes, color="gray")  # fmt: skip
    ax.set_title(f"{stage}: training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (mean per record)")
    if any("lr" in r for r in train):
      twin = ax.twinx()
      _plot_series(twin, train, "lr", "learning rate")
      twin.set_ylabel("learning rate", color="tab:orange")
      for line in twin.get_lines():
        line.set_color("tab:orange")
  fig.tight_layout()
  _save(fig, os.path.join(out, "train_loss.png"))
  plt.close(fig)

  # Validation metrics per evaluation.
  fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(6 * max(len(stages), 1), 4))
  axes = np.atleast_1d(axes)
  for ax, stage in zip(axes, stages):
    _val_axes(ax, stage, by_stage[stage])
  fig.tight_layout()
  _save(fig, os.path.join(out, "val_metrics.png"))
  plt.close(fig)
  plots = ["`train_loss.png`", "`val_metrics.png`"]  # Those written, for summary.md.

  # Gate usage.
  ilora_train = training_records(by_stage.get("ilora", []), "ilora")
  experts = sorted({k for r in ilora_train for k in r if k.startswith("gate_mean/")})
  gates_path = os.path.join(out, "gates.npz")
  if experts or os.path.exists(gates_path):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    evaluated = any(r.get("final") for r in by_stage.get("ilora", []))
    _gate_axes(axes, ilora_train, experts, gates_path, evaluated)
    fig.tight_layout()
    _save(fig, os.path.join(out, "gates.png"))
    plt.close(fig)
    plots.append("`gates.png` (iLoRA)")

  # summary.md: every final metric in one table.
  finals = [r for r in records if r.get("final") or r.get("skipped")]
  keys = []
  for r in finals:  # Per-group metrics get their own table below.
    keys += [k for k in _numeric(r) if k not in keys and not k.startswith("group/")]
  lines = [f"# Run summary: {os.path.abspath(workdir)}", ""]
  if finals:
    lines.append(_table_row(["run", "stage", "split", "step", *keys]))
    lines.append("|---" * (4 + len(keys)) + "|")
    for r in finals:
      vals = _numeric(r)
      cells = [f"{vals[k]:.4f}" if k in vals else "" for k in keys]
      if r.get("skipped"):
        cells = [f"skipped: {r['skipped']}"] + [""] * (len(keys) - 1)
      rows = f", {counted(r['rows'], 'row')}" if isinstance(r.get("rows"), int) else ""  # Scored.
      step = str(r.get("step", "")) + _weights_note(r) + rows
      row = [str(r.get("run", "")), str(r.get("stage", "")), str(r.get("split", "")), step]
      lines.append(_table_row(row + cells))
  else:
    lines.append("No final evaluation yet.")
  lines += group_table(finals)
  theirs, unread = _read_compared(compare)  # Read once.
  compare = {name: path for name, path in compare.items() if name in theirs}
  table = comparison(workdir, records, compare, theirs) + unread
  if table:
    lines[2:2] = table + ["## Every final metric", ""]
  curves = comparison_curves(workdir, records, compare, theirs) if compare else {}
  if len(curves) > 1:  # This run and at least one other: their losses on shared axes.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for label, curve in curves.items():
      axes[0].plot(*curve["train"], label=label)
      axes[1].plot(*curve["val"], marker="o", label=label)
    axes[0].set_title("iLoRA stage: train loss (running mean over 1/20 of the steps)")
    axes[1].set_title("iLoRA stage: val loss per evaluation")
    for ax in axes:
      ax.set_xlabel("step")
      ax.ticklabel_format(axis="y", useOffset=False)  # Losses as they are, not 0.005 + 10.67.
      ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, os.path.join(out, "compare.png"))
    plt.close(fig)
    plots.append("`compare.png` (this run's losses beside the compared runs')")
  for stale in ("gates.png", "compare.png"):  # An earlier report's (another --compare).
    if not any(f"`{stale}`" in p for p in plots):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, stale))
  tb_hint = (
    f"Scalars for TensorBoard: `tensorboard --logdir {os.path.join(out, 'tb')}` (the viewer is "
    "not installed with this package: `pip install tensorboard`)."
  )
  lines += ["", f"Plots: {', '.join(plots)}.", tb_hint]
  with atomic_write(os.path.join(out, "summary.md")) as f:
    f.write("\n".join(lines) + "\n")

  # TensorBoard event files with the same scalars (rewritten from scratch each time).
  SummaryWriter = _summary_writer_class()  # noqa: N806

  tb = os.path.join(out, "tb")
  # The earlier report's files are removed once the new one is complete: a report stopped
  # midway (a signal, a full disk) keeps them.
  earlier = [n for n in os.listdir(tb) if n.startswith("events.")] if os.path.isdir(tb) else []
  writer = SummaryWriter(tb, filename_suffix=f".{os.getpid()}.{time.time_ns()}")
  # Non-finite values (a diverged loss) are written as they are; tensorboardX would log a
  # warning for each of them on stderr.
  with _logger_level("tensorboardX.x2num", logging.ERROR):
    for r in records:
      if "step" not in r:
        continue
      # stage=evaluate's records (final too) apart from the training run's final ones.
      final = "_evaluate" if r.get("run") == "evaluate" else "_final" if r.get("final") else ""
      prefix = f"{r.get('stage', '?')}/{r.get('split', '?')}{final}"
      at = r["selected_step"] if _of_earlier_weights(r) else r["step"]  # The weights' step.
      for key, value in _numeric(r).items():
        writer.add_scalar(f"{prefix}/{key}", value, at)
  writer.close()
  for name in earlier:
    os.remove(os.path.join(tb, name))


def _save(fig, path: str) -> None:
  """`fig` as the PNG `path`, which it replaces once complete: a report stopped midway (a
  signal, a full disk) left a plot of 0 bytes that summary.md still named."""
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=100, format="png")


@contextlib.contextmanager
def _logger_level(name: str, level: int):
  logger = logging.getLogger(name)
  previous = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(previous)


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without torch: tensorboardX's writer module
  imports torch wherever it is installed (about 3 s on a CPU; it only needs it for torch
  tensors, and this package never uses torch). While `sys.modules['torch']` is None, an
  `import torch` fails as if torch were absent; a torch already imported is left alone."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    if "torch" in sys.modules and sys.modules["torch"] is None:
      del sys.modules["torch"]
  return SummaryWriter


def _print_path(path: str) -> None:
  from ilora_jax.errors import print_results

  print_results(path, kept=f"; the report is in {path}")


def main(argv: list[str] | None = None) -> None:
  from absl import flags

  from ilora_jax.errors import HELP_FLAGS, UserError, cli_main, parse_flags

  @cli_main
  def run(argv):
    usage = "usage: python -m ilora_jax.report --workdir=DIR [--compare=name=DIR2,...]"
    if any(a in HELP_FLAGS for a in argv[1 : argv.index("--") if "--" in argv else None]):
      print(f"{(__doc__ or '').strip()}\n\n{usage}")
      return
    # Its own flag values, parsed as `ilora_jax.main` parses its flags (`--workdir DIR`, a
    # --flagfile, ...): only these flags, and main may run more than once in a process.
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Workdir of a run.", flag_values=values)
    flags.DEFINE_string("compare", "", f"Runs to compare: {COMPARE_FORM}.", flag_values=values)
    try:
      parse_flags(values, argv, "report")
    except UserError as exc:
      raise UserError(f"{exc}; {usage}") from None
    if not values.workdir:
      raise UserError(usage)
    workdir = values.workdir
    given = values["compare"].present  # `--compare=` too: no comparison.
    if given:
      try:
        compare = parse_compare(values.compare)
      except UserError as exc:
        raise UserError(f"--compare: {exc}") from None
    if not os.path.isdir(workdir):
      what = "is a file, not a run's folder" if os.path.exists(workdir) else "does not exist"
      raise UserError(f"--workdir={workdir} {what}")
    if not os.path.lexists(os.path.join(workdir, "metrics.jsonl")):
      raise UserError(f"no metrics.jsonl in {workdir}")
    if not given:  # The run's own comparison (its config.report.compare), as the run wrote it.
      saved = run_compare(workdir, "")
      try:
        parsed = parse_compare(saved)
        check_not_itself(parsed, workdir)
        warn_unfound_compared(parsed)
        check_compared(parsed)
      except UserError as exc:
        raise UserError(
          f"the run's config.report.compare: {exc}; give --compare=name=DIR,... (or --compare= "
          "for none)"
        ) from None
      _print_path(write(workdir, saved))
      return
    try:
      check_not_itself(compare, workdir)
    except UserError as exc:
      raise UserError(f"--compare: {exc}") from None
    missing = unfound(compare)
    if missing:
      name, path = next(iter(missing.items()))  # The first, as given.
      raise UserError(f"--compare: no metrics.jsonl in {path} (entry {name}); expected "
                      f"{COMPARE_FORM}")  # fmt: skip
    try:
      check_compared(compare)
    except UserError as exc:
      raise UserError(f"--compare: {exc}") from None
    _print_path(write(workdir, compare))

  run(sys.argv if argv is None else argv)


if __name__ == "__main__":
  main()
