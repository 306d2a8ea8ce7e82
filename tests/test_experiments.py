"""The experiment runner (`ilora_jax.experiments`), synthetic user groups and group metrics."""

import json
import os

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, metrics_records, run_cli

from ilora_jax import experiments, report, synthetic

GRID = "--grid=configs/experiments/negative_transfer.py"
# The smallest grid that still trains and evaluates every stage: seconds per run.
SMOKE = (
  "--grid.extra=data.synthetic.num_users=100 sasrec.train.epochs=1 ilora.train.steps=2 "
  "ilora.eval_rows=8 ilora.eval_batch_size=4 checkpoint.every_steps=1"
)


def _final(workdir, split):
  return [r for r in metrics_records(workdir) if r.get("final") and r["split"] == split][-1]


# ----------------------------------------------------------------------------- unit


def test_variants_and_seeds_parse_or_fail_clearly():
  assert experiments.parse_variants(["a: lora.rank=4 lora.gate=uniform", "b-2:"]) == [
    ("a", ["lora.rank=4", "lora.gate=uniform"]),
    ("b-2", []),
  ]
  for bad in (["no colon"], ["a: x=1", "a: y=2"], ["a: --config.x=1"], ["a b: x=1"], []):
    with pytest.raises(experiments.UserError):
      experiments.parse_variants(bad)
  assert experiments.parse_seeds("0, 1,2") == [0, 1, 2]
  for bad in ("", "1,1", "a"):
    with pytest.raises(experiments.UserError):
      experiments.parse_seeds(bad)


def test_mean_std_is_the_sample_standard_deviation():
  values = [0.1, 0.25, 0.4]
  mean, std = experiments.mean_std(values)
  assert mean == pytest.approx(0.25)
  assert std == pytest.approx(np.sqrt(((0.15**2) * 2) / 2))  # ddof = 1 by hand.
  assert experiments.mean_std([0.3]) == (0.3, 0.0)


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
  from ilora_jax import llm

  tokenizer = llm.load("tiny").tokenizer  # SmolLM2's tokenizer.
  titles = synthetic.titles(len(synthetic.WORD_TITLES), "words")
  assert len(set(titles.values())) == len(titles)
  for title in titles.values():
    assert len(tokenizer.encode(" " + title, add_special_tokens=False)) == 1, title
  with pytest.raises(synthetic.UserError, match="numbered"):
    synthetic.titles(len(synthetic.WORD_TITLES) + 1, "words")


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
  given = tmp_path / "m.pt"
  given.write_bytes(b"")  # The dry run only checks that it is a readable file.
  proc = run_cli(GRID, f"--workdir={w}", "--dry_run", f"--grid.sasrec={given}",
                 module="ilora_jax.experiments")  # fmt: skip
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 9 and all(f"--config.sasrec.init_from={given}" in x for x in lines)
  # A SASRec the real run would refuse is refused by the dry run too.
  proc = run_cli(GRID, f"--workdir={w}", "--dry_run", "--grid.sasrec=/x/m.pt",
                 module="ilora_jax.experiments")  # fmt: skip
  assert_one_line_error(proc, "grid.sasrec", "/x/m.pt")
  assert not proc.stdout


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
    (
      ("--grid.extra=train.seed=5",),
      ("grid.extra: 'train.seed=5' sets train.seed", "--grid.seeds"),
    ),
    (("--grid.extra=stage=sasrec",), ("grid.extra: 'stage=sasrec' sets stage, which the grid",)),
    (("--grid.seeds=1,x",), ("grid.seeds",)),
  ],
)
def test_bad_grids_fail_before_any_run(tmp_path, args, fragments):
  w = str(tmp_path / "grid")
  proc = run_cli(GRID, f"--workdir={w}", *args, module="ilora_jax.experiments")
  assert_one_line_error(proc, *fragments)
  assert not os.path.exists(w)


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
  test = results["gate_test"]["ilora"]["0"]
  assert 0 < test["p"] <= 1 and test["distance"] >= 0
  for name in ("metrics.png", "groups.png", "gates.png", "loss.png"):
    assert os.path.getsize(os.path.join(w, "plots", name)) > 1000


def test_a_dry_run_of_a_finished_grid_does_not_check_its_sasrec(smoke):
  """As the real run, which only checks --grid.sasrec where runs are left to use it: a
  finished grid's dry run lists its commands even when that SASRec has since moved."""
  w, _ = smoke
  proc = run_cli(GRID, f"--workdir={w}", "--dry_run", "--grid.seeds=0", "--grid.only=lora,ilora",
                 "--grid.sasrec=/moved/m.pt", SMOKE, module="ilora_jax.experiments")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert len(proc.stdout.strip().splitlines()) == 2


def test_grid_resumes_and_adds_seeds(smoke):
  w, _ = smoke
  before = open(os.path.join(w, "runs", "lora", "seed0", "metrics.jsonl")).read()
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


def test_sigterm_stops_the_grid_after_a_checkpoint_and_the_rerun_resumes(smoke, tmp_path):
  import signal
  import subprocess
  import sys
  import time

  from conftest import ROOT

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
  steps = [r["step"] for r in metrics_records(run_dir) if r["split"] == "train"]
  assert steps == list(range(1, 61))  # Resumed from the checkpoint: every step once.


@pytest.mark.parametrize(
  "args, fragments",
  [
    (("--grid.extra=train.steps='2",), ("grid.extra", "No closing quotation")),
    (("--grid.sasrec=/nonexistent/m.pt",), ("grid.sasrec not found", "/nonexistent/m.pt")),
    (("--grid.sasrec={tmp}",), ("grid.sasrec=", "without a SASRec checkpoint")),
    (("--grid.sasrec={tmp}/part",), ("/part: its SASRec stage has not finished",)),
  ],
  ids=[
    "unbalanced_quote",
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


def test_a_failed_run_leaves_the_error_line_alone_on_stderr(tmp_path):
  """No progress-bar fragments before the runner's `error:` line (stderr is not a terminal);
  stdout says which run was running and where its log is. The run itself is stubbed out."""
  script = tmp_path / "grid_fails.py"
  script.write_text(
    f"import sys; sys.path.insert(0, {ROOT!r})\n"
    "from ilora_jax import experiments\n"
    "def execute(run, python):\n"
    "  raise experiments.UserError(f'run {run.name} failed (exit 1): boom')\n"
    "experiments.execute = execute\n"
    "experiments.main()\n"
  )
  w = str(tmp_path / "grid")
  proc = run_cli(GRID, f"--workdir={w}", "--grid.seeds=0", script=str(script))
  assert proc.returncode == 2
  assert proc.stderr == "error: run sasrec/seed0 failed (exit 1): boom\n"
  log = os.path.join(w, "sasrec", "seed0", "log.txt")
  assert proc.stdout.splitlines()[-1] == f"sasrec/seed0: running, log {log}"
