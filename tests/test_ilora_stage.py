"""The iLoRA stage end to end on the tiny config, and properties of its train step."""

import json
import os

import chex
import jax
import numpy as np
import pytest
from conftest import ROOT, run_cli

TINY = "--config=configs/tiny.py"


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  proc = run_cli(TINY, f"--workdir={workdir}", "--config.stage=pipeline")
  assert proc.returncode == 0, proc.stderr
  return workdir, proc


def test_pipeline_trains_sasrec_then_ilora(pipeline):
  workdir, proc = pipeline
  records = _records(workdir)
  ilora = [r for r in records if r["stage"] == "ilora"]
  train = [r for r in ilora if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 7))
  assert all(np.isfinite(r["loss"]) for r in train)
  for r in train:  # Gate statistics of a 2-expert router: weights sum to one.
    assert abs(r["gate_mean/0"] + r["gate_mean/1"] - 1) < 1e-5
    assert 0 <= r["gate_entropy"] <= np.log(2) + 1e-6
  final = [r for r in ilora if r.get("final")]
  assert [r["split"] for r in final] == ["val", "test"]
  generation = {"valid_ratio", "hit_ratio@1", "hits_over_total", "loss"}
  scoring = {"hr@1", "hr@5", "ndcg@5", "mrr"}
  assert generation | scoring | {f"sasrec/{k}" for k in scoring} <= set(final[0])
  for r in final:
    assert 0 <= r["hr@1"] <= r["hr@5"] <= 1 and 0 <= r["sasrec/hr@1"] <= r["sasrec/hr@5"] <= 1
  assert "% of the" in proc.stderr  # Trainable parameters reported as a fraction.
  # The report: plots, gate table of every val user, and the final metrics in summary.md.
  for name in ("train_loss.png", "val_metrics.png", "gates.png", "summary.md"):
    assert os.path.getsize(os.path.join(workdir, "report", name)) > 0
  gates = np.load(os.path.join(workdir, "report", "gates.npz"))
  assert gates["gates"].shape[1] == 2 and np.allclose(gates["gates"].sum(-1), 1, atol=1e-5)
  summary = open(os.path.join(workdir, "report", "summary.md")).read()
  assert f"{final[0]['hr@1']:.4f}" in summary and f"{final[0]['sasrec/mrr']:.4f}" in summary


def test_ilora_resume_matches_uninterrupted(pipeline, tmp_path):
  full_dir, _ = pipeline
  workdir = str(tmp_path)
  sasrec = run_cli(TINY, f"--workdir={workdir}", "--config.stage=sasrec")
  assert sasrec.returncode == 0, sasrec.stderr
  first = run_cli(
    TINY, f"--workdir={workdir}", "--config.stage=ilora", "--config.train.stop_after_steps=3"
  )
  assert first.returncode == 0, first.stderr
  assert "stopped at step 3 of 6" in first.stderr
  second = run_cli(TINY, f"--workdir={workdir}", "--config.stage=ilora")
  assert second.returncode == 0, second.stderr
  assert "resumed from step 3" in second.stderr
  ours = [r for r in _records(workdir) if r["stage"] == "ilora"]
  ref = [r for r in _records(full_dir) if r["stage"] == "ilora"]
  assert ours == ref


def test_evaluate_stage_for_ilora(pipeline):
  workdir, _ = pipeline
  proc = run_cli(
    TINY, f"--workdir={workdir}", "--config.stage=evaluate", "--config.eval.stage=ilora"
  )
  assert proc.returncode == 0, proc.stderr
  last = _records(workdir)[-1]
  assert last["run"] == "evaluate" and last["stage"] == "ilora" and "valid_ratio" in last


def test_ilora_without_sasrec_is_a_clear_error(tmp_path):
  proc = run_cli(TINY, f"--workdir={tmp_path}", "--config.stage=ilora")
  assert proc.returncode != 0
  assert "error: the ilora stage needs a trained SASRec" in proc.stderr


@pytest.fixture(scope="module")
def setup_tiny(pipeline):
  import sys

  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny

  from ilora_jax import train_ilora

  config = tiny.get_config()
  workdir, _ = pipeline
  return config, train_ilora.setup(config, workdir), workdir


def test_step_changes_only_trainable_state_and_compiles_once(setup_tiny):
  from ilora_jax import train_ilora

  config, su, _ = setup_tiny
  counted = chex.assert_max_traces(
    train_ilora.make_train_step(su.parts, su.tx, su.gate_kind, su.seed), n=1
  )
  step, _ = train_ilora.jit_train_step(su, counted)  # The run's jit: shardings, donation.
  frozen_before = jax.tree.map(np.asarray, su.frozen)
  state = su.state
  lora_before = jax.tree.map(np.asarray, state["trainable"]["lora"])
  for s in range(2):
    idx = np.arange(s * 8, s * 8 + 8)
    host = train_ilora.train_batch(
      su.parts, config, su.dataset.train, idx, 0, s, su.total_steps, su.seed, su.accum, length=512
    )
    state, metrics = step(state, su.frozen, host)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, su.frozen), frozen_before)
  changed = jax.tree.map(
    lambda a, b: not np.array_equal(a, np.asarray(b)), lora_before, state["trainable"]["lora"]
  )
  assert any(jax.tree.leaves(changed))
  assert int(state["step"]) == 2


def test_recommend_cli_and_api(pipeline):
  from conftest import assert_one_line_error

  import ilora_jax
  from ilora_jax import synthetic

  workdir, _ = pipeline
  titles = synthetic.titles(60)
  proc = run_cli(f"--workdir={workdir}", f"--history=3|{titles[5]}|7", "--k=3",
                 module="ilora_jax.recommend")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 3
  scores = [float(line.split()[0]) for line in lines]
  assert scores == sorted(scores, reverse=True)
  for line in lines:
    item = int(line.split()[1])
    assert line.split(None, 2)[2] == titles[item] and item not in (3, 5, 7)
  typo = titles[12][:-1] + "x"
  proc = run_cli(f"--workdir={workdir}", f"--history={typo}", module="ilora_jax.recommend")
  line = assert_one_line_error(proc, "unknown history title", "close matches")
  assert titles[12] in line
  # The API re-ranks given candidates; the winner has the highest log-likelihood.
  cands = [titles[i] for i in (10, 11, 12, 13)]
  top = ilora_jax.recommend(workdir, history=[1, 2, 4], candidates=cands, k=4)
  assert sorted(t for _, t, _ in top) == sorted(cands)
  assert [s for *_, s in top] == sorted((s for *_, s in top), reverse=True)
