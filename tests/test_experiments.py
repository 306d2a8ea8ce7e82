"""The experiment runner (`ilora_jax.experiments`), synthetic user groups and group metrics."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (
  ROOT,
  assert_one_line_error,
  metrics_records,
  run_cli,
  shared_path,
  tiny_sasrec_pt,
)
from ml_collections import ConfigDict

from ilora_jax import configuration, experiments, llm, report, synthetic

GRID_FILE = os.path.join(ROOT, "configs", "experiments", "negative_transfer.py")
GRID = "--grid=configs/experiments/negative_transfer.py"
# The smallest grid that still trains and evaluates every stage: seconds per run.
SMOKE = (
  "--grid.extra=data.synthetic.num_users=100 sasrec.train.epochs=1 ilora.train.steps=2 "
  "ilora.eval_rows=8 ilora.eval_batch_size=4 checkpoint.every_steps=1"
)
SMOKE_EXTRA = SMOKE.split("=", 1)[1]


def _final(workdir, split):
  return [r for r in metrics_records(workdir) if r.get("final") and r["split"] == split][-1]


def _grid(**fields) -> ConfigDict:
  """The negative-transfer grid as `--grid=` loads it, with `fields` set (as --grid.<f>)."""
  spec = importlib.util.spec_from_file_location("negative_transfer_grid", GRID_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  grid = module.get_config()
  for key, value in fields.items():
    grid[key] = value
  return grid


def _copy_runs(src, dst, names) -> None:
  """The files that make runs of the grid in `src` finished, with their settings, in `dst`
  (as a moved or copied workdir holds them; without checkpoints)."""
  for name in names:
    os.makedirs(os.path.join(dst, name))
    for file in ("config.json", "metrics.jsonl", "runner.json"):
      shutil.copy(os.path.join(src, name, file), os.path.join(dst, name, file))


def _results(runs: dict) -> dict:
  """A `collect` result holding `runs` ({variant: {seed: {split: record}}})."""
  return {"runs": runs, "seconds": {}, "commands": {}, "experts": {}, "gate_test": {},
          "machine": "test"}  # fmt: skip


# ----------------------------------------------------------------------------- unit


def test_variants_and_seeds_parse_or_fail_clearly():
  assert experiments.parse_variants(["a: lora.rank=4 lora.gate=uniform", "b-2:"]) == [
    ("a", ["lora.rank=4", "lora.gate=uniform"]),
    ("b-2", []),
  ]
  for bad in (["no colon"], ["a: x=1", "a: y=2"], ["a: --config.x=1"], ["a b: x=1"], []):
    with pytest.raises(experiments.UserError):
      experiments.parse_variants(bad)
  # 'sasrec' names the SASRec jobs: a variant of that name trained but was never tabulated
  # ("ended without its final evaluation"); a string was read one character at a time.
  with pytest.raises(experiments.UserError, match="'sasrec' names the grid's SASRec jobs"):
    experiments.parse_variants(["sasrec: lora.num_experts=2"])
  with pytest.raises(experiments.UserError, match="must be a list of .* not the string 'a: x=1'"):
    experiments.parse_variants("a: x=1")
  assert experiments.parse_seeds("0, 1,2") == [0, 1, 2]
  for bad in ("", "1,1", "a", "1_0", "+1", "1.0"):  # "1_0" was seed 10.
    with pytest.raises(experiments.UserError):
      experiments.parse_seeds(bad)
  assert experiments.parse_seeds("-1,0") == [-1, 0]


def test_mean_std_is_the_sample_standard_deviation():
  values = [0.1, 0.25, 0.4]
  mean, std = experiments.mean_std(values)
  assert mean == pytest.approx(0.25)
  assert std == pytest.approx(np.sqrt(((0.15**2) * 2) / 2))  # ddof = 1 by hand.
  assert experiments.mean_std([0.3]) == (0.3, 0.0)


def test_paired_relative_difference_uses_the_seeds_of_the_mean():
  """The relative figure is the mean difference over the reference's mean on the seeds the
  mean difference uses: a seed where the reference scored 0 counts in both."""
  ref = np.array([0.0, 0.2, 0.3])
  values = {"same": [0.1, 0.1, 0.3], "better": [0.05, 0.3, 0.4], "one_seed": [0.25]}
  runs = {"lora": {str(s): {"val": {"hr@1": v}} for s, v in enumerate(ref)}}
  for name, vals in values.items():
    runs[name] = {str(s): {"val": {"hr@1": v}} for s, v in enumerate(vals)}
  grid = ConfigDict({"title": "t", "description": ""})
  md = experiments.markdown(grid, _results(runs), ["hr@1"], "lora")
  rows = {line.split(" | ")[0][2:]: line for line in md.split("Paired difference")[1].splitlines()
          if line.startswith("| ") and not line.startswith(("| variant", "|---"))}  # fmt: skip
  for name, vals in values.items():
    diffs = np.asarray(vals) - ref[: len(vals)]
    cells = rows[name].strip("| ").split(" | ")
    assert cells[1] == str(len(vals))
    mean = f"{diffs.mean():.4f}" + (f" ± {diffs.std(ddof=1):.4f}" if len(vals) > 1 else "")
    assert cells[2] == mean
    base = ref[: len(vals)].mean()
    assert cells[3] == (f"{100 * diffs.mean() / base:+.1f}%" if base else "-")
  assert rows["same"].endswith("| +0.0% |")  # Not -50.0%: seed 0 (reference 0) counts too.
  assert rows["one_seed"].endswith("| - |")  # Its one seed's reference is 0.


_TITLED = ConfigDict({"title": "t", "description": ""})


def _section(md: str, heading: str) -> list[str]:
  """The table rows ("| ..." lines, headers and rules left out) under `heading` up to the
  next heading of its level or above."""
  part = md.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
  return [line for line in part.splitlines()
          if line.startswith("| ") and not line.startswith(("| variant", "|---"))]  # fmt: skip


def test_runs_on_other_candidates_are_never_compared(tmp_path):
  """b was evaluated on other candidates (fingerprint Y) than a, c and d (X): its own tables,
  marked, with its own SASRec; a paired difference only among X's runs. d froze another
  SASRec than a and c (other figures): a SASRec row of its own."""

  def run(fp, hr, sas):
    return {"val": {"candidates": fp, "hr@1": hr, "sasrec/hr@1": sas}}

  runs = {
    "a": {"0": run("X", 0.1, 0.30), "1": run("X", 0.2, 0.40)},
    "b": {"0": run("Y", 0.9, 0.70), "1": run("Y", 0.8, 0.60)},
    "c": {"0": run("X", 0.3, 0.30), "1": run("X", 0.5, 0.40)},
    "d": {"0": run("X", 0.2, 0.05)},
  }
  md = experiments.markdown(_TITLED, _results(runs), ["hr@1"], "a")
  assert "## val\n" not in md and "every run evaluates the same" not in md
  x, y = _section(md, "## val, candidates X"), _section(md, "## val, candidates Y")
  assert [r.split(" | ")[0] for r in x] == ["| a", "| c", "| d", "| SASRec of a, c",
    "| SASRec of d", "| a", "| c", "| d", "| c", "| d"]  # fmt: skip
  assert (
    x[3] == f"| SASRec of a, c | 2 | {np.mean([0.3, 0.4]):.4f} ± {np.std([0.3, 0.4], ddof=1):.4f} |"
  )
  assert x[4] == "| SASRec of d | 1 | 0.0500 |"
  assert x[-2].startswith(f"| c | 2 | {np.mean([0.2, 0.3]):.4f} ± ")  # c - a, seed by seed.
  y_part = md.split("## val, candidates Y\n")[1]
  assert y_part.lstrip().startswith("Evaluated on other candidates than the val tables above")
  assert "Paired difference" not in y_part and "`a` was evaluated on other candidates" in y_part
  assert y == ["| b | 2 | 0.8500 ± 0.0707 |",
               f"| SASRec (frozen, same candidates) | 2 | {np.mean([0.7, 0.6]):.4f} ± 0.0707 |",
               "| b | 0.9000 | 0.8000 |"]  # fmt: skip
  # The figures too: a row of panels per candidate set.
  written = experiments.plots(_results(runs), ["hr@1"], [], str(tmp_path))
  assert [os.path.basename(p) for p in written] == ["metrics.png"]


def test_a_group_metric_a_variant_lacks_is_no_bar(tmp_path, monkeypatch):
  """groups.png drew a group a variant has no figure of as a bar of 0, as if measured."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib.axes import Axes

  bars, real = [], Axes.bar

  def bar(self, x, height, *args, label=None, **kwargs):
    bars.append((label, [float(h) for h in np.atleast_1d(height)]))
    return real(self, x, height, *args, label=label, **kwargs)

  monkeypatch.setattr(Axes, "bar", bar)
  runs = {"a": {"0": {"val": {"hr@1": 0.5, "group/0/hr@1": 0.0, "group/1/hr@1": 0.25}}},
          "b": {"0": {"val": {"hr@1": 0.4, "group/1/hr@1": 0.5}}}}  # fmt: skip
  written = experiments.plots(_results(runs), ["hr@1"], [], str(tmp_path))
  assert "groups.png" in [os.path.basename(p) for p in written]
  grouped = [b for b in bars if b[0] in ("a", "b")]
  assert grouped[0] == ("a", [0.0, 0.25])
  assert grouped[1][0] == "b" and np.isnan(grouped[1][1][0]) and grouped[1][1][1] == 0.5


def test_results_name_the_variants_without_a_finished_run():
  """With `--grid.only=lora,ilora`, results.md never said the grid's `uniform` variant (its
  description names it) was not run (found by the README audit)."""
  variants = ["a: lora.rank=8", "b: lora.rank=4", "c: lora.rank=2"]
  grid = ConfigDict({"title": "t", "description": "", "variants": variants})
  runs = {"a": {"0": {"val": {"candidates": "X", "hr@1": 0.1}}}}
  md = experiments.markdown(grid, _results(runs), ["hr@1"], "a")
  assert "\nVariants of the grid without a finished run here: b, c.\n" in md
  md = experiments.markdown(grid, _results({**runs, "b": runs["a"], "c": runs["a"]}), ["hr@1"], "a")
  assert "without a finished run" not in md


def test_panels_of_values_none_negative_start_at_zero(tmp_path, monkeypatch):
  """An all-zero panel's axis went down to -0.04, and error bars over seeds below 0, as if a
  rate could be negative (found by the README audit)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.figure

  limits, real = {}, matplotlib.figure.Figure.savefig

  def record(fig, path, *args, **kwargs):
    name = os.path.basename(path).split(".tmp-")[0]  # Written to a temporary file first.
    limits[name] = [ax.get_ylim() for ax in fig.axes]
    return real(fig, path, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
  runs = {"a": {"0": {"val": {"hr@1": 0.0, "mrr": 0.05, "group/0/hr@1": 0.0}},
                "1": {"val": {"hr@1": 0.0, "mrr": 0.45, "group/0/hr@1": 0.4}}}}  # fmt: skip
  experiments.plots(_results(runs), ["hr@1", "mrr"], [], str(tmp_path))
  hr, mrr = limits["metrics.png"]
  assert hr[0] == 0 < hr[1] and mrr[0] == 0  # mrr's mean 0.25 minus its std 0.28 was below 0.
  assert limits["groups.png"][0][0] == 0


def test_a_diverged_or_missing_metric_is_never_averaged_under_more_seeds():
  """A diverged seed's "nan" (as the log writes it) makes the mean nan; a metric a seed lacks
  says how many of the row's seeds its cell covers."""
  runs = {
    "a": {"0": {"val": {"hr@1": "nan", "mrr": 0.5}}, "1": {"val": {"hr@1": 0.2}}},
  }
  md = experiments.markdown(_TITLED, _results(runs), ["hr@1", "mrr"], "a")
  assert "| a | 2 | nan ± nan | 0.5000 (1 of 2 seeds) |" in md


def test_baseline_rows_show_whatever_listed_metric_they_record():
  """A generation metric first (SASRec records no hit_ratio@1): the SASRec row still shows its
  hr@1, and the per-group table (on hit_ratio@1) has no SASRec row of dashes."""
  record = {"hit_ratio@1": 0.25, "hr@1": 0.5, "sasrec/hr@1": 0.375, "base/hit_ratio@1": 0.125}
  for g in (0, 1):
    record.update({f"group/{g}/hit_ratio@1": 0.25, f"group/{g}/sasrec/hr@1": 0.375})
  md = experiments.markdown(_TITLED, _results({"a": {"0": {"val": record}}}),
                            ["hit_ratio@1", "hr@1"], "a")  # fmt: skip
  assert "| SASRec (frozen, same candidates) | 1 | - | 0.3750 |" in md
  assert "| base LLM, no adapters | 1 | 0.1250 | - |" in md
  assert "Per user group (hit_ratio@1):" in md and "| SASRec |" not in md


def test_grid_metrics_are_checked():
  def resolved(generate, score=True):
    return {"a": ConfigDict({"ilora": {"eval_generate": generate, "eval_score": score}})}

  grid = ConfigDict({"metrics": " mrr, hit_ratio@1 ,loss"})
  assert experiments.parse_metrics(grid, resolved(True)) == ["mrr", "hit_ratio@1", "loss"]
  for text, generate, score, fragment in (
    ("", True, True, "names no metric"),
    (" , ", True, True, "names no metric"),
    ("hr@10,mrr", True, True, "hr@10, which the runs do not record"),
    ("mrr,mrr", True, True, "twice"),
    ("mrr,valid_ratio", False, True, "valid_ratio, a generation metric"),
    ("hit_ratio@1,hr@1", True, False, "hr@1, a scoring metric"),
  ):
    with pytest.raises(experiments.UserError, match=fragment):
      experiments.parse_metrics(ConfigDict({"metrics": text}), resolved(generate, score))


def test_the_run_config_is_found_from_any_current_folder(tmp_path, monkeypatch):
  """A shipped grid's `configs/tiny.py` is relative to the repository: found above the grid
  file's folder when the current folder is elsewhere; the current folder comes first."""
  monkeypatch.chdir(tmp_path)
  grid = ConfigDict({"config": "configs/tiny.py"})
  tiny = os.path.join(ROOT, "configs", "tiny.py")
  assert experiments.resolve_config_path(grid, GRID_FILE) == tiny
  runs, _ = experiments.plan(_grid(seeds="0", only="lora"), GRID_FILE, "w")
  assert all(f"--config={tiny}" in r.argv for r in runs) and len(runs) == 2
  with pytest.raises(experiments.UserError) as err:
    experiments.resolve_config_path(ConfigDict({"config": "configs/nope.py"}), GRID_FILE)
  assert str(tmp_path) in str(err.value) and os.path.dirname(GRID_FILE) in str(err.value)
  os.makedirs("configs")
  shutil.copy(tiny, "configs/tiny.py")
  assert experiments.resolve_config_path(grid, GRID_FILE) == "configs/tiny.py"


def test_each_data_setting_freezes_a_sasrec_trained_on_its_own_data():
  """A variant that changes data.* freezes a SASRec trained on its data (one per seed and
  data setting, shared by the variants of that data; the common one keeps sasrec/seed<k>),
  also when grid.only leaves out the variant it is named after; so does one that changes
  sasrec.* (the frozen model's shape)."""
  variants = ("a: lora.rank=8", "b: data.candidate_seed=7", "c: data.synthetic.seed=3",
              "d: data.synthetic.seed=3 lora.rank=4")  # fmt: skip
  for only, jobs in (("", ["sasrec/seed1", "sasrec/b/seed1", "sasrec/c/seed1"]),
                     ("d", ["sasrec/c/seed1"])):  # fmt: skip
    runs, resolved = experiments.plan(
      _grid(seeds="1", only=only, variants=variants, reference="a"), GRID_FILE, "w"
    )
    assert [r.name for r in runs if r.variant == "sasrec"] == jobs
    by_dir = {r.workdir: r for r in runs}
    for run in runs:
      if run.variant == "sasrec":
        continue
      init_from = next(a.split("=", 1)[1] for a in run.argv if "sasrec.init_from=" in a)
      job = by_dir[init_from]  # A job of this grid trains it,
      trained_on = configuration.load(job.config_path, job.overrides).data
      assert trained_on.to_dict() == resolved[run.variant].data.to_dict()  # on the run's data.
  assert {r.name: r.argv[3].split("=", 1)[1] for r in runs if r.variant == "d"} == {
    "d/seed1": os.path.join("w", "sasrec", "c", "seed1")
  }
  # Another SASRec shape likewise: a SASRec of its own, trained with that shape.
  runs, resolved = experiments.plan(
    _grid(seeds="1", variants=("a: lora.rank=8", "e: sasrec.hidden=32"), reference="a"),
    GRID_FILE, "w",
  )  # fmt: skip
  jobs = {r.name: r for r in runs if r.variant == "sasrec"}
  assert list(jobs) == ["sasrec/seed1", "sasrec/e/seed1"]
  assert configuration.load(jobs["sasrec/e/seed1"].config_path,
                            jobs["sasrec/e/seed1"].overrides).sasrec.hidden == 32  # fmt: skip
  assert configuration.load(jobs["sasrec/seed1"].config_path,
                            jobs["sasrec/seed1"].overrides).sasrec.hidden != 32  # fmt: skip
  e_run = next(r for r in runs if r.name == "e/seed1")
  assert f"--config.sasrec.init_from={jobs['sasrec/e/seed1'].workdir}" in e_run.argv


def test_common_train_overrides_reach_the_ilora_runs_only():
  """`train.*` in the common overrides trains the iLoRA runs; the SASRec job keeps its own
  length and learning rate (stage-specific sasrec.train.* still reaches it)."""
  extra = "train.steps=50 train.lr=0.05 sasrec.train.epochs=3"
  runs, _ = experiments.plan(_grid(seeds="0", only="lora", extra=extra), GRID_FILE, "w")
  sasrec, lora = (configuration.load(r.config_path, r.overrides) for r in runs)
  plain = configuration.load(runs[0].config_path)
  trains = configuration.stage_train(sasrec, "sasrec")
  assert trains.steps is None and trains.epochs == 3
  assert trains.lr == configuration.stage_train(plain, "sasrec").lr != 0.05
  assert configuration.stage_train(lora, "ilora").steps == 50
  assert configuration.stage_train(lora, "ilora").lr == 0.05


def test_gate_specialisation_on_hand_made_gates():
  def record(gates):
    return {f"group/{g}/gate/{e}": w for g, row in enumerate(gates) for e, w in enumerate(row)}

  same = record([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
  assert experiments.gate_specialisation(same, [0, 1, 2], 2) == pytest.approx(0.0)
  disjoint = record([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
  assert experiments.gate_specialisation(disjoint, [0, 1, 2], 3) == pytest.approx(1.0)
  # Two groups: |0.7-0.2| + |0.3-0.8| = 1.0, half of it = 0.5; expert order does not matter.
  assert experiments.gate_specialisation(record([[0.7, 0.3], [0.2, 0.8]]), [0, 1], 2) == 0.5
  assert experiments.gate_specialisation(record([[0.3, 0.7], [0.8, 0.2]]), [0, 1], 2) == 0.5
  assert experiments.gate_specialisation(record([[1.0], [1.0]]), [0, 1], 1) is None


def test_gate_permutation_test_tells_signal_from_noise():
  rng = np.random.default_rng(0)
  groups = np.repeat(np.arange(3), 30)
  noise = rng.dirichlet(np.ones(4), size=90)  # Gates unrelated to the groups.
  signal = 0.5 * noise + 0.5 * np.eye(4)[groups]  # Each group leans on its own expert.
  strong = experiments.gate_permutation_test(signal, groups, rounds=200)
  assert strong["p"] == pytest.approx(1 / 201) and strong["distance"] > 3 * strong["chance"]
  weak = experiments.gate_permutation_test(noise, groups, rounds=200)
  assert weak["p"] > 0.05 and weak["distance"] == pytest.approx(
    experiments.gate_specialisation(
      {f"group/{g}/gate/{e}": noise[groups == g, e].mean() for g in range(3) for e in range(4)},
      [0, 1, 2],
      4,
    )
  )


def test_the_gate_test_uses_the_rows_of_the_specialisation_table(tmp_path):
  """gates.npz holds every val row; the final record's per-group gate means (the
  specialisation table) cover the first ilora.eval_rows: the test's distance is theirs."""
  rng = np.random.default_rng(0)
  gates = rng.dirichlet(np.ones(3), size=20)
  groups = np.tile([0, 1], 10)
  gates[10:, 0] += 5 * groups[10:]  # Rows the first 10 do not see: another distance.
  gates /= gates.sum(1, keepdims=True)
  os.makedirs(tmp_path / "report")
  np.savez(tmp_path / "report" / "gates.npz", gates=gates, groups=groups)
  run = experiments.Run("ilora/seed0", "ilora", 0, str(tmp_path), [])
  for rows in (10, 0):
    seen = slice(0, rows or None)
    record = {f"group/{g}/gate/{e}": gates[seen][groups[seen] == g, e].mean()
              for g in (0, 1) for e in range(3)}  # fmt: skip
    expected = experiments.gate_specialisation(record, [0, 1], 3)
    assert experiments.gate_test(run, rows)["distance"] == pytest.approx(expected)


def test_synthetic_groups_have_conflicting_next_item_rules():
  train, val, test = synthetic.generate(30, 300, 3, 12, 10, noise=0.0, seed=0)
  rule, conflicts = {}, set()
  for split in (train, val, test):
    assert split.group.shape == split.next.shape and set(np.unique(split.group)) <= {0, 1, 2}
    for seq, n, nxt, g in zip(split.seq, split.len_seq, split.next, split.group):
      last = int(seq[n - 1])
      assert rule.setdefault((int(g), last), int(nxt)) == int(nxt)  # A rule within a group.
  for (g, last), nxt in rule.items():
    for h in range(3):
      if h != g and (h, last) in rule and rule[(h, last)] != nxt:
        conflicts.add(last)
  assert len(conflicts) > 20  # Across groups the same item is followed by different items.


def test_word_titles_are_one_token_each():
  tokenizer = llm.load("tiny").tokenizer  # SmolLM2's tokenizer.
  titles = synthetic.titles(len(synthetic.WORD_TITLES), "words")
  assert len(set(titles.values())) == len(titles)
  for title in titles.values():
    assert len(tokenizer.encode(" " + title, add_special_tokens=False)) == 1, title
  with pytest.raises(synthetic.UserError, match="numbered"):
    synthetic.titles(len(synthetic.WORD_TITLES) + 1, "words")


def test_variant_and_seed_text_edge_cases():
  """A variant's name is stripped; a line without ':' (not a variant of no overrides) or an
  item without '=' (not a bare key) is refused; blank seeds between commas are left out."""
  assert experiments.parse_variants([" a : x=1", "b:"]) == [("a", ["x=1"]), ("b", [])]
  for bad in (["plain"], ["a: lora.rank"]):
    with pytest.raises(experiments.UserError, match="must read"):
      experiments.parse_variants(bad)
  assert experiments.parse_seeds("0,1,") == [0, 1]
  assert experiments.parse_seeds(" 3 , ,5") == [3, 5]


def test_complete_gives_the_defaults_and_the_first_variant_as_reference():
  grid = ConfigDict({"config": "c.py", "variants": ("b: x=1", "a: y=2"), "seeds": "0"})
  grid = experiments.complete(grid, "g.py")
  assert grid.reference == "b" and grid.share_sasrec is True and grid.metrics == "hr@1,mrr"
  with pytest.raises(experiments.UserError, match="lacks seeds"):
    experiments.complete(ConfigDict({"config": "c.py", "variants": ("a:",)}), "g.py")
  # A misspelt field (`c.extr = ...`) was ignored: its overrides reached no run.
  typo = ConfigDict({"config": "c.py", "variants": ("a:",), "seeds": "0", "extr": "x=1"})
  with pytest.raises(experiments.UserError) as raised:
    experiments.complete(typo, "g.py")
  assert str(raised.value).startswith(
    "g.py: unknown grid field(s) extr (did you mean extra?); a grid has config, variants, "
  )


def test_a_grid_field_of_the_wrong_type_is_one_line(tmp_path):
  """A grid file's text field given as a tuple (`only = ("a",)`) stopped with 'unexpected
  AttributeError' (exit 3); each field's type is checked against its default's."""
  base = {"config": "c.py", "variants": ("a: x=1",), "seeds": "0"}
  for key, value, want in [
    ("only", ("a",), "grid.only must be a string, not tuple ('a',)"),
    ("metrics", ["hr@1"], "grid.metrics must be a string, not list"),
    ("config", 3, "grid.config must be a string, not int 3"),
    ("share_sasrec", "yes", "grid.share_sasrec must be True or False, not str 'yes'"),
    ("overrides", 5, "grid.overrides must be a string or a list of strings, not int 5"),
  ]:
    with pytest.raises(experiments.UserError, match=re.escape(f"g.py: {want}")):
      experiments.complete(ConfigDict({**base, key: value}), "g.py")
  for key, value in [("overrides", "x=1 y=2"), ("overrides", ["x=1"]), ("share_sasrec", False)]:
    experiments.complete(ConfigDict({**base, key: value}), "g.py")  # Each form a grid may use.
  grid = tmp_path / "grid.py"
  grid.write_text(
    "from ml_collections import config_dict\n"
    "def get_config():\n"
    "  c = config_dict.ConfigDict()\n"
    "  c.config, c.seeds, c.only = 'configs/tiny.py', '0', ('a',)\n"
    "  c.variants = ('a: lora.num_experts=1 lora.gate=constant',)\n"
    "  return c\n"
  )
  proc = run_cli(f"--grid={grid}", f"--workdir={tmp_path / 'w'}", "--dry_run",
                 module="ilora_jax.experiments")  # fmt: skip
  assert_one_line_error(proc, "grid.only must be a string, not tuple")


def test_flags_set_the_fields_a_grid_file_leaves_to_their_defaults(tmp_path):
  """A grid file needs only config, variants and seeds; `--grid.only`, `--grid.extra`,
  `--grid.sasrec`, `--grid.metrics` were refused for such a file (`unknown grid key`), the
  overrides applied before the defaults were filled in. A misspelt or ill-typed one is named
  as the flag it is."""
  grid = tmp_path / "g.py"
  grid.write_text(
    "from ml_collections import config_dict\n"
    "def get_config():\n"
    "  c = config_dict.ConfigDict()\n"
    "  c.config, c.seeds = 'configs/tiny.py', '0'\n"
    "  c.variants = ('a: lora.num_experts=1 lora.gate=constant', 'b: lora.rank=2')\n"
    "  return c\n"
  )
  sasrec = tiny_sasrec_pt(tmp_path / "m.pt")
  w = tmp_path / "w"
  proc = run_cli(f"--grid={grid}", f"--workdir={w}", "--dry_run", "--grid.only=b",
                 "--grid.extra=ilora.train.steps=2", f"--grid.sasrec={sasrec}",
                 "--grid.metrics=mrr", "--grid.share_sasrec=False",
                 module="ilora_jax.experiments")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  (command,) = [line for line in proc.stdout.splitlines() if "ilora_jax.main" in line]
  assert f"--workdir={w}/runs/b/seed0" in command  # Only b; no SASRec job: the given one.
  assert f"--config.sasrec.init_from={sasrec}" in command
  assert "--config.ilora.train.steps=2 --config.lora.rank=2" in command
  for flag, message in (
    ("--grid.onyl=b", "unknown grid key: 'onyl' (in --grid.onyl) (did you mean only?)"),
    ("--grid.share_sasrec=no", "--grid.share_sasrec must be True or False, not str 'no'"),
  ):
    proc = run_cli(f"--grid={grid}", f"--workdir={w}", "--dry_run", flag,
                   module="ilora_jax.experiments")  # fmt: skip
    assert assert_one_line_error(proc) == f"error: {message}"


def test_the_tables_plan_every_run_folder_of_the_workdir(tmp_path):
  """`every`: the runs of every variant whatever grid.only, and of each seed with a run
  folder (a folder `seedx` is no seed), each seed once; `tabulated` keeps this command's
  runs (made or not) and the existing folders of the others."""
  w = str(tmp_path)
  for name in ("lora/seed0", "lora/seed5", "ilora/seed2", "lora/seedx", "lora/notes"):
    os.makedirs(os.path.join(w, "runs", name))
  grid = _grid(seeds="0", only="lora")
  every, _ = experiments.plan(grid, GRID_FILE, w, every=True)
  assert [r.name for r in every if r.variant != "sasrec"] == [
    f"{v}/seed{s}" for s in (0, 2, 5) for v in ("lora", "ilora", "uniform")
  ]
  runs, _ = experiments.plan(grid, GRID_FILE, w)
  shown = experiments.tabulated(grid, GRID_FILE, w, runs)
  assert [r.name for r in shown] == ["sasrec/seed0", "lora/seed0", "ilora/seed2", "lora/seed5"]


def test_without_share_sasrec_every_run_is_a_pipeline_of_its_own():
  runs, _ = experiments.plan(_grid(seeds="0,1", only="lora", share_sasrec=False), GRID_FILE, "w")
  assert [r.name for r in runs] == ["lora/seed0", "lora/seed1"]
  for run in runs:
    assert "--config.stage=pipeline" in run.argv
    assert not [a for a in run.argv if "init_from" in a or "stage=ilora" in a]


def test_the_same_sasrec_by_path_link_or_place_in_a_moved_workdir(tmp_path):
  same = experiments._same_sasrec
  old, new = "/old/W/runs/a/seed0", "/new/W/runs/a/seed0"
  assert same("/old/W/sasrec/seed0", "/new/W/sasrec/seed0", old, new)  # W moved.
  assert not same("/old/W/sasrec/seed0", "/new/W/sasrec/seed1", old, new)
  assert not same("", "/new/W/sasrec/seed0", old, new)  # None given then, one now.
  assert not same("/old/W/sasrec/seed0", "", old, new)
  (tmp_path / "m.pt").write_bytes(b"")
  os.symlink(tmp_path / "m.pt", tmp_path / "link.pt")
  run_a, run_b = str(tmp_path / "a"), str(tmp_path / "b")
  assert same(str(tmp_path / "link.pt"), str(tmp_path / "m.pt"), run_a, run_b)
  assert not same(str(tmp_path / "m.pt"), str(tmp_path / "n.pt"), run_a, run_b)


def test_config_diffs_of_a_moved_run_of_defaults_and_of_volatile_sections(tmp_path):
  """A run whose workdir moved (runner.json names the old one) froze the same SASRec as its
  new place plans; a key the saved config lacks is the default's value; every key under a
  VOLATILE section (distributed.*) is left out."""
  default = experiments._json_form(configuration.load(os.path.join(ROOT, "configs", "tiny.py")))
  new_w = str(tmp_path / "new" / "W")
  run = experiments.Run("a/seed0", "a", 0, os.path.join(new_w, "runs", "a", "seed0"), [])
  os.makedirs(run.workdir)
  runner = os.path.join(run.workdir, "runner.json")
  with open(runner, "w") as f:
    json.dump({"seconds": 1.0, "command": "python -m ilora_jax.main "
               "--workdir=/old/W/runs/a/seed0 --config.stage=ilora"}, f)  # fmt: skip
  saved = dict(default, **{"sasrec.init_from": "/old/W/sasrec/seed0"})
  planned = dict(default, **{"sasrec.init_from": f"{new_w}/sasrec/seed0"})
  assert experiments.config_diffs(run, saved, planned, default) == []
  other = dict(default, **{"sasrec.init_from": f"{new_w}/sasrec/b/seed0"})
  assert experiments.config_diffs(run, saved, other, default) == [
    f'sasrec.init_from "/old/W/sasrec/seed0" (saved) vs "{new_w}/sasrec/b/seed0" (planned)'
  ]
  # runner.json of no --workdir, or unreadable: the run's planned workdir.
  for text in ('{"command": "python -m ilora_jax.main"}', "{", "[]"):
    with open(runner, "w") as f:
      f.write(text)
    assert experiments._made_in(run) == run.workdir
  lacking = {k: v for k, v in default.items() if k != "lora.rank"}
  assert experiments.config_diffs(run, lacking, default, default) == []
  assert experiments.config_diffs(run, lacking, dict(default, **{"lora.rank": 16}), default) == [
    f"lora.rank {default['lora.rank']} (saved) vs 16 (planned)"
  ]
  volatile = dict(default, **{"distributed.num_processes": 2, "progress": True})
  assert experiments.config_diffs(run, default, volatile, default) == []
  # What only stage=evaluate reads (no grid run): a run saved when eval.stage's default was
  # sasrec still counts.
  assert default["eval.stage"] == "auto"
  older = dict(default, **{"eval.stage": "sasrec", "eval.split": "test"})
  assert experiments.config_diffs(run, older, default, default) == []


def test_check_runs_names_a_variant_run_first_and_counts_the_others(tmp_path):
  """The SASRec job comes first in the plan, but the message names the variant's run, its
  first 3 differing settings, how many more there are, and which other runs differ."""
  runs, _ = experiments.plan(_grid(seeds="0", only="lora"), GRID_FILE, str(tmp_path))
  sasrec, lora = runs

  def save(run, **changes):
    config = configuration.json_form(configuration.load(run.config_path, run.overrides))
    config["lora"].update(changes)
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      json.dump(config, f)

  save(sasrec, rank=64)
  save(lora, alpha=1.5, dropout=0.5, gate="uniform", rank=64)
  with pytest.raises(experiments.UserError) as err:
    experiments.check_runs(runs)
  message = str(err.value)
  assert message.startswith(f"run lora/seed0 in {lora.workdir} was made with other settings")
  shown = [k for k in ("alpha", "dropout", "gate", "rank") if f"lora.{k} " in message]
  assert len(shown) == 3 and f"; 1 more (so were {sasrec.name});" in message
  os.remove(os.path.join(sasrec.workdir, "config.json"))
  save(lora, alpha=1.5)
  with pytest.raises(experiments.UserError) as err:
    experiments.check_runs(runs)
  assert "lora.alpha 1.5 (saved) vs " in str(err.value) and "more" not in str(err.value)
  with open(os.path.join(lora.workdir, "config.json"), "w") as f:
    f.write("[1]")
  with pytest.raises(experiments.UserError, match="not a JSON object; give another --workdir"):
    experiments.check_runs(runs)


def test_tables_of_each_split_in_numeric_seed_and_group_order():
  """The test tables show the test records; seeds and groups in numeric order; runs of one
  SASRec that share no seed are one SASRec row over both seeds; a run of 0 seconds is
  finished; a grid without a title gets the default one."""

  def rec(hr, sas, group_sas=0.0):
    out = {"hr@1": hr, "sasrec/hr@1": sas}
    for g in (2, 10):
      out.update({f"group/{g}/hr@1": hr, f"group/{g}/sasrec/hr@1": group_sas + g})
    return out

  runs = {
    "a": {"10": {"val": rec(0.1, 0.3), "test": rec(0.9, 0.7)}},
    "b": {"2": {"val": rec(0.2, 0.5), "test": rec(0.8, 0.7)}},
  }
  results = dict(_results(runs), commands={"a/seed10": "c", "b/seed2": "c"},
                 seconds={"a/seed10": 0.0})  # fmt: skip
  md = experiments.markdown(ConfigDict({"title": "", "description": ""}), results, ["hr@1"], "a")
  assert md.startswith("# Experiment grid\n")
  val, test = md.split("## test\n")
  assert "| a | 1 | 0.1000 |" in val and "| a | 1 | 0.9000 |" in test
  sd = np.sqrt(((0.3 - 0.4) ** 2 + (0.5 - 0.4) ** 2) / 1)  # ddof 1, n = 2.
  assert f"| SASRec (frozen, same candidates) | 2 | 0.4000 ± {sd:.4f} |" in val
  assert "| variant | seed 2 | seed 10 |" in val and "| a | - | 0.1000 |" in val
  assert (
    "| variant | group 2 | group 10 |" in val
    and "| SASRec | 2.0000 ± 0.0000 | 10.0000 ± 0.0000 |" in val
  )
  assert "| a/seed10 | 0 | - | `c` |" in md and "| b/seed2 | not finished | - | `c` |" in md
  # Two SASRecs (other figures on the same seed): a per-group row each, named.
  runs = {"a": {"0": {"val": rec(0.1, 0.3)}}, "b": {"0": {"val": rec(0.2, 0.5, 1.0)}}}
  md = experiments.markdown(_TITLED, _results(runs), ["hr@1"], "a")
  assert "| SASRec of a | 2.0000 | 10.0000 |" in md and "| SASRec of b | 3.0000 | 11.0000 |" in md


def test_paired_differences_need_both_seeds_and_a_reference():
  """Seeds of the variant alone, or where the reference lacks the metric, are left out; a
  grid of one variant has no paired table; a reference with no finished run is not said to
  be on other candidates."""
  runs = {"ref": {"0": {"val": {"hr@1": 0.25}}, "1": {"val": {"mrr": 0.5}}},
          "v": {s: {"val": {"hr@1": 0.5}} for s in ("0", "1", "2")}}  # fmt: skip
  assert experiments.paired(_results(runs), "v", "ref", "val", "hr@1") == ([0.25], [0.25])
  alone = experiments.markdown(_TITLED, _results({"ref": runs["ref"]}), ["hr@1"], "ref")
  assert "Paired difference" not in alone
  unfinished = experiments.markdown(_TITLED, _results({"v": runs["v"]}), ["hr@1"], "ref")
  assert "Paired difference" not in unfinished and "other candidates" not in unfinished


def test_the_gate_test_table_is_the_val_splits_only():
  record = {"hr@1": 0.5, "group/0/hr@1": 0.5, "group/1/hr@1": 0.5}
  runs = {"a": {"0": {"val": dict(record), "test": dict(record)}}}
  results = dict(
    _results(runs), gate_test={"a": {"0": {"distance": 0.5, "chance": 0.1, "p": 0.01}}}
  )
  md = experiments.markdown(_TITLED, results, ["hr@1"], "a")
  assert md.count("Is that more than chance?") == 1
  assert "| a | 0 | 0.5000 | 0.1000 | 0.010 |" in md.split("## test\n")[0]


def test_results_seed_is_the_numerically_first():
  runs = {"a": {"10": {}, "2": {}, "9": {}}}
  assert experiments.results_seed(_results(runs), "a") == 2
  assert experiments.results_seed(_results(runs), "b") is None


def test_gate_specialisation_of_three_groups_one_group_or_a_missing_gate():
  def record(gates):
    return {f"group/{g}/gate/{e}": w for g, row in enumerate(gates) for e, w in enumerate(row)}

  # Pairs: |1-0|+|0-1| -> 1, and 0.5 twice: the mean of (1, 0.5, 0.5) is 2/3.
  three = record([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
  assert experiments.gate_specialisation(three, [0, 1, 2], 2) == pytest.approx(2 / 3)
  assert experiments.gate_specialisation(record([[1.0, 0.0]]), [0], 2) is None
  missing = record([[1.0, 0.0], [0.0, 1.0]])
  del missing["group/1/gate/1"]
  assert experiments.gate_specialisation(missing, [0, 1], 2) is None


def test_gate_permutation_test_against_the_exact_null_of_a_tiny_case():
  """4 rows in 2 groups of 2: the 6 equally likely splittings give distance 0.75 (the
  observed split and its mirror) or 0.25 (the other 4): chance = 5/12, p = about 1/3 (ties
  count as at least as large). Gates alike in every row: distance 0 every time, p = 1."""
  gates = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
  groups = np.array([0, 0, 1, 1])
  test = experiments.gate_permutation_test(gates, groups, rounds=3000)
  assert test["distance"] == pytest.approx(0.75)
  assert test["chance"] == pytest.approx(5 / 12, abs=0.02)
  assert test["p"] == pytest.approx(1 / 3, abs=0.03)
  flat = experiments.gate_permutation_test(np.full((4, 2), 0.5), groups, rounds=10)
  assert flat == {"distance": 0.0, "chance": 0.0, "p": 1.0}
  # The seed picks the shuffles.
  chances = {experiments.gate_permutation_test(gates, groups, rounds=5, seed=s)["chance"]
             for s in range(4)}  # fmt: skip
  assert len(chances) > 1


def test_the_gate_test_skips_one_expert_or_mismatched_groups(tmp_path):
  os.makedirs(tmp_path / "report")
  run = experiments.Run("ilora/seed0", "ilora", 0, str(tmp_path), [])
  path = tmp_path / "report" / "gates.npz"
  np.savez(path, gates=np.ones((4, 1)), groups=np.array([0, 0, 1, 1]))
  assert experiments.gate_test(run) is None
  np.savez(path, gates=np.full((4, 2), 0.5), groups=np.array([0, 1, 1]))
  assert experiments.gate_test(run) is None


def test_a_split_the_runs_could_not_evaluate_is_said_in_the_results(tmp_path):
  """Real data without a test file: each run records test as skipped, so the tables have no
  test section; results.md says why, where a reader looks for it."""
  why = "test file not found: /data/ml/Test_data.df"
  runs = [experiments.Run(f"a/seed{s}", "a", s, str(tmp_path / f"a{s}"), []) for s in (0, 1)]
  for i, run in enumerate(runs):
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
      for r in (dict(split="val", final=True, candidates="X", **{"hr@1": 0.1 * (i + 1)}),
                dict(split="test", skipped=why)):  # fmt: skip
        f.write(json.dumps(dict(run="ilora", stage="ilora", step=4, **r)) + "\n")
  resolved = {"a": ConfigDict({"ilora": {"eval_rows": 8}, "lora": {"num_experts": 4}})}
  results = experiments.collect(runs, resolved)
  assert results["skipped"] == {"test": {"a/seed0": why, "a/seed1": why}}
  md = experiments.markdown(_TITLED, dict(results, machine="test"), ["hr@1"], "a")
  assert f"## test\n\nNot evaluated on test by 2 runs: {why}\n" in md
  assert md.index("## val") < md.index("## test") < md.index("## Runs")
  # Evaluated by some: the line follows their tables.
  results["runs"]["a"]["0"]["test"] = dict(final=True, candidates="X", **{"hr@1": 0.5})
  del results["skipped"]["test"]["a/seed0"]
  md = experiments.markdown(_TITLED, dict(results, machine="test"), ["hr@1"], "a")
  test = md.split("## test\n")[1]
  assert test.count("## test") == 0 and f"Not evaluated on test by 1 run: {why}" in test


def test_a_run_is_finished_by_its_own_stages_final_test_record(tmp_path):
  """The final test record (or test recorded as skipped) of the run's stage, in its own run
  (a pipeline's SASRec stage finishing is not the ilora run finishing); a final val record
  alone is not."""
  ilora = experiments.Run("a/seed0", "a", 0, str(tmp_path / "a"), [])
  sasrec = experiments.Run("sasrec/seed0", "sasrec", 0, str(tmp_path / "s"), [])

  def write(run, *records):
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(dict(step=1, **r)) + "\n" for r in records)

  def final(stage, split, **more):
    return dict(stage=stage, run=stage, split=split, **more)

  write(ilora, final("sasrec", "test", final=True), final("ilora", "val", final=True))
  assert not experiments.finished(ilora)
  write(ilora, final("ilora", "val", final=True), final("ilora", "test", skipped="no rows"))
  assert experiments.finished(ilora)
  write(sasrec, final("sasrec", "test", final=True))
  assert experiments.finished(sasrec)
  write(sasrec, final("ilora", "test", final=True))
  assert not experiments.finished(sasrec)


def test_metrics_of_one_kind_need_one_variant_that_records_them():
  def config(generate):
    return ConfigDict({"ilora": {"eval_generate": generate, "eval_score": True}})

  resolved = {"a": config(False), "b": config(True)}
  grid = ConfigDict({"metrics": "hit_ratio@1,mrr"})
  assert experiments.parse_metrics(grid, resolved) == ["hit_ratio@1", "mrr"]


def test_grid_keys_in_a_listed_override_are_refused_whatever_the_spaces():
  with pytest.raises(experiments.UserError, match="sets train.seed"):
    experiments._overrides((" train.seed =5",), "grid.overrides")


def test_run_folders_of_other_grids_are_named(tmp_path):
  for name in ("lora", "zeta", "alpha"):
    os.makedirs(tmp_path / "runs" / name)
  folder = str(tmp_path / "runs")
  assert experiments._other_runs(str(tmp_path), {"lora": None}) == [
    os.path.join(folder, "alpha"),
    os.path.join(folder, "zeta"),
  ]
  assert experiments._other_runs(str(tmp_path / "none"), {}) == []


# ----------------------------------------------------------------------------- CLI


def test_dry_run_lists_the_commands_in_order(tmp_path):
  w = str(tmp_path / "grid")
  proc = run_cli(
    GRID, f"--workdir={w}", "--dry_run", "--grid.seeds=3", module="ilora_jax.experiments"
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert [line.split("--workdir=")[1].split()[0] for line in lines] == [
    f"{w}/sasrec/seed3",
    f"{w}/runs/lora/seed3",
    f"{w}/runs/ilora/seed3",
    f"{w}/runs/uniform/seed3",
  ]
  assert "--config.stage=sasrec" in lines[0] and "--config.train.seed=3" in lines[0]
  assert f"--config.sasrec.init_from={w}/sasrec/seed3" in lines[1]
  assert lines[1].endswith("--config.lora.num_experts=1 --config.lora.gate=constant")
  assert not os.path.exists(w)  # A dry run writes nothing.
  # One given SASRec for every run: no SASRec jobs, every run freezes that one.
  given = tiny_sasrec_pt(tmp_path / "m.pt")  # Loaded as the runs will load it: of the tiny shapes.
  proc = run_cli(GRID, f"--workdir={w}", "--dry_run", f"--grid.sasrec={given}",
                 module="ilora_jax.experiments")  # fmt: skip
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 9 and all(f"--config.sasrec.init_from={given}" in x for x in lines)
  # A SASRec the real run would refuse is refused by the dry run too.
  proc = run_cli(GRID, f"--workdir={w}", "--dry_run", "--grid.sasrec=/x/m.pt",
                 module="ilora_jax.experiments")  # fmt: skip
  assert_one_line_error(proc, "grid.sasrec", "/x/m.pt")
  assert not proc.stdout


@pytest.mark.parametrize("mode", ["run", "--dry_run"])
@pytest.mark.parametrize("given", ["empty", "other_items"])
def test_a_sasrec_the_runs_would_refuse_is_refused_before_any_job(tmp_path, mode, given):
  """--grid.sasrec is loaded as each run's ilora stage will load it (without the LLM): an
  empty or corrupt .pt, or one trained on another data set's items, is refused with the
  run's own message by the dry run and by the real run before its first job."""
  if given == "empty":
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    fragments = (f"checkpoint {path} is corrupt or truncated",)
  else:
    path = shared_path("checkpoints", "sasrec", "lastfm.pt")
    fragments = (f"checkpoint {path} was trained on 4606 items but the data set has 60",)
  w = tmp_path / "grid"
  proc = run_cli("--grid=configs/experiments/routers.py", f"--workdir={w}", "--grid.seeds=0",
                 f"--grid.sasrec={path}", *([] if mode == "run" else [mode]),
                 module="ilora_jax.experiments")  # fmt: skip
  assert_one_line_error(proc, "run resnet1d/seed0: ", *fragments)
  assert not proc.stdout and not w.exists()


def test_a_grid_argument_the_grid_file_refuses_is_one_line_naming_the_flag(tmp_path):
  proc = run_cli("--grid=configs/experiments/routers.py:foo", f"--workdir={tmp_path / 'w'}",
                 "--dry_run", module="ilora_jax.experiments")  # fmt: skip
  line = assert_one_line_error(
    proc, "--grid=configs/experiments/routers.py:foo: unknown grid scale 'foo'",
    "tiny, lastfm or movielens",
  )  # fmt: skip
  assert "ValueError" not in line and "flag --grid" not in line
  for arg in ("zz", "0"):
    proc = run_cli(f"--grid=configs/experiments/negative_transfer.py:{arg}",
                   f"--workdir={tmp_path / 'w'}", "--dry_run",
                   module="ilora_jax.experiments")  # fmt: skip
    assert_one_line_error(
      proc, f"--grid=configs/experiments/negative_transfer.py:{arg}: the argument is K, the "
      f"number of user groups (1, 2, ...), not '{arg}'",
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["run", "--dry_run"])
def test_a_workdir_that_is_a_file_is_refused_by_the_dry_run_as_by_the_run(tmp_path, mode):
  w = tmp_path / "w"
  w.write_text("a file")
  for workdir in (w, w / "below"):
    proc = run_cli(GRID, f"--workdir={workdir}", "--grid.seeds=0", "--grid.only=lora",
                   *([] if mode == "run" else [mode]), module="ilora_jax.experiments")  # fmt: skip
    assert_one_line_error(proc, f"cannot create workdir {workdir}: {w} is a file, not a folder")
    assert not proc.stdout
  assert w.read_text() == "a file"


def test_report_only_of_a_missing_workdir_is_refused_and_creates_nothing(tmp_path):
  w = tmp_path / "typo"
  proc = run_cli(GRID, f"--workdir={w}", "--report_only", module="ilora_jax.experiments")
  assert_one_line_error(proc, f"--report_only: {w} is no grid's workdir")
  assert not w.exists()


@pytest.mark.parametrize(
  "args, fragments",
  [
    (("--grid.extra=lora.nope=1",), ("grid overrides", "nope")),
    (("--grid.extra=lora.gate=sometimes",), ("grid overrides", "lora.gate", "sometimes")),
    (("--grid.extra=ilora.train.steps=-1",), ("grid overrides", "steps")),
    (("--grid.only=lora,zzz",), ("unknown variants", "zzz")),
    (("--grid.only=,",), ("grid.only=',' names no variant",)),
    (("--grid.only=lora,lora",), ("grid.only='lora,lora' names a variant twice",)),
    (
      ("--grid.extra=train.seed=5",),
      ("grid.extra: 'train.seed=5' sets train.seed", "--grid.seeds"),
    ),
    (("--grid.extra=stage=sasrec",), ("grid.extra: 'stage=sasrec' sets stage, which the grid",)),
    (("--grid.seeds=1,x",), ("grid.seeds",)),
    # A seed each run would refuse: refused by the runner (and its dry run) before any job.
    (("--grid.seeds=-1",), ("run sasrec/seed-1", "train.seed=-1 must be in [0, 2**32)")),
    (("--grid.seeds=0,-1", "--dry_run"), ("run sasrec/seed-1", "train.seed=-1")),
    (("--grid.metrics=", "--dry_run"), ("grid.metrics='' names no metric",)),
    (("--grid.metrics=hr@10,mrr", "--report_only"), ("grid.metrics names hr@10", "hr@5")),
    (("--grid.reference=lorra", "--report_only"), ("grid.reference='lorra'", "lora, ilora")),
  ],
)
def test_bad_grids_fail_before_any_run(tmp_path, args, fragments):
  w = str(tmp_path / "grid")
  proc = run_cli(GRID, f"--workdir={w}", *args, module="ilora_jax.experiments")
  assert_one_line_error(proc, *fragments)
  assert not os.path.exists(w)


def test_variants_of_the_same_settings_are_refused(tmp_path):
  """Two variants whose overrides come to the same config (the same overrides, or one
  setting the config's own value) trained the same runs twice, and compared them as if they
  differed."""
  _, resolved = experiments.plan(_grid(variants=("a:",), reference="a"), GRID_FILE, str(tmp_path))
  rank = resolved["a"].lora.rank  # The grid's own (its overrides', else its config's).
  for variants in (("a: lora.rank=2", "b: lora.rank=2"), ("a:", f"b: lora.rank={rank}")):
    grid = _grid(variants=variants, reference="a")
    with pytest.raises(experiments.UserError) as exc:
      experiments.plan(grid, GRID_FILE, str(tmp_path))
    assert str(exc.value) == (
      "variants a and b give the same settings (their runs would be "
      "copies of one another): give b other overrides, or leave it out"
    )
  grid = _grid(variants=("a: lora.rank=2 lora.dropout=0.0 lora.rank=4",), reference="a")
  with pytest.raises(
    experiments.UserError,
    match=r"variant a: sets lora.rank twice \('lora.rank=2', 'lora.rank=4'\): give it once",
  ):
    experiments.plan(grid, GRID_FILE, str(tmp_path))


def test_a_bad_variant_is_named(tmp_path):
  grid = tmp_path / "grid.py"
  grid.write_text(
    "from ml_collections import config_dict\n"
    "def get_config():\n"
    "  c = config_dict.ConfigDict()\n"
    "  c.config, c.title, c.description = 'configs/tiny.py', '', ''\n"
    "  c.overrides, c.extra, c.seeds, c.only = (), '', '0', ''\n"
    "  c.variants = ('good: lora.rank=4', 'bad: lora.rank=3 lora.num_experts=2')\n"
    "  c.share_sasrec, c.metrics, c.reference = True, 'hr@1', 'good'\n"
    "  return c\n"
  )
  proc = run_cli(f"--grid={grid}", f"--workdir={tmp_path / 'w'}", module="ilora_jax.experiments")
  assert_one_line_error(proc, "variant bad", "lora.rank=3", "multiple of lora.num_experts=2")
  assert not os.path.exists(tmp_path / "w")


def test_a_grid_of_the_documented_fields_runs_and_a_run_config_is_no_grid(tmp_path):
  """A grid file of only config, overrides, variants and seeds gets the other fields'
  defaults (the first variant is the reference); a run config given as the grid is named."""
  grid = tmp_path / "grid.py"
  grid.write_text(
    "from ml_collections import config_dict\n"
    "def get_config():\n"
    "  c = config_dict.ConfigDict()\n"
    "  c.config, c.overrides, c.seeds = 'configs/tiny.py', (), '0'\n"
    "  c.variants = ('a: lora.num_experts=1 lora.gate=constant',)\n"
    "  return c\n"
  )
  w = tmp_path / "w"
  proc = run_cli(f"--grid={grid}", f"--workdir={w}", "--dry_run", module="ilora_jax.experiments")
  assert proc.returncode == 0, proc.stderr
  assert [line.split("--workdir=")[1].split()[0] for line in proc.stdout.splitlines()] == [
    f"{w}/sasrec/seed0",
    f"{w}/runs/a/seed0",
  ]
  proc = run_cli("--grid=configs/tiny.py", f"--workdir={w}", module="ilora_jax.experiments")
  assert_one_line_error(proc, "configs/tiny.py is no grid file", "lacks config, variants, seeds")
  assert not w.exists()


@pytest.mark.parametrize("mode", ["run", "--dry_run"])
def test_a_grid_whose_data_is_missing_fails_before_any_run(tmp_path, mode):
  """A real data set's files are looked for when the grid is planned (dry run included), not
  when its first job starts."""
  args = ["--grid=configs/experiments/lora_vs_ilora.py:lastfm", f"--workdir={tmp_path / 'w'}"]
  args += [] if mode == "run" else [mode]
  proc = run_cli(*args, module="ilora_jax.experiments")
  assert_one_line_error(proc, "run sasrec/seed0: data folder not found: data/lastfm", "data.dir")
  proc = run_cli(*args, f"--grid.extra=data.dir={tmp_path}", module="ilora_jax.experiments")
  assert_one_line_error(proc, f"data file not found: {tmp_path}/train_data.df")
  assert not os.path.exists(tmp_path / "w")


def test_missing_grid_and_failed_run_are_one_line_errors(tmp_path):
  proc = run_cli(
    "--grid=configs/experiments/nope.py", "--workdir=x", module="ilora_jax.experiments"
  )
  assert_one_line_error(proc, "nope.py")
  w = str(tmp_path / "grid")
  # Too few users for one SASRec batch: the first job fails; the runner names it and its log.
  proc = run_cli(
    GRID,
    f"--workdir={w}",
    "--grid.seeds=0",
    "--grid.extra=data.synthetic.num_users=10 sasrec.train.batch_size=256",
    module="ilora_jax.experiments",
  )
  line = assert_one_line_error(proc, "run sasrec/seed0 failed", "fewer than one batch", "log.txt")
  assert os.path.join(w, "sasrec", "seed0", "log.txt") in line


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("grid"))
  proc = run_cli(
    GRID, f"--workdir={w}", "--grid.seeds=0", "--grid.only=lora,ilora", SMOKE,
    module="ilora_jax.experiments",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  return w, proc


def test_grid_runs_tabulates_and_plots(smoke):
  w, proc = smoke
  assert "grid: 3 runs, 0 already finished" in proc.stdout
  md = open(os.path.join(w, "results.md")).read()
  results = json.load(open(os.path.join(w, "results.json")))
  for variant in ("lora", "ilora"):
    run_dir = os.path.join(w, "runs", variant, "seed0")
    for split in ("val", "test"):
      final = _final(run_dir, split)
      assert results["runs"][variant]["0"][split]["hr@1"] == final["hr@1"]
      row = [line for line in md.split(f"## {split}")[1].splitlines()
             if line.startswith(f"| {variant} | 1 |")][0]  # fmt: skip
      assert f"{final['hr@1']:.4f}" in row and f"{final['mrr']:.4f}" in row
    # Both variants froze the seed's one SASRec: identical SASRec figures.
    assert (
      _final(run_dir, "val")["sasrec/mrr"]
      == _final(os.path.join(w, "runs", "lora", "seed0"), "val")["sasrec/mrr"]
    )
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["sasrec"]["init_from"] == os.path.join(w, "sasrec", "seed0")
    assert not [r for r in metrics_records(run_dir) if r["stage"] == "sasrec"]  # None trained here.
  # Per-group metrics: rows add up, and the groups' hr@1 average (row-weighted) to the total.
  final = _final(os.path.join(w, "runs", "ilora", "seed0"), "val")
  groups = sorted({int(k.split("/")[1]) for k in final if k.startswith("group/")})
  rows = np.array([final[f"group/{g}/rows"] for g in groups])
  assert rows.sum() == 8
  hr = np.array([final[f"group/{g}/hr@1"] for g in groups])
  assert np.dot(rows, hr) / rows.sum() == pytest.approx(final["hr@1"])
  for g in groups:
    gates = [final[f"group/{g}/gate/{e}"] for e in range(4)]
    assert sum(gates) == pytest.approx(1, abs=1e-5)
  assert "Per user group" in md and "Gate specialisation" in md and "shuffled labels" in md
  # The commands' relative paths (configs/tiny.py) are from the folder the runner ran in;
  # each run's code is the git commit it was made with.
  runs_section = md.split("## Runs")[1]
  assert f"Each command as the runner starts it, in `{ROOT}`:" in runs_section
  assert "--config=configs/tiny.py" in runs_section
  code = experiments.code_version()
  assert results["code"]["lora/seed0"] == [code]
  assert f"| lora/seed0 | {results['seconds']['lora/seed0']:.0f} | {code} | `" in runs_section
  test = results["gate_test"]["ilora"]["0"]
  assert 0 < test["p"] <= 1 and test["distance"] >= 0
  for name in ("metrics.png", "groups.png", "gates.png", "loss.png"):
    assert os.path.getsize(os.path.join(w, "plots", name)) > 1000


def test_a_dry_run_of_a_finished_grid_does_not_check_its_sasrec(smoke, tmp_path):
  """As the real run, which only checks --grid.sasrec where runs are left to use it: a
  finished grid's dry run lists its commands even when that SASRec has since moved. The
  grid: the smoke grid's lora run, as if made with --grid.sasrec=/moved/m.pt."""
  w = tmp_path / "grid"
  _copy_runs(smoke[0], w, ["runs/lora/seed0"])
  path = w / "runs" / "lora" / "seed0" / "config.json"
  config = json.loads(path.read_text())
  config["sasrec"]["init_from"] = "/moved/m.pt"
  path.write_text(json.dumps(config))
  args = [GRID, f"--workdir={w}", "--dry_run", "--grid.seeds=0", "--grid.only=lora", SMOKE]
  proc = run_cli(*args, "--grid.sasrec=/moved/m.pt", module="ilora_jax.experiments")
  assert proc.returncode == 0, proc.stderr
  assert len(proc.stdout.strip().splitlines()) == 1
  # Another SASRec than the one the finished run froze: refused, naming both.
  proc = run_cli(*args, "--grid.sasrec=/other/m.pt", module="ilora_jax.experiments")
  assert_one_line_error(
    proc, "run lora/seed0", 'sasrec.init_from "/moved/m.pt" (saved) vs "/other/m.pt" (planned)'
  )
  assert not proc.stdout


@pytest.mark.parametrize("mode", ["run", "--dry_run", "--report_only"])
def test_finished_runs_of_other_overrides_are_refused_before_anything_runs(smoke, mode):
  """The same grid and workdir with other --grid.extra: its finished runs are not taken as
  runs of the new commands (results.md would list those with the old numbers)."""
  w, _ = smoke
  before = open(os.path.join(w, "results.md")).read()
  saved = json.load(open(os.path.join(w, "runs", "lora", "seed0", "config.json")))
  proc = run_cli(GRID, f"--workdir={w}", "--grid.seeds=0", "--grid.only=lora,ilora",
                 SMOKE + " lora.rank=16 ilora.train.steps=9", *([] if mode == "run" else [mode]),
                 module="ilora_jax.experiments")  # fmt: skip
  assert_one_line_error(
    proc,
    f"run lora/seed0 in {os.path.join(w, 'runs', 'lora', 'seed0')} was made with other settings",
    f"lora.rank {saved['lora']['rank']} (saved) vs 16 (planned)",
    f"ilora.train.steps {saved['ilora']['train']['steps']} (saved) vs 9 (planned)",
    # The SASRec job's config has every key.
    "(so were ilora/seed0, sasrec/seed0)",
    "give another --workdir",
  )
  assert not proc.stdout  # Nothing listed, run or tabulated.
  assert open(os.path.join(w, "results.md")).read() == before


def test_runs_of_older_code_with_the_same_command_are_not_refused(tmp_path):
  """A config.json written before the per-stage log_every_steps: its train.log_every_steps
  (how often training was recorded) and, on synthetic data, its data.min_len (which that
  code ignored there: every row was kept, as min_len=1 keeps them now) are no other settings;
  a changed min_len of a newer run is, and so is a command that now drops rows."""
  planned = experiments._json_form(configuration.load("configs/tiny.py"))
  run = experiments.Run("ilora/seed0", "ilora", 0, str(tmp_path), [])
  older = {k: v for k, v in planned.items() if not k.endswith("train.log_every_steps")}
  older.update({"train.log_every_steps": 5, "data.min_len": 3})
  assert experiments.config_diffs(run, older, planned, planned) == []
  newer = dict(planned, **{"data.min_len": 3, "ilora.train.log_every_steps": 7})
  assert experiments.config_diffs(run, newer, planned, planned) == [
    "data.min_len 3 (saved) vs 1 (planned)"
  ]
  # A command that drops short histories now is not what those runs did, whatever they say.
  wants_filter = dict(planned, **{"data.min_len": 3})
  assert experiments.config_diffs(run, older, wants_filter, planned) == [
    "data.min_len 1 (saved) vs 3 (planned)"
  ]


def test_results_drop_the_plots_they_no_longer_draw(smoke, tmp_path):
  """Plots of an earlier report (gates of gated variants, here) that this one does not draw
  are removed: the plots folder always shows what results.md does."""
  w, _ = smoke
  folder = tmp_path / "plots"
  folder.mkdir()
  for name in ("metrics.png", "groups.png", "gates.png", "loss.png"):
    (folder / name).write_bytes(b"an earlier report's figure")
  grid = _grid(seeds="0", only="lora", extra=SMOKE_EXTRA)
  runs, resolved = experiments.plan(grid, GRID_FILE, w)
  experiments.write_results(grid, runs, resolved, str(tmp_path))
  md = (tmp_path / "results.md").read_text()
  assert "Per user group" in md and "Gate specialisation" not in md  # lora: one expert.
  assert sorted(os.listdir(folder)) == ["groups.png", "loss.png", "metrics.png"]
  assert all(os.path.getsize(folder / name) > 1000 for name in os.listdir(folder))


def test_results_stopped_midway_keep_the_earlier_plots(smoke, tmp_path, monkeypatch):
  """A full disk (or a signal) while a plot was written left a PNG cut short under the name
  results.md shows; each plot now replaces its file once complete."""
  import errno

  import matplotlib.figure

  w, _ = smoke
  grid = _grid(seeds="0", only="lora", extra=SMOKE_EXTRA)
  runs, resolved = experiments.plan(grid, GRID_FILE, w)
  experiments.write_results(grid, runs, resolved, str(tmp_path))
  folder = tmp_path / "plots"
  before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

  def cut_short(self, fname, **kwargs):
    with open(fname, "wb") as f:
      f.write(b"\x89PNG")  # The start of a plot, then the disk is full.
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", cut_short)
  with pytest.raises(experiments.UserError, match="cannot write the results in .*: No space"):
    experiments.write_results(grid, runs, resolved, str(tmp_path))
  assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


def test_a_diverged_runs_gate_test_is_nan_and_results_json_strict_json(smoke, tmp_path):
  """NaN gates (a diverged run) gave a NaN distance that no shuffle reached, so p was
  1/1001, "significant"; now the test's three figures are NaN, as the specialisation table's
  distance is, and results.json writes them as the log does ("nan"), not as a NaN token that
  JSON readers refuse."""
  w = str(tmp_path)
  _copy_runs(smoke[0], w, ["sasrec/seed0", "runs/ilora/seed0"])
  report_dir = os.path.join(w, "runs", "ilora", "seed0", "report")
  os.makedirs(report_dir)
  gates = np.full((8, 4), 0.25)
  gates[3] = np.nan
  np.savez(os.path.join(report_dir, "gates.npz"), gates=gates, groups=np.tile([0, 1], 4))
  grid = _grid(seeds="0", only="ilora", extra=SMOKE_EXTRA)
  runs, resolved = experiments.plan(grid, GRID_FILE, w)
  experiments.write_results(grid, runs, resolved, w)

  def refuse(token):
    raise ValueError(f"not JSON: {token}")

  with open(os.path.join(w, "results.json")) as f:
    results = json.load(f, parse_constant=refuse)
  assert results["gate_test"]["ilora"]["0"] == {"distance": "nan", "chance": "nan", "p": "nan"}
  md = (tmp_path / "results.md").read_text()
  assert "| ilora | 0 | nan | nan | nan |" in md


def test_a_run_that_scored_nan_is_named_in_the_tables_and_its_gates_drawn(smoke, tmp_path):
  """A diverged run logs its gate weights as the text "nan": the gate heatmap's imshow raised
  a TypeError that stopped the grid (and every --report_only); its ranking metrics (each NaN
  row a miss) stood in the tables as a poor model's, with no word of the divergence."""
  w = str(tmp_path)
  _copy_runs(smoke[0], w, ["sasrec/seed0", "runs/ilora/seed0"])
  path = os.path.join(w, "runs", "ilora", "seed0", "metrics.jsonl")
  records = metrics_records(os.path.dirname(path))
  for r in records:
    if r.get("final") and r["split"] == "val":
      r.update({k: "nan" for k in r if re.fullmatch(r"group/\d+/gate/\d+", k)})
      r["nonfinite_rows"] = 3
      rows = r["rows"]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  grid = _grid(seeds="0", only="ilora", extra=SMOKE_EXTRA)
  runs, resolved = experiments.plan(grid, GRID_FILE, w)
  experiments.write_results(grid, runs, resolved, w)
  val, test = (tmp_path / "results.md").read_text().split("## val")[1].split("## test")
  assert "| ilora (NaN scores: seed 0) | 1 |" in val
  assert f"count it as a miss: ilora seed 0, 3 of {rows} rows." in val
  assert "NaN scores" not in test  # The test split scored finite.
  assert os.path.getsize(tmp_path / "plots" / "gates.png") > 1000


def test_the_code_version_is_this_checkouts_commit_or_unknown(tmp_path, monkeypatch):
  """The git commit of the package's checkout (with "+changes" where tracked files differ);
  "unknown" for a copy outside a checkout, or inside another one (a .venv in a repository)."""
  import subprocess

  def git(*args, cwd=ROOT):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True).stdout.strip()

  if not git("rev-parse", "--show-toplevel"):
    pytest.skip("this copy of the project is not a git checkout")
  dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  want = git("rev-parse", "--short=12", "HEAD") + ("+changes" if dirty else "")
  assert experiments.code_version() == want
  for outer in (tmp_path / "copy", tmp_path / "repo"):
    package = outer / "lib" / "ilora_jax"
    package.mkdir(parents=True)
    if outer.name == "repo":
      git("init", "-q", str(outer))
    monkeypatch.setattr(experiments, "__file__", str(package / "experiments.py"))
    assert experiments.code_version() == "unknown", outer


def test_grid_resumes_and_adds_seeds(smoke):
  """A seed added for one variant (grid.only): results.md keeps the other finished runs
  (ilora's, of the first command), and names a run folder of a variant not in the grid."""
  w, _ = smoke
  before = open(os.path.join(w, "runs", "lora", "seed0", "metrics.jsonl")).read()
  os.makedirs(os.path.join(w, "runs", "other_grids", "seed0"))
  proc = run_cli(
    GRID, f"--workdir={w}", "--grid.seeds=0,1", "--grid.only=lora", SMOKE,
    module="ilora_jax.experiments",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "grid: 4 runs, 2 already finished" in proc.stdout
  assert open(os.path.join(w, "runs", "lora", "seed0", "metrics.jsonl")).read() == before
  values = [_final(os.path.join(w, "runs", "lora", f"seed{s}"), "val")["hr@1"] for s in (0, 1)]
  md = open(os.path.join(w, "results.md")).read()
  row = [line for line in md.split("## val")[1].splitlines() if line.startswith("| lora | 2 |")]
  assert f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" in row[0]
  ilora = _final(os.path.join(w, "runs", "ilora", "seed0"), "val")["hr@1"]
  assert f"| ilora | 1 | {ilora:.4f} |" in md.split("## test")[0]
  assert "| ilora/seed0 | " in md and "| lora/seed1 | " in md
  assert f"Not tabulated (variants this grid does not have): {w}/runs/other_grids" in md
  os.rmdir(os.path.join(w, "runs", "other_grids", "seed0"))
  os.rmdir(os.path.join(w, "runs", "other_grids"))


def test_sigterm_stops_the_grid_after_a_checkpoint_and_the_rerun_resumes(smoke, tmp_path):
  w = str(tmp_path / "grid")
  sasrec = os.path.join(smoke[0], "sasrec", "seed0")  # Trained already: one run in this grid.
  args = [sys.executable, "-m", "ilora_jax.experiments", GRID, f"--workdir={w}",
          "--grid.seeds=0", "--grid.only=lora", f"--grid.sasrec={sasrec}",
          SMOKE + " ilora.train.steps=60"]  # fmt: skip
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  run_dir = os.path.join(w, "runs", "lora", "seed0")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    # The job may be writing a line right now: read as the reports do (a cut line skipped).
    if any(r["split"] == "train" for r in report.read_records(run_dir)):
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)  # To the runner only: it forwards the signal to the job.
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "lora/seed0 stopped by SIGTERM; re-run the same command to resume" in err
  stopped_at = max(r["step"] for r in metrics_records(run_dir) if r["split"] == "train")
  assert 0 < stopped_at < 60
  rerun = run_cli(*args[3:], module="ilora_jax.experiments")
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "grid: 1 runs, 0 already finished" in rerun.stdout
  # This attempt's time, and all attempts' (results.md's, which was the larger, unsaid).
  done = re.search(r"lora/seed0: done in (\d+) s, (\d+) s in all its attempts", rerun.stdout)
  assert done and int(done[1]) <= int(done[2]), rerun.stdout
  steps = [r["step"] for r in metrics_records(run_dir) if r["split"] == "train"]
  assert steps == list(range(1, 61))  # Resumed from the checkpoint: every step once.


@pytest.mark.parametrize(
  "args, fragments",
  [
    (("--grid.extra=train.steps='2",), ("grid.extra", "No closing quotation")),
    # The variant's value came later on each command and won, without a word.
    (
      ("--grid.extra=lora.num_experts=2",),
      ("grid.extra sets lora.num_experts, which variant lora sets itself (lora.num_experts=1)",),
    ),
    (("--grid.sasrec=/nonexistent/m.pt",), ("grid.sasrec not found", "/nonexistent/m.pt")),
    (("--grid.sasrec={tmp}",), ("grid.sasrec=", "without a SASRec checkpoint")),
    (("--grid.sasrec={tmp}/part",), ("/part: its SASRec stage has not finished",)),
  ],
  ids=[
    "unbalanced_quote",
    "extra_set_by_a_variant",
    "missing_sasrec",
    "sasrec_folder_without_checkpoint",
    "sasrec_unfinished",
  ],  # fmt: skip
)
def test_bad_extra_and_sasrec_fail_before_any_run(tmp_path, args, fragments):
  # A SASRec stage's checkpoint of step 2 without its final records: stopped early.
  os.makedirs(tmp_path / "part" / "checkpoints" / "sasrec" / "2")
  w = str(tmp_path / "grid")
  args = [a.format(tmp=tmp_path) for a in args]
  proc = run_cli(GRID, f"--workdir={w}", *args, module="ilora_jax.experiments")
  assert proc.returncode == 2
  assert_one_line_error(proc, *fragments)
  assert not os.path.exists(w)


def _failing_runner(tmp_path) -> str:
  """A runner script whose every job fails at once (the run itself stubbed out)."""
  script = tmp_path / "grid_fails.py"
  script.write_text(
    f"import sys; sys.path.insert(0, {ROOT!r})\n"
    "from ilora_jax import experiments\n"
    "def execute(run, python):\n"
    "  raise experiments.UserError(f'run {run.name} failed (exit 1): boom')\n"
    "experiments.execute = execute\n"
    "experiments.main()\n"
  )
  return str(script)


def _stubbed_runner(tmp_path, patch: str = "") -> str:
  """A runner script whose every job finishes at once (the run itself stubbed out), with the
  lines `patch` run before it starts."""
  script = tmp_path / "grid_runs.py"
  script.write_text(
    f"import sys; sys.path.insert(0, {ROOT!r})\n"
    "from ilora_jax import experiments\n"
    "done = set()\n"
    "experiments.execute = lambda run, python: done.add(run.name)\n"
    "experiments.finished = lambda run: run.name in done\n"
    f"{patch}"
    "experiments.main()\n"
  )
  return str(script)


@pytest.mark.parametrize("blocked", ["results.md", "plots"])
def test_unwritable_results_let_the_grid_run_and_end_in_one_line(tmp_path, blocked):
  """A folder where results.md goes (a file where the plots go): every run of the grid still
  runs (stubbed out here), then one error line says what could not be written."""
  script = _stubbed_runner(tmp_path)
  w = tmp_path / "grid"
  w.mkdir()
  if blocked == "results.md":
    (w / blocked).mkdir()
  else:
    (w / blocked).write_text("")
  proc = run_cli(GRID, f"--workdir={w}", "--grid.seeds=0", script=script)
  assert_one_line_error(proc, f"cannot write the results in {w}", blocked)
  assert proc.stdout.count(": done in") == 4  # The SASRec job and the three variants.


def test_a_fault_of_the_tables_stops_no_training(tmp_path):
  """An unexpected error writing the tables after a run (a diverged run's gates crashed the
  heatmap) stopped the grid: every run now still runs (stubbed out here), each failed write a
  warning; the final write's error ends the command as an unexpected one."""
  patch = (
    "def write_results(*args):\n"
    "  raise TypeError('a bug')\n"
    "experiments.write_results = write_results\n"
  )
  script = _stubbed_runner(tmp_path, patch)
  proc = run_cli(GRID, f"--workdir={tmp_path / 'grid'}", "--grid.seeds=0", script=script)
  assert proc.returncode == 3, proc.stderr
  assert proc.stdout.count(": done in") == 4  # The SASRec job and the three variants.
  warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: ")]
  assert len(warnings) == 4
  assert all(" were not written (unexpected TypeError: a bug); the grid goes on" in line
             for line in warnings)  # fmt: skip
  assert proc.stderr.splitlines()[-1].startswith("error: unexpected TypeError: a bug")


def test_a_failed_run_leaves_the_error_line_alone_on_stderr(tmp_path):
  """No progress-bar fragments before the runner's `error:` line (stderr is not a terminal);
  stdout says which run was running and where its log is. The run itself is stubbed out."""
  w = str(tmp_path / "grid")
  proc = run_cli(GRID, f"--workdir={w}", "--grid.seeds=0", script=_failing_runner(tmp_path))
  assert proc.returncode == 2
  assert proc.stderr == "error: run sasrec/seed0 failed (exit 1): boom\n"
  log = os.path.join(w, "sasrec", "seed0", "log.txt")
  assert proc.stdout.splitlines()[-1] == f"sasrec/seed0: running, log {log}"
  assert not os.path.exists(os.path.join(w, "results.md"))  # No run finished: no tables.


def test_a_failed_run_still_tabulates_the_runs_finished_before(smoke, tmp_path):
  """The lora run and the SASRec finished in an earlier invocation (elsewhere: the workdir
  was moved since, which keeps them); the ilora run now fails at once. results.md shows the
  lora run's numbers; the failure stays the one line on stderr."""
  w = str(tmp_path / "grid")
  _copy_runs(smoke[0], w, ["sasrec/seed0", "runs/lora/seed0"])
  proc = run_cli(GRID, f"--workdir={w}", "--grid.seeds=0", "--grid.only=lora,ilora", SMOKE,
                 script=_failing_runner(tmp_path))  # fmt: skip
  assert proc.returncode == 2
  assert proc.stderr == "error: run ilora/seed0 failed (exit 1): boom\n"
  assert "grid: 3 runs, 2 already finished" in proc.stdout
  md = open(os.path.join(w, "results.md")).read()
  for split in ("val", "test"):
    final = _final(os.path.join(w, "runs", "lora", "seed0"), split)
    row = [line for line in md.split(f"## {split}")[1].splitlines()
           if line.startswith("| lora | 1 |")][0]  # fmt: skip
    assert f"{final['hr@1']:.4f}" in row and f"{final['mrr']:.4f}" in row
  assert "| ilora/seed0 | not finished |" in md
  assert os.path.getsize(os.path.join(w, "plots", "metrics.png")) > 1000


def test_a_run_killed_by_a_signal_or_without_a_folder_is_named_so(tmp_path):
  """A job killed (SIGKILL, the kernel out of memory) was reported with its log's last line
  as the cause ("failed (exit -9): iLoRA: trainable ..."); a read-only workdir ended in an
  unexpected PermissionError (exit 3)."""
  killer = tmp_path / "python"
  killer.write_text("#!/bin/sh\nkill -9 $$\n")  # Stands in for the job's interpreter.
  killer.chmod(0o755)
  run = experiments.Run("lora/seed0", "lora", 0, str(tmp_path / "run"), ["--config=c.py"])
  with pytest.raises(experiments.UserError) as raised:
    experiments.execute(run, str(killer))
  log = tmp_path / "run" / "log.txt"
  assert str(raised.value) == (
    f"run lora/seed0 was killed by SIGKILL (the system out of memory, or someone's kill?) "
    f"[log: {log}; re-run the same command to resume]"
  )
  # A job still running in the folder (another runner's): refused before its log is touched
  # (the refused command's lines went into the running job's log.txt).
  from ilora_jax import files

  before = log.read_text()
  with files.workdir_lock(run.workdir):
    with pytest.raises(experiments.UserError, match=f"^{re.escape(run.workdir)} is in use by "):
      experiments.execute(run, str(killer))
  assert log.read_text() == before
  (tmp_path / "file").write_text("")
  blocked = experiments.Run("lora/seed1", "lora", 1, str(tmp_path / "file" / "run"), [])
  with pytest.raises(experiments.UserError, match=r"^cannot write .*/file/run/log.txt of run "):
    experiments.execute(blocked, str(killer))


def test_sigterm_between_the_jobs_is_one_line_saying_how_to_resume(monkeypatch, capsys, tmp_path):
  """SIGTERM while the runner planned or wrote its tables ended it with no word (exit 143);
  now one line, as Ctrl-C there."""
  import signal
  import time

  from ilora_jax import errors

  def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # The handler raises here first.

  monkeypatch.setattr(experiments, "plan", terminated)
  monkeypatch.setattr(errors, "_exit_now", sys.exit)  # In this process: no os._exit.
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  with pytest.raises(SystemExit) as ended:
    experiments.main(["experiments", GRID, f"--workdir={tmp_path / 'w'}"])
  assert ended.value.code == 143
  assert capsys.readouterr().err == (
    "error: interrupted by SIGTERM; re-run the same command to resume the grid\n"
  )
