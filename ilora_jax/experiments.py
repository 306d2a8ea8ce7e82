r"""Experiment grids: every variant x seed trained and evaluated, resumable, tabulated, plotted.

  python -m ilora_jax.experiments --grid=configs/experiments/<name>.py --workdir=W
      [--grid.seeds=0,1,2] [--grid.only=lora,ilora] [--grid.extra="key=value ..."]
      [--dry_run] [--report_only]

A grid file's `get_config(arg)` names a run config (`config`), overrides for every run
(`overrides`, default none), the variants (`variants`, `name: key=value key=value ...`) and
the seeds (`seeds`); the other fields (`GRID_FIELDS`: `extra`, `only`, `title`,
`description`, `share_sasrec`, `sasrec`, `metrics`, `reference`) have defaults, and
`reference` (the variant of the paired differences; default the first) must name a variant.
`--grid=file.py:arg` passes `arg` (the grids
here take `tiny`, the CPU scale on synthetic data, or a data set name for a GPU run with
SmolLM2-135M). Each run is the ordinary command line,

  python -m ilora_jax.main --config=<config> --workdir=W/runs/<variant>/seed<k> \\
      --config.train.seed=<k> <overrides> <variant overrides>

so every number in the table is reproduced by one command (all are listed in
`W/results.md`). With `share_sasrec`, SASRec trains once per seed in `W/sasrec/seed<k>` and
every variant of that seed freezes the same one (`--config.sasrec.init_from`), so variants
differ only in what the grid varies; a variant whose `data.*` or `sasrec.*` settings differ
freezes a SASRec trained with its own, `W/sasrec/<variant>/seed<k>` (named after the first
variant of those settings; the later ones share it). The SASRec jobs get the common overrides but
`train.*`, which set the iLoRA runs' training (`sasrec.train.*` reaches the SASRec jobs).
`--grid.sasrec=PATH` (an original `.pt` checkpoint or a finished workdir) freezes that one
SASRec in every run instead.

A grid's `config` path, when relative, is looked up in the current folder, then in the grid
file's folder and each folder above it (the shipped grids' `configs/tiny.py` is found from
anywhere). `grid.metrics` (the table columns) must name metrics the runs record.

Before any job starts (and with `--dry_run` or `--report_only` too), each run's config is
loaded from its command exactly as the run will load it, so a value the run would refuse
(`--grid.seeds=-1`) is refused here, and its data files are looked for (a real data set
without `data.dir` is refused before its first job). Where runs are left to run (the dry run
included), `--grid.sasrec` is loaded as their ilora stage will load it (on their data, without
the LLM): one they would refuse (an empty or corrupt `.pt`, one of another data set's item
count) is refused with their message, as is a `--workdir` that is a file. A run whose
workdir already holds a `config.json` with other settings (the same workdir with other
overrides) is refused, naming the run and the settings that differ (`configuration.VOLATILE`
ones, such as `progress`, are not compared; a moved or copied workdir keeps its runs): give
another `--workdir`, or the runs' own overrides.

Re-running the same command skips finished runs and resumes an unfinished one from its last
checkpoint. Ctrl-C, SIGTERM or SIGHUP (unless ignored: `nohup`) reach the running job, which
saves a checkpoint; the runner then exits with 128 + the signal number. After each run, at
the end (and with `--report_only` at any time) it writes `W/results.json`, `W/results.md`
(tables: mean and sample standard deviation over seeds, the per-seed values, paired
differences to the reference variant, per-group metrics and gate specialisation where the
data has user groups; only runs evaluated on the same candidates are compared: runs on other
candidates, as a variant of other `data.*` settings evaluates (or a run of code before
2026-12-07, on other prompt templates), get tables and a SASRec row of their own) and
`W/plots/*.png` (removing figures of an earlier report that this one does not draw); when a
run fails, the tables of the runs finished so far (by this or earlier invocations) are
written before the failure's one `error:` line. The tables show every run of the grid found
in W, whatever `--grid.only` and `--grid.seeds` this command gives (a seed added for one
variant keeps the other variants' tables), each checked against this command's settings as
its own runs are; run folders of variants the grid does not have (another grid's) are named
in `results.md`, not tabulated. Results that cannot be written (a folder where `results.md`
goes, a read-only workdir) do not stop the grid: its runs go on, then the runner ends with
one `error: cannot write the results in W: ...` line.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Collection

import numpy as np
from absl import flags
from ml_collections import ConfigDict

from ilora_jax import configuration, errors, report
from ilora_jax import metrics as metrics_lib
from ilora_jax.errors import UserError, cli_main, parse_flags, require_file
from ilora_jax.files import (
  atomic_path,
  atomic_write,
  check_workdir,
  checkpoint_folder,
  workdir_lock,
)
from ilora_jax.interrupts import ignored

# New attributes: an override of a field the grid file leaves to its default (`complete`,
# which refuses unknown fields, also of flags).
_GRID = errors.define_config_file(
  "grid",
  None,
  "Path to a grid file (configs/experiments/*.py).",
  lock_config=False,
  accept_new_attributes=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the grid's runs and results.")
_DRY_RUN = flags.DEFINE_bool(
  "dry_run",
  False,
  "Check the grid, every run's config (and --grid.sasrec), print the commands and exit.",
)
_REPORT_ONLY = flags.DEFINE_bool(
  "report_only", False, "Only rebuild results.md, results.json and plots from finished runs."
)

SPLITS = ("val", "test")


# ----------------------------------------------------------------------------- the grid


class Run:
  """One job of the grid: a command line and its workdir."""

  def __init__(self, name: str, variant: str, seed: int, workdir: str, argv: list[str]):
    self.name, self.variant, self.seed, self.workdir, self.argv = (
      name,
      variant,
      seed,
      workdir,
      argv,
    )

  @property
  def command(self) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "-m", "ilora_jax.main", *self.argv])

  @property
  def config_path(self) -> str:
    return next(a.split("=", 1)[1] for a in self.argv if a.startswith("--config="))

  @property
  def overrides(self) -> list[str]:
    """The command's `--config.key=value` flags as `key=value` (as `configuration.load`
    takes them)."""
    return [a[len("--config.") :] for a in self.argv if a.startswith("--config.")]


def parse_variants(lines) -> list[tuple[str, list[str]]]:
  """`["name: key=value key=value", ...]` -> [(name, ["key=value", ...])] (names unique)."""
  if isinstance(lines, str):  # Its characters would be the entries.
    raise UserError(f"grid.variants must be a list of 'name: key=value ...' entries, not the "
                    f"string {lines[:60]!r}")  # fmt: skip
  out, seen = [], set()
  for line in lines:
    name, colon, rest = str(line).partition(":")
    name = name.strip()
    if not colon or not name or not name.replace("_", "").replace("-", "").isalnum():
      raise UserError(
        f"grid.variants entry {line!r} must read 'name: key=value ...' with a plain name"
      )
    if name in seen:
      raise UserError(f"grid.variants names {name!r} twice")
    if name == "sasrec":  # The name of the grid's SASRec jobs (their folders, their rows).
      raise UserError("grid.variants: 'sasrec' names the grid's SASRec jobs: give the variant "
                      "another name")  # fmt: skip
    seen.add(name)
    items, keys = _overrides(rest, f"variant {name}"), {}
    for item in items:  # The last would win, unsaid (as --grid.extra's may, on purpose).
      if override_key(item) in keys:
        raise UserError(f"variant {name}: sets {override_key(item)} twice "
                        f"({keys[override_key(item)]!r}, {item!r}): give it once")  # fmt: skip
      keys[override_key(item)] = item
    out.append((name, items))
  if not out:
    raise UserError("grid.variants is empty")
  return out


def override_key(item: str) -> str:
  """The key of a `key=value` override."""
  return item.split("=", 1)[0].strip()


def _overrides(text, where: str) -> list[str]:
  try:
    items = shlex.split(text) if isinstance(text, str) else [str(t) for t in text]
  except ValueError as exc:  # Unbalanced quotes.
    raise UserError(f"{where}: cannot split {text!r} into key=value items: {exc}") from None
  for item in items:
    if "=" not in item or item.startswith("-"):
      raise UserError(f"{where}: override {item!r} must read key=value (without --config.)")
    key = override_key(item)
    if key in GRID_KEYS:
      raise UserError(f"{where}: {item!r} sets {key}, which the grid sets for each run "
                      f"({GRID_KEYS[key]})")  # fmt: skip
  return items


# Settings the grid gives each run itself; an override of them would make its runs copies of
# one another (every seed the same) or other stages than planned.
GRID_KEYS = {
  "train.seed": "give the seeds as --grid.seeds",
  "stage": "a SASRec job per seed, then the ilora stage of each variant",
  "sasrec.init_from": "give one SASRec for every run as --grid.sasrec",
}


def parse_seeds(text) -> list[int]:
  try:
    seeds = [errors.plain_int(s) for s in str(text).replace(" ", "").split(",") if s]
  except ValueError:
    raise UserError(f"grid.seeds={text!r} must be a comma-separated list of integers") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise UserError(f"grid.seeds={text!r} must name at least one seed, each once")
  return seeds


def resolve_config_path(grid: ConfigDict, grid_path: str) -> str:
  """The run config `grid.config`: as given (absolute, or relative to the current folder),
  else relative to the grid file's folder or the nearest folder above it that holds it (so
  the shipped grids' `configs/tiny.py` is found from any current folder)."""
  path = str(grid.config)
  if os.path.isfile(path):
    return path
  if os.path.isabs(path):
    raise UserError(f"grid.config={path} not found")
  beside = folder = os.path.dirname(os.path.abspath(grid_path))
  while True:
    candidate = os.path.join(folder, path)
    if os.path.isfile(candidate):
      shown = os.path.relpath(candidate)
      return candidate if shown.startswith(os.pardir) else shown
    if os.path.dirname(folder) == folder:
      break
    folder = os.path.dirname(folder)
  raise UserError(
    f"grid.config={path} not found (looked in the current folder {os.getcwd()}, then in "
    f"{beside} and each folder above it)"
  )


def plan(
  grid: ConfigDict, grid_path: str, workdir: str, every: bool = False
) -> tuple[list[Run], dict]:
  """The grid's runs in order (the SASRec jobs of a seed first) and every variant's resolved
  config (those grid.only leaves out too). `every`: the runs of every variant, whatever
  grid.only, and of every seed with a run folder in the workdir besides grid.seeds."""
  config_path = resolve_config_path(grid, grid_path)
  grid_extra = _overrides(grid.get("extra", ""), "grid.extra")
  common = _overrides(list(grid.overrides), "grid.overrides") + grid_extra
  variants = parse_variants(grid.variants)
  names = [name for name, _ in variants]
  if grid.get("reference") not in names:
    raise UserError(
      f"grid.reference={grid.get('reference')!r} names no variant of the grid: give one of "
      f"{', '.join(names)}"
    )
  try:  # Refuse bad keys or values before any compute.
    shared = _sasrec_key(configuration.load(config_path, common))
  except UserError as exc:
    raise UserError(f"grid overrides: {exc}") from None
  for name, own in variants:  # A variant's setting comes later on its command: it would win.
    mine = {override_key(item): item for item in own}
    key = next((override_key(item) for item in grid_extra if override_key(item) in mine), None)
    if key is not None:
      raise UserError(
        f"grid.extra sets {key}, which variant {name} sets itself ({mine[key]}): its runs "
        "would keep the variant's value; leave it out of --grid.extra"
      )
  resolved, sasrec_of, keys = {}, {}, {}
  for name, extra in variants:
    try:
      resolved[name] = configuration.load(config_path, [*common, *extra])
    except UserError as exc:
      raise UserError(f"variant {name}: {exc}") from None
    # One SASRec per data and SASRec setting: the first variant of other ones names its own.
    key = keys[name] = _sasrec_key(resolved[name])
    sasrec_of[name] = next((sasrec_of[v] for v in sasrec_of if keys[v] == key),
                           "" if key == shared else name)  # fmt: skip
    same = next((v for v in resolved if v != name and resolved[v] == resolved[name]), None)
    if same is not None:  # Its runs would be the other's, trained again.
      raise UserError(
        f"variants {same} and {name} give the same settings (their runs would be copies of "
        f"one another): give {name} other overrides, or leave it out"
      )
  if grid.only and not every:
    wanted = [v.strip() for v in grid.only.split(",") if v.strip()]
    if len(set(wanted)) != len(wanted):
      raise UserError(f"grid.only={grid.only!r} names a variant twice")
    if not wanted:
      raise UserError(f"grid.only={grid.only!r} names no variant")
    unknown = sorted(set(wanted) - {name for name, _ in variants})
    if unknown:
      raise UserError(f"grid.only names unknown variants: {', '.join(unknown)}")
    variants = [v for v in variants if v[0] in wanted]
  seeds = parse_seeds(grid.seeds)
  if every:
    seeds += sorted(set(_seeds_found(workdir, [name for name, _ in variants])) - set(seeds))
  # The SASRec jobs get the common overrides but `train.*` (iLoRA's: a SASRec stage would
  # train with them too), and the data.* and sasrec.* overrides of the variants whose SASRec
  # is their own.
  sasrec_common = [o for o in common if not override_key(o).startswith("train.")]
  own_overrides = {name: [o for o in extra
                          if override_key(o).startswith(("data.", "sasrec."))]
                   for name, extra in parse_variants(grid.variants)}  # fmt: skip
  fixed = grid.get("sasrec", "")
  runs = []
  for seed in seeds:
    seed_args = [f"--config.train.seed={seed}", *[f"--config.{o}" for o in common]]
    sasrec_dirs = {}
    for name, _ in variants:
      owner = sasrec_of[name]
      if owner in sasrec_dirs:
        continue
      sasrec_dirs[owner] = os.path.join(workdir, "sasrec", owner, f"seed{seed}")
      if fixed or not grid.share_sasrec:
        continue
      runs.append(
        Run(
          os.path.join("sasrec", owner, f"seed{seed}"),
          "sasrec",
          seed,
          sasrec_dirs[owner],
          [
            f"--config={config_path}",
            f"--workdir={sasrec_dirs[owner]}",
            "--config.stage=sasrec",
            f"--config.train.seed={seed}",
            *[f"--config.{o}" for o in [*sasrec_common, *own_overrides.get(owner, [])]],
          ],
        )
      )
    for name, extra in variants:
      run_dir = os.path.join(workdir, "runs", name, f"seed{seed}")
      # One given SASRec (.pt of the original or a finished workdir) for every run.
      sasrec_dir = fixed or sasrec_dirs[sasrec_of[name]]
      stage = ["--config.stage=ilora", f"--config.sasrec.init_from={sasrec_dir}"]
      if not (fixed or grid.share_sasrec):
        stage = ["--config.stage=pipeline"]
      runs.append(
        Run(
          f"{name}/seed{seed}",
          name,
          seed,
          run_dir,
          [
            f"--config={config_path}",
            f"--workdir={run_dir}",
            *stage,
            *seed_args,
            *[f"--config.{o}" for o in extra],
          ],
        )
      )
  return runs, resolved


def _seeds_found(workdir: str, variants: list[str]) -> list[int]:
  """The seeds of the folders `W/runs/<variant>/seed<k>` of `variants`."""
  found = []
  for name in variants:
    folder = os.path.join(workdir, "runs", name)
    entries = os.listdir(folder) if os.path.isdir(folder) else []
    found += [int(e[4:]) for e in entries if e.startswith("seed") and e[4:].isdigit()]
  return found


def tabulated(grid: ConfigDict, grid_path: str, workdir: str, runs: list[Run]) -> list[Run]:
  """The runs the results show: `runs` (this command's) and every other run of the grid whose
  folder exists (made by an earlier command with other grid.only or grid.seeds)."""
  planned = {run.name for run in runs}
  every, _ = plan(grid, grid_path, workdir, every=True)
  return [r for r in every if r.name in planned or os.path.isdir(r.workdir)]


def _sasrec_key(config: ConfigDict) -> str:
  """What a run config's frozen SASRec is trained with, as text: its data settings and its
  `sasrec.*` ones. Variants whose text differs (other data, other candidates, another SASRec
  shape) get a SASRec of their own."""
  form = configuration.json_form(config)
  return json.dumps({"data": form["data"], "sasrec": form["sasrec"]}, sort_keys=True)


def check_sasrec(grid: ConfigDict, runs: list[Run]) -> None:
  """`grid.sasrec`, when given, names an existing SASRec: a readable file (an original `.pt`
  checkpoint) or a workdir where the sasrec stage finished (its final records written). Then
  each unfinished run of `runs` loads it as its ilora stage will (`train_ilora.load_sasrec`,
  on the run's data, without the LLM), so that a SASRec the runs would refuse (an unreadable
  `.pt`, one of another item count or shape, a workdir's trained on other data) is refused
  with the run's own message. Checked before any run (each run would otherwise find out only
  after loading the LLM, the first one after the grid's earlier jobs)."""
  path = grid.get("sasrec", "")
  if not path:
    return
  if os.path.isdir(path):
    folder = checkpoint_folder(path, "sasrec")
    steps = os.listdir(folder) if os.path.isdir(folder) else []
    if not any(name.isdigit() for name in steps):
      raise UserError(
        f"grid.sasrec={path} is a folder without a SASRec checkpoint (no {folder}/<step>): "
        "give a workdir where --config.stage=sasrec has run, or an original .pt file"
      )
    if not _stage_finished(path, "sasrec"):
      raise UserError(
        f"grid.sasrec={path}: its SASRec stage has not finished (no final records in its "
        "metrics.jsonl): finish it with --config.stage=sasrec there first"
      )
  else:
    require_file(path, "grid.sasrec")
  checked: set[str] = set()
  datasets: dict = {}
  for run in runs:
    if run.variant == "sasrec" or finished(run):
      continue
    try:
      config = configuration.load(run.config_path, run.overrides)
      # Runs not started load it alike for alike data and SASRec settings: one of them checks.
      if not os.path.isdir(run.workdir):
        key = _sasrec_key(config)
        if key in checked:
          continue
        checked.add(key)
      _load_sasrec(config, run.workdir, datasets)
    except UserError as exc:
      raise UserError(f"run {run.name}: {exc}") from None


def _load_sasrec(config: ConfigDict, workdir: str, datasets: dict) -> None:
  """The frozen SASRec of a run's config loaded as its ilora stage loads it (a UserError where
  the run would refuse it), its progress lines dropped; `datasets` caches the data sets."""
  import io

  import jax

  from ilora_jax import data, sharding, torch_checkpoint, train_ilora

  folder = "" if config.data.name == "synthetic" else data.data_dir(config, workdir)
  train_file = os.path.join(folder, config.data.train_file)
  if folder and config.data.build and not os.path.exists(train_file):
    # The run builds its data set first (its item count unknown until then; a check writes
    # nothing): the checkpoint is only read.
    if not os.path.isdir(config.sasrec.init_from):
      torch_checkpoint.load_module(config.sasrec.init_from)
    return
  key = json.dumps([folder, configuration.json_form(config)["data"]], sort_keys=True)
  if key not in datasets:
    datasets[key] = data.load_from_config(config, workdir)
  # One device holds the small SASRec whatever mesh the run's config asks for.
  one = ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  mesh = sharding.make_mesh(one, jax.devices()[:1])
  with contextlib.redirect_stderr(io.StringIO()):  # "iLoRA: SASRec from ...": the run's line.
    train_ilora.load_sasrec(config, workdir, datasets[key], mesh)


# Metrics the final records of an ilora run hold (the scoring ones for its frozen SASRec too,
# as `sasrec/<name>`, shown in the tables' SASRec row): what grid.metrics may name.
RECORDED_METRICS = (*configuration.SCORING_METRICS, *configuration.GENERATION_METRICS, "loss")


def parse_metrics(grid: ConfigDict, resolved: dict) -> list[str]:
  """`grid.metrics` as a list: at least one, each once, each recorded by some variant's runs
  (a generation metric needs ilora.eval_generate, a scoring one ilora.eval_score)."""
  text = grid.get("metrics", "")
  metrics = [m.strip() for m in str(text).split(",") if m.strip()]
  choices = ", ".join(RECORDED_METRICS)
  if not metrics:
    raise UserError(f"grid.metrics={text!r} names no metric: give some of {choices}")
  unknown = [m for m in metrics if m not in RECORDED_METRICS]
  if unknown:
    raise UserError(
      f"grid.metrics names {', '.join(unknown)}, which the runs do not record: give some of "
      f"{choices}"
    )
  if len(set(metrics)) != len(metrics):
    raise UserError(f"grid.metrics={text!r} names a metric twice")
  for metric in metrics:
    for kind, names, switch in (
      ("generation", configuration.GENERATION_METRICS, "eval_generate"),
      ("scoring", configuration.SCORING_METRICS, "eval_score"),
    ):
      if metric in names and resolved and not any(c.ilora[switch] for c in resolved.values()):
        raise UserError(
          f"grid.metrics names {metric}, a {kind} metric, but no variant sets "
          f"ilora.{switch}=True, so no run records it: leave it out of grid.metrics"
        )
  return metrics


def _json_form(config: ConfigDict) -> dict:
  """The config as `configuration.save` writes it to config.json, flattened."""
  return configuration.flat(configuration.json_form(config))


def _made_in(run: Run) -> str:
  """The workdir the run's last attempt was given (`runner.json`), else its planned one: a
  grid's workdir may have been moved or copied since."""
  try:
    argv = shlex.split(_runner_record(run)["command"])
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
  except (ValueError, KeyError, TypeError, StopIteration, AttributeError):
    return run.workdir


def _same_sasrec(saved: str, planned: str, saved_in: str, planned_in: str) -> bool:
  """The same SASRec: the same file or folder, or the same place relative to the run's
  workdir (a grid's own `W/sasrec/seed<k>` after W moved)."""
  if saved == planned:
    return True
  if not saved or not planned:
    return False
  if os.path.realpath(saved) == os.path.realpath(planned):
    return True
  return os.path.relpath(saved, saved_in) == os.path.relpath(planned, planned_in)


def config_diffs(run: Run, saved: dict, planned: dict, default: dict) -> list[str]:
  """'key saved vs planned' for each setting the run's saved config.json (`saved`, flattened)
  and the config its planned command gives (`planned`) hold differently. A key the saved
  config lacks (written before the setting existed) counts as the config file's `default`."""
  diffs = []
  # A config.json of code before the per-stage log_every_steps (e1a04a8), when synthetic
  # data ignored data.min_len: its runs kept every row whatever that value was.
  older = "ilora.train.log_every_steps" not in saved
  for key, value in planned.items():
    if configuration.volatile(key):
      continue
    old = saved.get(key, default.get(key, value))
    if key == "data.min_len" and older and planned.get("data.name") == "synthetic":
      old = 1  # What those runs did, whatever their config said.
    if key == "sasrec.init_from" and isinstance(old, str) and isinstance(value, str):
      if _same_sasrec(old, value, _made_in(run), run.workdir):
        continue
    if old != value:
      diffs.append(f"{key} {json.dumps(old)} (saved) vs {json.dumps(value)} (planned)")
  return diffs


def check_data(config: ConfigDict, workdir: str) -> None:
  """The files of a run's data set exist (a look, not a load): a run without them would fail
  only once it starts. Synthetic data, and data a run builds, have none to look for."""
  from ilora_jax import data

  if config.data.name == "synthetic":
    return
  folder = data.data_dir(config, workdir)  # Refuses an empty data.dir.
  if config.data.build:
    return
  if not os.path.isdir(folder):
    raise UserError(f"data folder not found: {folder} (set data.dir, e.g. with --grid.extra)")
  for path in (config.data.train_file, config.data.val_file):
    require_file(os.path.join(folder, path), "data file")
  require_file(data.titles_file(config.data, folder), "titles file")


def check_runs(runs: list[Run]) -> None:
  """Loads each run's config exactly as its command will (so what a run would refuse, every
  mode refuses before any job starts), and refuses a run whose workdir holds a config.json
  of other settings (made by another command: its results would be reported under this
  one, or it would resume with other settings)."""
  defaults: dict = {}
  found = []
  for run in runs:
    try:
      config = configuration.load(run.config_path, run.overrides)
      check_data(config, run.workdir)
    except UserError as exc:
      raise UserError(f"run {run.name}: {exc}") from None
    planned = _json_form(config)
    path = os.path.join(run.workdir, "config.json")
    if not os.path.isfile(path):
      continue
    try:
      with open(path) as f:
        saved = json.load(f)
      if not isinstance(saved, dict):
        raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
      raise UserError(
        f"cannot read {path} (run {run.name}'s settings) to check it against the planned "
        f"command: {exc}; give another --workdir"
      ) from None
    if run.config_path not in defaults:
      try:
        defaults[run.config_path] = _json_form(configuration.load(run.config_path))
      except UserError:
        defaults[run.config_path] = {}
    diffs = config_diffs(run, configuration.flat(saved), planned, defaults[run.config_path])
    if diffs:
      found.append((run, diffs))
  if not found:
    return
  # A variant's run first: a SASRec job's config differs too where only iLoRA settings did.
  found.sort(key=lambda item: item[0].variant == "sasrec")
  run, diffs = found[0]
  shown = "; ".join(diffs[:3]) + (f"; {len(diffs) - 3} more" if len(diffs) > 3 else "")
  names = [other.name for other, _ in found[1:]]  # Named: a count left them to be found.
  more = f" and {len(names) - 3} more" if len(names) > 3 else ""
  others = f" (so were {', '.join(names[:3])}{more})" if names else ""
  raise UserError(
    f"run {run.name} in {run.workdir} was made with other settings than this command gives "
    f"it: {shown}{others}; its results would be reported under this command: give another "
    "--workdir for these settings, or the overrides the runs were made with"
  )


# ----------------------------------------------------------------------------- running


def finished(run: Run) -> bool:
  """True when the run's stage wrote its final test record (or recorded test as skipped)."""
  return _stage_finished(run.workdir, "sasrec" if run.variant == "sasrec" else "ilora")


def _stage_finished(workdir: str, stage: str) -> bool:
  return any(
    r.get("stage") == stage
    and r.get("run") == stage
    and r.get("split") == "test"
    and (r.get("final") or "skipped" in r)
    for r in report.read_records(workdir)
  )


def _last_error(log_path: str) -> str:
  try:
    with open(log_path, errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return ""
  errors = [line for line in lines if line.startswith("error:")]
  return errors[-1] if errors else (lines[-1] if lines else "")


def _runner_record(run: Run) -> dict:
  """The run's runner.json (seconds, command and code of its attempts so far), {} where none
  or unreadable."""
  try:
    with open(os.path.join(run.workdir, "runner.json")) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def _seconds(record: dict) -> float:
  """The seconds of a run's attempts so far, from its `_runner_record`."""
  try:
    return float(record.get("seconds", 0.0))
  except (TypeError, ValueError):
    return 0.0


def _codes(record: dict) -> list[str]:
  """The code versions (`code_version`) of a run's attempts, in order, each once, from its
  `_runner_record`."""
  codes = record.get("code", [])
  return [str(c) for c in codes] if isinstance(codes, list) else []


def code_version() -> str:
  """This package's git commit (12 digits; "+changes" where tracked files differ from it),
  or "unknown" outside a git checkout: results.md names the code each run was made with."""
  folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()  # fmt: skip

  try:
    # An installed copy (site-packages) may sit inside another checkout (a .venv in one).
    if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(folder):
      return "unknown"
    commit = git("rev-parse", "--short=12", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return commit + ("+changes" if changed else "")


def execute(run: Run, python: str) -> None:
  """Runs one job to completion (its output appended to W/.../log.txt)."""
  log_path = os.path.join(run.workdir, "log.txt")
  try:  # A read-only workdir, say: one line, as for the grid's own workdir.
    os.makedirs(run.workdir, exist_ok=True)
    open(log_path, "a").close()
  except OSError as exc:
    raise UserError(f"cannot write {log_path} of run {run.name}: {exc.strerror or exc}") from None
  with workdir_lock(run.workdir):  # In use (another runner's job): refused, its log untouched.
    pass
  got: list[int] = []

  def forward(signum, frame):  # The job saves a checkpoint and exits; we follow it.
    got.append(signum)
    if child.poll() is None:
      child.send_signal(signum)

  start = time.time()
  with open(log_path, "a") as log:
    log.write(f"$ {run.command}\n")
    log.flush()
    child = subprocess.Popen(
      [python, "-m", "ilora_jax.main", *run.argv], stdout=log, stderr=subprocess.STDOUT
    )
    stops = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if not ignored(s)]
    previous = {s: signal.signal(s, forward) for s in stops}
    try:
      rc = child.wait()
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
  before = _runner_record(run)
  seconds = _seconds(before) + time.time() - start
  codes = _codes(before)
  codes += [code] if (code := code_version()) not in codes else []
  with atomic_write(os.path.join(run.workdir, "runner.json")) as f:
    json.dump({"seconds": seconds, "command": run.command, "code": codes}, f)
  if got or rc in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP):
    from tqdm import tqdm

    signum = got[0] if got else rc - 128
    tqdm.write(  # Above the progress bar of `main`, if one is drawn.
      f"{run.name} stopped by {signal.Signals(signum).name}; re-run the same command to resume",
      file=sys.stderr,
    )
    sys.exit(128 + signum)
  if rc < 0:  # Killed by a signal (SIGKILL, the kernel out of memory, say): no line of its own.
    try:
      name = signal.Signals(-rc).name
    except ValueError:
      name = f"signal {-rc}"
    raise UserError(
      f"run {run.name} was killed by {name} (the system out of memory, or someone's kill?) "
      f"[log: {log_path}; re-run the same command to resume]"
    )
  if rc != 0:
    raise UserError(
      f"run {run.name} failed (exit {rc}): {_last_error(log_path)} [log: {log_path}; "
      "re-run the same command to resume after fixing it]"
    )
  if not finished(run):
    raise UserError(
      f"run {run.name} ended without its final evaluation (train.stop_after_steps in the "
      f"overrides?); log: {log_path}"
    )


# ----------------------------------------------------------------------------- results


def collect(runs: list[Run], resolved: dict) -> dict:
  """{variant: {seed: {split: record}}} of finished runs, plus their seconds and configs, and
  the splits they recorded as skipped ({split: {run: why}}, "skipped")."""
  results: dict = {"runs": {}, "seconds": {}, "commands": {}, "code": {}, "experts": {},
                   "gate_test": {}, "skipped": {}, "cwd": os.getcwd()}  # fmt: skip
  for run in runs:
    results["commands"][run.name] = run.command
    if not finished(run):
      continue
    record = _runner_record(run)
    results["seconds"][run.name] = round(_seconds(record), 1)
    results["code"][run.name] = _codes(record)
    if run.variant == "sasrec":
      continue
    records = report.read_records(run.workdir)
    for r in records:  # A split the run could not evaluate (no test file): {split: {run: why}}.
      if r.get("run") == r.get("stage") == "ilora" and "skipped" in r:
        results["skipped"].setdefault(str(r.get("split")), {})[run.name] = str(r["skipped"])
    finals = report.finals_by_split(records, run="ilora")
    if finals:
      results["runs"].setdefault(run.variant, {})[str(run.seed)] = finals
      test = gate_test(run, int(resolved[run.variant].ilora.eval_rows))
      if test is not None:
        results["gate_test"].setdefault(run.variant, {})[str(run.seed)] = test
  for name, config in resolved.items():
    results["experts"][name] = int(config.lora.num_experts)
  return results


def _other_runs(workdir: str, resolved: dict) -> list[str]:
  """The folders `W/runs/<name>` of variants the grid does not have (another grid's)."""
  folder = os.path.join(workdir, "runs")
  names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  return [os.path.join(folder, n) for n in names if n not in resolved]


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(values) -> str:
  if not len(values):
    return "-"
  m, s = mean_std(values)
  return f"{m:.4f} ± {s:.4f}" if len(values) > 1 else f"{m:.4f}"


def _cell(values, n: int) -> str:
  """`_fmt`, saying how many of the row's `n` seeds it covers where that is fewer."""
  text = _fmt(values)
  return text if not values or len(values) == n else f"{text} ({len(values)} of {n} seeds)"


def _value(record: dict, key: str) -> float | None:
  """A record's metric as a float (NaN for the text "nan" a diverged run's log holds), None
  where the record lacks it (`report.number`)."""
  return report.number(record.get(key))


def _values(results: dict, variant: str, split: str, key: str) -> list[float]:
  seeds = results["runs"].get(variant, {})
  return _alike_values({s: finals.get(split, {}) for s, finals in seeds.items()}, key)


def _by_candidates(results: dict, split: str, metrics: list[str]) -> list[tuple[str, dict]]:
  """The runs with some of `metrics` on `split` by the candidate sets they were evaluated on
  (the final record's `candidates` fingerprint): [(fingerprint, {variant: {seed: finals}})],
  in the variants' order. Only the runs of one set are compared."""
  sets: dict = {}
  for v, seeds in results["runs"].items():
    for s, finals in seeds.items():
      record = finals.get(split, {})
      if any(_value(record, m) is not None for m in metrics):
        sets.setdefault(str(record.get("candidates")), {}).setdefault(v, {})[s] = finals
  return list(sets.items())


def _alike(results: dict, split: str, keys: list[str]) -> list[tuple[dict, list[str]]]:
  """The variants whose runs record some of `keys` (the metrics of their frozen SASRec or of
  the base LLM), grouped where those agree on every seed both finished (the same model):
  [({seed: {key: value}}, [variant, ...])]."""
  found: list[tuple[dict, list[str]]] = []
  for v, seeds in results["runs"].items():
    mine = {s: {k: f[split].get(k) for k in keys} for s, f in seeds.items() if split in f}
    mine = {s: rec for s, rec in mine.items() if any(x is not None for x in rec.values())}
    if not mine:
      continue
    for theirs, names in found:
      if all(theirs[s] == rec for s, rec in mine.items() if s in theirs):
        theirs.update(mine)
        names.append(v)
        break
    else:
      found.append((mine, [v]))
  return found


def _alike_values(records: dict, key: str) -> list[float]:
  """`key` of each seed's record ({seed: record}) in seed order, where it holds a number."""
  found = (_value(records[s], key) for s in sorted(records, key=int))
  return [v for v in found if v is not None]


def _nonfinite(results: dict, split: str) -> list[tuple[str, str, str]]:
  """(variant, seed, "N of M rows") of the runs whose final `split` record counts rows their
  model scored NaN or infinite (`metrics.warn_nonfinite`), in the variants' and seeds' order."""
  found = []
  for v, seeds in results["runs"].items():
    for s in sorted(seeds, key=int):
      record = seeds[s].get(split, {})
      bad = _value(record, "nonfinite_rows")
      if bad:
        rows = _value(record, "rows")
        found.append((v, s, f"{bad:.0f} of {rows:.0f} rows" if rows else f"{bad:.0f} rows"))
  return found


def _groups(results: dict, split: str) -> list[int]:
  keys = set()
  for seeds in results["runs"].values():
    for finals in seeds.values():
      keys |= {m[1] for k in finals.get(split, {}) if (m := report.GROUP_KEY.fullmatch(k))}
  return sorted({int(g) for g in keys})


def gate_specialisation(record: dict, groups: list[int], experts: int) -> float | None:
  """Mean total-variation distance between the groups' mean gate weights (0: every group
  mixes the experts alike; 1: the groups use disjoint experts). Invariant to expert order."""
  means = []
  for g in groups:
    row = [record.get(f"group/{g}/gate/{e}") for e in range(experts)]
    if any(v is None for v in row):
      return None
    means.append(np.asarray(row, np.float64))
  if len(means) < 2 or experts < 2:
    return None
  return _distance(np.asarray(means))


def _distance(means: np.ndarray) -> float:
  """Mean pairwise total-variation distance between the rows of `means` [groups, E]."""
  pairs = [
    0.5 * np.abs(means[i] - means[j]).sum()
    for i in range(len(means))
    for j in range(i + 1, len(means))
  ]
  return float(np.mean(pairs))


def gate_permutation_test(
  gates: np.ndarray, groups: np.ndarray, rounds: int = 1000, seed: int = 0
) -> dict[str, float]:
  """Is the gate specialisation more than chance? The distance between the groups' mean gates
  [rows, E] is compared with the same statistic under shuffled group labels (finite groups
  differ by sampling noise alone). Returns the observed distance, the shuffled-label mean
  and the one-sided p-value (share of shuffles at least as large, with the +1 correction).
  Gates holding NaN or an infinity (a diverged run) give NaN for all three, as the
  specialisation table's distance is then NaN: no shuffle compares with it."""
  labels = np.unique(groups)
  if not np.isfinite(gates).all():
    return {"distance": math.nan, "chance": math.nan, "p": math.nan}

  def stat(g):
    return _distance(np.stack([gates[g == k].mean(0) for k in labels]))

  observed = stat(groups)
  rng = np.random.default_rng(seed)
  null = np.array([stat(rng.permutation(groups)) for _ in range(rounds)])
  p = (1 + np.sum(null >= observed)) / (rounds + 1)
  return {"distance": observed, "chance": float(null.mean()), "p": float(p)}


def gate_test(run: Run, rows: int = 0) -> dict[str, float] | None:
  """`gate_permutation_test` on a finished run's val gates (`W/report/gates.npz`, every val
  row in order) of the first `rows` rows (`ilora.eval_rows`, 0 = all): the rows its final val
  record's per-group gate means, and so the specialisation table, are computed on."""
  try:
    with np.load(os.path.join(run.workdir, "report", "gates.npz")) as saved:
      if "groups" not in saved:  # Data without user groups.
        return None
      gates, groups = np.asarray(saved["gates"], np.float64), np.asarray(saved["groups"])
  except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile):
    return None  # No (readable) gate table: the run's own report says why.
  if gates.ndim != 2 or groups.shape != gates.shape[:1]:
    return None
  if rows > 0:
    gates, groups = gates[:rows], groups[:rows]
  if gates.shape[1] < 2 or len(np.unique(groups)) < 2:
    return None
  return gate_permutation_test(gates, groups)


def paired(results: dict, variant: str, reference: str, split: str, key: str):
  """(differences variant - reference, reference values) of `key` on the seeds both
  finished, in seed order."""
  runs, ref = results["runs"].get(variant, {}), results["runs"].get(reference, {})
  diffs, bases = [], []
  for s in sorted(set(runs) & set(ref), key=int):
    mine = _value(runs[s].get(split, {}), key)
    theirs = _value(ref[s].get(split, {}), key)
    if mine is not None and theirs is not None:
      diffs.append(mine - theirs)
      bases.append(theirs)
  return diffs, bases


def markdown(grid: ConfigDict, results: dict, metrics: list[str], reference: str) -> str:
  lines = [f"# {grid.get('title') or 'Experiment grid'}", ""]
  if grid.get("description"):
    lines += [grid.description.strip(), ""]
  lines += [
    "Mean ± sample standard deviation over seeds (n = seeds finished; a cell that covers "
    "fewer, where runs lack that metric, says so). Runs are compared only with runs evaluated "
    "on the same candidate sets (the `candidates` fingerprint of their final records): where "
    "a split's runs used several, each set has its own tables and SASRec row.",
    "",
  ]
  declared = parse_variants(grid.variants) if grid.get("variants") else []
  absent = [name for name, _ in declared if name not in results["runs"]]
  if absent:  # `--grid.only` left them out, or their runs have not finished.
    lines += [f"Variants of the grid without a finished run here: {', '.join(absent)}.", ""]
  for split in SPLITS:
    sets = _by_candidates(results, split, metrics)
    for i, (fingerprint, runs) in enumerate(sets):
      lines += [f"## {split}" + (f", candidates {fingerprint}" if len(sets) > 1 else ""), ""]
      if i:
        lines += [
          f"Evaluated on other candidates than the {split} tables above: not comparable with them.",
          "",
        ]
      elsewhere = reference in results["runs"] and reference not in runs
      lines += _tables(dict(results, runs=runs), split, metrics, reference, elsewhere)
    skipped = results.get("skipped", {}).get(split, {})
    if skipped:  # Said, where a reader looks for the split (no test file, say).
      lines += [f"## {split}", ""] if not sets else []
      lines += [f"Not evaluated on {split} by {errors.counted(len(skipped), 'run')}: "
                + "; ".join(sorted(set(skipped.values()))), ""]  # fmt: skip
  lines += ["## Runs", ""]
  if "cwd" in results:  # The commands' relative paths are the runner's, from its folder.
    lines += [f"Each command as the runner starts it, in `{results['cwd']}`:", ""]
  lines.append("| run | seconds | code | command |")
  lines.append("|---|---|---|---|")
  for name, command in results["commands"].items():
    seconds = results["seconds"].get(name)
    shown = f"{seconds:.0f}" if seconds is not None else "not finished"
    # The git commit of each attempt (several: resumed with other code); "-": not recorded.
    code = ", ".join(results.get("code", {}).get(name) or ["-"])
    lines.append(f"| {name} | {shown} | {code} | `{command}` |")
  if results.get("not_tabulated"):
    lines += ["", "Not tabulated (variants this grid does not have): "
              + ", ".join(results["not_tabulated"])]  # fmt: skip
  lines += ["", f"Machine: {results['machine']}", ""]
  return "\n".join(lines)


def _tables(
  results: dict, split: str, metrics: list[str], reference: str, elsewhere: bool
) -> list[str]:
  """The tables of `split` for runs evaluated on one candidate set (`results["runs"]`);
  `elsewhere`: the reference variant has runs on other candidates."""
  variants = list(results["runs"])
  broken = _nonfinite(results, split)
  lines = ["| variant | n | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
  for v in variants:
    n = len(results["runs"][v])
    row = [_cell(_values(results, v, split, m), n) for m in metrics]
    seeds = [s for w, s, _ in broken if w == v]
    shown = f"{v} (NaN scores: seed {', '.join(seeds)})" if seeds else v
    lines.append(f"| {shown} | {n} | " + " | ".join(row) + " |")
  for prefix, label in (("sasrec/", "SASRec"), ("base/", "base LLM, no adapters")):
    alike = _alike(results, split, [prefix + m for m in metrics])
    for records, names in alike:
      if len(alike) == 1:
        shown = "SASRec (frozen, same candidates)" if prefix == "sasrec/" else label
      else:
        shown = f"{label} of {', '.join(names)}"
      row = [_cell(_alike_values(records, prefix + m), len(records)) for m in metrics]
      lines.append(f"| {shown} | {len(records)} | " + " | ".join(row) + " |")
  lines.append("")
  if broken:  # Their ranking metrics look like a poor model's: said, not left to be read so.
    lines += [
      "NaN scores: the weights of these runs diverged and scored rows NaN or infinite; such a "
      "row ranks its target last, so their ranking metrics count it as a miss: "
      + "; ".join(f"{v} seed {s}, {text}" for v, s, text in broken)
      + ".",
      "",
    ]
  head = metrics[0]
  lines += [f"Per seed ({head}):", ""]
  seeds = sorted({s for v in variants for s in results["runs"][v]}, key=int)
  lines.append("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |")
  lines.append("|---" * (len(seeds) + 1) + "|")
  for v in variants:
    cells = []
    for s in seeds:
      rec = results["runs"][v].get(s, {}).get(split, {})
      cells.append(report.cell(rec[head]) if head in rec else "-")
    lines.append(f"| {v} | " + " | ".join(cells) + " |")
  lines.append("")
  if reference in results["runs"] and len(variants) > 1:
    lines += [
      f"Paired difference to `{reference}` (same seed, same SASRec), {head}: n = seeds both "
      f"finished; relative = the mean difference over `{reference}`'s mean on the same "
      "seeds (- where that mean is 0):",
      "",
    ]
    lines.append("| variant | n | mean ± std | relative |")
    lines.append("|---|---|---|---|")
    for v in variants:
      if v == reference:
        continue
      diffs, bases = paired(results, v, reference, split, head)
      rel = f"{100 * np.mean(diffs) / np.mean(bases):+.1f}%" if bases and np.mean(bases) else "-"
      lines.append(f"| {v} | {len(diffs)} | {_fmt(diffs)} | {rel} |")
    lines.append("")
  elif elsewhere:
    lines += [f"No paired differences: `{reference}` was evaluated on other candidates.", ""]
  groups = _groups(results, split)
  if groups:
    keys = [f"group/{g}/sasrec/{head}" for g in groups]
    alike = _alike(results, split, keys)
    lines += [f"Per user group ({head}{'; SASRec alongside' if alike else ''}):", ""]
    lines.append("| variant | " + " | ".join(f"group {g}" for g in groups) + " |")
    lines.append("|---" * (len(groups) + 1) + "|")
    for v in variants:
      cells = [_fmt(_values(results, v, split, f"group/{g}/{head}")) for g in groups]
      lines.append(f"| {v} | " + " | ".join(cells) + " |")
    for records, names in alike:
      shown = "SASRec" if len(alike) == 1 else f"SASRec of {', '.join(names)}"
      cells = [_fmt(_alike_values(records, k)) for k in keys]
      lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    lines.append("")
    spec_rows = []
    for v in variants:
      experts = results["experts"].get(v, 1)
      specs = [
        gate_specialisation(finals[split], groups, experts)
        for finals in results["runs"][v].values()
        if split in finals
      ]
      specs = [s for s in specs if s is not None]
      if specs:
        spec_rows.append(f"| {v} | {experts} | {_fmt(specs)} |")
    if spec_rows:
      lines += [
        "Gate specialisation: mean total-variation distance between the groups' mean gate "
        "weights (0 = all groups mix the experts alike, 1 = disjoint experts):",
        "",
        "| variant | experts | distance |",
        "|---|---|---|",
        *spec_rows,
        "",
      ]
    tests = [(v, s, results["gate_test"][v][s]) for v in variants
             for s in sorted(results["runs"][v], key=int)
             if s in results["gate_test"].get(v, {})]  # fmt: skip
    if split == "val" and tests:
      lines += [
        "Is that more than chance? The same distance, on the same val rows (ilora.eval_rows), "
        "per seed, with their group labels shuffled 1,000 times (finite groups differ by "
        "sampling noise alone); p = share of shuffles at least as large:",
        "",
        "| variant | seed | distance | shuffled labels (mean) | p |",
        "|---|---|---|---|---|",
      ]
      for v, s, t in tests:
        lines.append(f"| {v} | {s} | {t['distance']:.4f} | {t['chance']:.4f} | {t['p']:.3f} |")
      lines.append("")
  return lines


def _from_zero(ax, values: list[float]) -> None:
  """A panel of values none of which is negative (rates, a loss) starts at 0: an all-zero
  panel's axis went down to -0.04, and error bars (a standard deviation over seeds) below 0,
  as if the metric could be negative."""
  finite = [v for v in values if np.isfinite(v)]
  if finite and min(finite) >= 0:
    ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1e-3))


def plots(results: dict, metrics: list[str], runs: list[Run], out_dir: str) -> list[str]:
  """PNG figures: metrics per variant (bars: mean, points: seeds), per-group metric, gate
  weights per group (first seed) and training loss per variant. Returns the paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  written = []

  def save(fig, name: str, tight: bool = True) -> None:
    if tight:
      fig.tight_layout()
    path = os.path.join(out_dir, name)
    try:
      with atomic_path(path) as tmp:  # A stop midway left a plot of 0 bytes.
        fig.savefig(tmp, dpi=110, format="png")
    finally:
      plt.close(fig)
    written.append(path)

  variants = list(results["runs"])
  # One row of panels per split and candidate set: runs of other candidates share no panel.
  panels = [(split, fingerprint, dict(results, runs=runs), len(sets) > 1)
            for split in SPLITS
            for sets in [_by_candidates(results, split, metrics)]
            for fingerprint, runs in sets]  # fmt: skip
  if not panels:
    return written
  fig, axes = plt.subplots(
    len(panels), len(metrics), figsize=(3.2 * len(metrics), 3.0 * len(panels)), squeeze=False
  )
  x = np.arange(len(variants))
  for i, (split, fingerprint, sub, several) in enumerate(panels):
    for j, metric in enumerate(metrics):
      ax = axes[i][j]
      drawn = []
      for k, v in enumerate(variants):
        vals = _values(sub, v, split, metric)
        if vals:
          m, s = mean_std(vals)
          ax.bar(k, m, yerr=s, color=f"C{k}", alpha=0.7, capsize=3)
          ax.scatter(np.full(len(vals), k), vals, color="k", s=10, zorder=3)
          drawn += vals
      alike = _alike(sub, split, [f"sasrec/{metric}"])
      for style, (records, names) in zip(("--", ":", "-."), alike):
        label = "SASRec" if len(alike) == 1 else f"SASRec of {', '.join(names)}"
        sas = _alike_values(records, f"sasrec/{metric}")
        ax.axhline(np.mean(sas), color="gray", ls=style, lw=1, label=label)
      if alike:
        ax.legend(fontsize=7)
      _from_zero(ax, drawn)
      ax.set_xticks(x, variants, rotation=30, ha="right", fontsize=8)
      shown = f"\ncandidates {fingerprint}" if several else ""
      ax.set_title(f"{split} {metric}{shown}", fontsize=9)
  save(fig, "metrics.png")

  split = panels[0][0]
  sets = [(fingerprint, sub) for s, fingerprint, sub, _ in panels if s == split]
  groups = _groups(results, split)
  if groups:
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(
      1,
      len(sets),
      figsize=((1.2 + 1.1 * len(groups) * max(1, len(variants)) / 2) * len(sets), 3.2),
      squeeze=False,
    )
    for ax, (fingerprint, sub) in zip(axes[0], sets):
      drawn = []
      for k, v in enumerate(variants):
        if v not in sub["runs"]:
          continue
        stats = [  # A group the variant has no figure of: no bar (not a bar of 0).
          mean_std(vals)
          if (vals := _values(sub, v, split, f"group/{g}/{metrics[0]}"))
          else (np.nan, np.nan)
          for g in groups
        ]
        means, stds = zip(*stats)
        ax.bar(np.arange(len(groups)) + k * width, means, width, yerr=stds, label=v, capsize=2,
               color=f"C{k}")  # fmt: skip
        drawn += [m for m in means if not np.isnan(m)]
      _from_zero(ax, drawn)
      ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"group {g}" for g in groups])
      ax.set_ylabel(f"{split} {metrics[0]}")
      if len(sets) > 1:
        ax.set_title(f"candidates {fingerprint}", fontsize=9)
      ax.legend(fontsize=7)
    save(fig, "groups.png")
    gated = [v for v in variants if results["experts"].get(v, 1) > 1]
    if gated:
      fig, axes = plt.subplots(
        1, len(gated), figsize=(1.2 + 2.6 * len(gated), 2.8), squeeze=False, layout="constrained"
      )
      for i, (ax, v) in enumerate(zip(axes[0], gated)):
        seed = sorted(results["runs"][v], key=int)[0]
        rec = results["runs"][v][seed].get(split, {})
        experts = results["experts"][v]
        # A diverged run's log holds the text "nan" (`_value`: NaN), drawn as an empty cell.
        grid = np.array(
          [[_value(rec, f"group/{g}/gate/{e}") for e in range(experts)] for g in groups],
          np.float64,
        )
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(experts), [f"e{e}" for e in range(experts)])
        ax.set_yticks(range(len(groups)), [f"group {g}" for g in groups] if i == 0 else [])
        ax.set_title(f"{v} (seed {seed})", fontsize=9)
      fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="mean gate weight")
      save(fig, "gates.png", tight=False)  # constrained layout

  fig, ax = plt.subplots(figsize=(6, 3.5))
  drawn = False
  for k, v in enumerate(variants):
    for run in runs:
      if run.variant != v:
        continue
      pts = [
        (r["step"], r["loss"])
        for r in report.read_records(run.workdir)
        if r.get("stage") == "ilora"
        and r.get("split") == "train"
        and "step" in r
        # A diverged loss is logged as the text "nan": not drawn.
        and isinstance(r.get("loss"), int | float)
        and not isinstance(r["loss"], bool)
      ]
      if len(pts) > 1:
        steps, losses = map(np.asarray, zip(*pts))
        win = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(win) / win, mode="valid")
        label = v if run.seed == results_seed(results, v) else None
        style = ("-", "--", ":")[k % 3]
        ax.plot(steps[win - 1 :], smooth, color=f"C{k}", alpha=0.8, lw=1, ls=style, label=label)
        drawn = True
  if drawn:
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (smoothed)")
    ax.legend(fontsize=7)
    save(fig, "loss.png")
  else:
    plt.close(fig)
  return written


def results_seed(results: dict, variant: str) -> int | None:
  seeds = sorted(results["runs"].get(variant, {}), key=int)
  return int(seeds[0]) if seeds else None


def machine() -> str:
  cpus = os.cpu_count()
  try:
    import jax

    devices = jax.devices()
    kind = f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})"
  except Exception:  # noqa: BLE001 - description only.
    kind = "unknown devices"
  return f"{platform.machine()}, {cpus} CPU cores, {kind}, Python {platform.python_version()}"


# The figures `plots` may write: those it did not write this time are removed, so that the
# plots always show what results.md does.
PLOTS = ("metrics.png", "groups.png", "gates.png", "loss.png")


def write_results(grid: ConfigDict, runs: list[Run], resolved: dict, workdir: str) -> str:
  """Writes results.json, results.md and the plots; returns results.md's path. One that
  cannot be written (a folder in its place, a read-only workdir) is a UserError."""
  try:
    return _write_results(grid, runs, resolved, workdir)
  except OSError as exc:
    where = f" ({exc.filename})" if exc.filename else ""
    raise UserError(
      f"cannot write the results in {workdir}: {exc.strerror or exc}{where}"
    ) from None


def _write_results(grid: ConfigDict, runs: list[Run], resolved: dict, workdir: str) -> str:
  metrics = parse_metrics(grid, resolved)
  results = collect(runs, resolved)
  results["machine"] = machine()
  results["not_tabulated"] = _other_runs(workdir, resolved)
  with atomic_write(os.path.join(workdir, "results.json")) as f:
    json.dump(metrics_lib.plain_tree(results), f, indent=1, sort_keys=True, allow_nan=False)
  text = markdown(grid, results, metrics, grid.reference)
  path = os.path.join(workdir, "results.md")
  with atomic_write(path) as f:
    f.write(text)
  folder = os.path.join(workdir, "plots")
  written = {os.path.basename(p) for p in plots(results, metrics, runs, folder)}
  for name in PLOTS:
    if name not in written and os.path.exists(os.path.join(folder, name)):
      os.remove(os.path.join(folder, name))
  return path


# ----------------------------------------------------------------------------- CLI


# A grid's fields and the defaults of those a grid file may leave out (REQUIRED: it may not).
REQUIRED = object()
GRID_FIELDS = {
  "config": REQUIRED,
  "variants": REQUIRED,
  "seeds": REQUIRED,
  "overrides": (),
  "extra": "",
  "only": "",
  "title": "",
  "description": "",
  "share_sasrec": True,
  "sasrec": "",
  "metrics": "hr@1,mrr",
  "reference": "",  # The first variant.
}


def complete(grid: ConfigDict, path: str, flagged: Collection[str] = ()) -> ConfigDict:
  """`grid` with the defaults of the fields it leaves out; a missing required one (a run
  config given as the grid, say) is refused. `flagged`: the fields a `--grid.<field>` flag
  set, named as flags where refused."""
  missing = [k for k, v in GRID_FIELDS.items() if v is REQUIRED and k not in grid]
  if missing:
    raise UserError(
      f"{path} is no grid file: its get_config() lacks {', '.join(missing)} (a grid names a "
      "run config, its variants and seeds; see configs/experiments/*.py)"
    )
  unknown = [k for k in grid if k not in GRID_FIELDS]  # A misspelt field, ignored otherwise.
  if unknown:
    close = difflib.get_close_matches(unknown[0], list(GRID_FIELDS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    if unknown[0] in flagged:  # As an unknown override of a run's config is named.
      raise UserError(f"unknown grid key: {unknown[0]!r} (in --grid.{unknown[0]}){hint}")
    raise UserError(
      f"{path}: unknown grid field(s) {', '.join(unknown)}{hint}; a grid has "
      f"{', '.join(GRID_FIELDS)}"
    )
  for key, default in GRID_FIELDS.items():  # A tuple for a text field failed as AttributeError.
    if key == "config" or isinstance(default, str):
      kinds, words = str, "a string"
    elif isinstance(default, bool):
      kinds, words = bool, "True or False"
    elif isinstance(default, tuple):
      kinds, words = (str, list, tuple), "a string or a list of strings"
    else:
      continue  # variants and seeds: parse_variants and parse_seeds check them.
    value = grid.get(key, default)
    if not isinstance(value, kinds):
      where = f"--grid.{key}" if key in flagged else f"{path}: grid.{key}"
      raise UserError(f"{where} must be {words}, not {type(value).__name__} {value!r}")
  with grid.unlocked():
    for key, value in GRID_FIELDS.items():
      if key not in grid:
        grid[key] = value
    if not grid.reference:
      grid.reference = parse_variants(grid.variants)[0][0]
  return grid


def parse(argv: list[str]) -> tuple[ConfigDict, str, str]:
  try:
    parse_flags(flags.FLAGS, argv, "grid")
  except (SyntaxError, ValueError, TypeError, ImportError) as exc:  # Raised by the grid file.
    raise UserError(f"cannot load the grid file: {type(exc).__name__}: {exc}") from None
  grid_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--grid=")), None)
  if grid_arg is None:
    raise UserError("--grid is required, e.g. --grid=configs/experiments/negative_transfer.py")
  grid = _GRID.value
  if not isinstance(grid, ConfigDict):
    raise errors.unloadable("grid", grid_arg, grid)
  flagged = {a.split("=", 1)[0].split(".")[1] for a in argv if a.startswith("--grid.")}
  grid = complete(grid, grid_arg, flagged)
  if not _WORKDIR.value:
    raise UserError("--workdir is required")
  return grid, grid_arg.split(":", 1)[0], _WORKDIR.value


@cli_main
def main(argv: list[str] | None = None) -> None:
  grid, grid_path, workdir = parse(list(sys.argv if argv is None else argv))
  # SIGTERM between the jobs (planning, tables) ended the runner without a word.
  with errors.resumable_interrupts("re-run the same command to resume the grid"):
    _main(grid, grid_path, workdir)


def _main(grid: ConfigDict, grid_path: str, workdir: str) -> None:
  runs, resolved = plan(grid, grid_path, workdir)
  parse_metrics(grid, resolved)
  shown = tabulated(grid, grid_path, workdir, runs)  # This command's runs and earlier ones.
  check_runs(shown)  # Every mode: what a real run would refuse, and runs of other settings.
  if _DRY_RUN.value:
    check_workdir(workdir)  # What the real run would refuse, this refuses.
    if not all(finished(r) for r in runs):
      check_sasrec(grid, runs)
    for run in runs:
      print(run.command)
    return
  if _REPORT_ONLY.value and not os.path.isdir(workdir):
    raise UserError(f"--report_only: {workdir} is no grid's workdir (not a folder)")
  check_workdir(workdir)
  if not _REPORT_ONLY.value and not all(finished(r) for r in runs):
    check_sasrec(grid, runs)  # Only where runs are left to use it.
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as exc:
    raise UserError(f"cannot create workdir {workdir}: {exc}") from None
  if not _REPORT_ONLY.value:
    from tqdm import tqdm

    todo = [r for r in runs if not finished(r)]
    print(f"grid: {len(runs)} runs, {len(runs) - len(todo)} already finished", flush=True)
    # The bar only on a terminal: in a captured stderr its redrawn lines would be fragments
    # before the one `error:` line of a failed run (the lines on stdout say where it is).
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="grid", unit="run",
               disable=not sys.stderr.isatty())  # fmt: skip
    try:
      for run in todo:
        bar.set_postfix_str(run.name)
        tqdm.write(f"{run.name}: running, log {os.path.join(run.workdir, 'log.txt')}")
        start, before = time.time(), _seconds(_runner_record(run))
        execute(run, sys.executable)
        took = f"done in {time.time() - start:.0f} s"
        if before:  # Resumed: results.md's seconds are those of all its attempts.
          took += f", {_seconds(_runner_record(run)):.0f} s in all its attempts"
        tqdm.write(f"{run.name}: {took}")
        bar.update(1)
        try:  # Tables so far, after every run.
          write_results(grid, shown, resolved, workdir)
        except UserError:  # The grid goes on: the last write says why.
          pass
        except Exception as exc:  # noqa: BLE001 - a fault of the tables stops no training.
          tqdm.write(f"warning: the results after {run.name} were not written (unexpected "
                     f"{type(exc).__name__}: {exc}); the grid goes on")  # fmt: skip
    except UserError:  # A failed run: tables of the runs finished (now or before), then its line.
      bar.leave = False  # Cleared, so that the error line stands alone.
      if any(finished(r) for r in shown):
        try:
          write_results(grid, shown, resolved, workdir)
        except Exception:  # noqa: BLE001 - the failed run's error is the one line to show.
          pass
      raise
    except BaseException:
      bar.leave = False  # Cleared, so that the error line stands alone.
      raise
    finally:
      bar.close()
  print(f"results: {write_results(grid, shown, resolved, workdir)}", flush=True)


if __name__ == "__main__":
  main()
