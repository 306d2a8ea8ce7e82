"""The iLoRA stage end to end on the tiny config, and properties of its train step."""

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  ROOT,
  TINY,
  assert_one_line_error,
  complete_steps,
  copy_of,
  ilora_records,
  metrics_records,
  run_cli,
  run_unshared,
  shared_path,
  unshare_works,
  with_sasrec_of,
  xla_flags,
)

# The `pipeline` fixture (conftest.py) is the tiny config's pipeline run, shared by every test
# file and pytest-xdist worker: tests that write into a workdir take a copy of it first.


def test_pipeline_trains_sasrec_then_ilora(pipeline):
  workdir, proc = pipeline
  records = metrics_records(workdir)
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
  baselines = {f"sasrec/{k}" for k in scoring} | {f"base/{k}" for k in generation | scoring}
  assert generation | scoring | (baselines - {"base/loss"}) <= set(final[0])
  for r in final:
    assert 0 <= r["hr@1"] <= r["hr@5"] <= 1 and 0 <= r["sasrec/hr@1"] <= r["sasrec/hr@5"] <= 1
  assert "% of the" in proc.stderr  # Trainable parameters reported as a fraction.
  # Each final evaluation's rows: their outcomes add up to the recorded metrics.
  for r in final:
    with open(os.path.join(workdir, "predictions", f"{r['split']}.jsonl")) as f:
      head, *rows = [json.loads(line) for line in f]
    assert head["candidates"] == r["candidates"] and head["rows"] == len(rows) > 0
    assert [x["row"] for x in rows] == sorted(x["row"] for x in rows)
    for prefix in ("", "base/"):
      hits, valid = (np.mean([x[prefix + k] for x in rows]) for k in ("hit", "valid"))
      assert hits == pytest.approx(r[prefix + "hits_over_total"])
      assert valid == pytest.approx(r[prefix + "valid_ratio"])
    for prefix in ("", "base/", "sasrec/"):
      ranks = np.array([x[prefix + "rank"] for x in rows])
      assert np.mean(ranks == 0) == pytest.approx(r[prefix + "hr@1"])
      assert np.mean(ranks < 5) == pytest.approx(r[prefix + "hr@5"])
      assert np.mean(1 / (ranks + 1)) == pytest.approx(r[prefix + "mrr"])
    assert all(isinstance(x["generated"], str) and x["title"] for x in rows)
  # The report: plots, gate table of every val user, and the final metrics in summary.md.
  for name in ("train_loss.png", "val_metrics.png", "gates.png", "summary.md"):
    assert os.path.getsize(os.path.join(workdir, "report", name)) > 0
  gates = np.load(os.path.join(workdir, "report", "gates.npz"))
  assert gates["gates"].shape[1] == 2 and np.allclose(gates["gates"].sum(-1), 1, atol=1e-5)
  summary = open(os.path.join(workdir, "report", "summary.md")).read()
  assert f"{final[0]['hr@1']:.4f}" in summary and f"{final[0]['sasrec/mrr']:.4f}" in summary
  for method, prefix in (("iLoRA (E=2, router linear), this run", ""), ("SASRec", "sasrec/"),
                         ("base LLM, no adapters (text-only prompt)", "base/")):  # fmt: skip
    assert f"| {method} | " in summary
    assert f"{final[0][prefix + 'mrr']:.4f}" in summary


def test_ilora_resume_matches_uninterrupted(pipeline, tmp_path):
  full_dir, _ = pipeline
  workdir = with_sasrec_of(full_dir, tmp_path / "w")  # The same SASRec, not retrained.
  # The first half builds its batches in the loop, the rest (and the uninterrupted run) in
  # the prefetch thread: the records must not tell them apart.
  first = _ilora(workdir, "--config.train.stop_after_steps=3", "--config.ilora.prefetch=0")
  assert first.returncode == 0, first.stderr
  assert "stopped at step 3 of 6" in first.stderr
  # A resume whose prompts would start otherwise is refused, and leaves the run's config.json
  # (which `recommend` reads) as the run made it.
  refused = _ilora(workdir, "--config.llm.bos=always")
  line = assert_one_line_error(refused, "other settings", "bos: checkpoint []")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["llm"]["bos"] == "auto", line
  older = _as_if_saved_by_older_code(copy_of(workdir, tmp_path / "older"), "prompt templates")
  oldest = _as_if_saved_by_older_code(copy_of(workdir, tmp_path / "oldest"))
  second = _ilora(workdir)
  assert second.returncode == 0, second.stderr
  assert "resumed from step 3" in second.stderr
  assert ilora_records(workdir) == ilora_records(full_dir)
  # A checkpoint of code that recorded no prompt templates was trained on that code's own:
  # refused by them.
  refused = _ilora(oldest)
  assert_one_line_error(
    refused, "was trained on prompt templates of other wording (digest 5d8451ac9a25fbd2)"
  )
  # One that recorded fewer settings but these templates: its plain step order is known, the
  # rest is not compared.
  refused = _ilora(older)
  assert_one_line_error(refused, "ilora.bucket_window: checkpoint 1 vs config 16")
  resumed = _ilora(older, "--config.ilora.bucket_window=1", "--config.train.stop_after_steps=4")
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step 3" in resumed.stderr


def test_ilora_train_records_follow_log_every_steps(pipeline, tmp_path):
  """train.log_every_steps=4 (the audit found it ignored by the iLoRA stage): of the tiny
  run's 6 steps (stopped at 3 and resumed), records at steps 4 and 6 (the last), each the
  mean of its steps' values in the run that records every step (the tiny config's
  ilora.train.log_every_steps=1), the run's skipped updates and the learning rate as of its
  own step; the rest of the log alike."""
  full_dir, _ = pipeline
  workdir = with_sasrec_of(full_dir, tmp_path / "w")
  # Stopped and resumed between two records: the checkpoint carries the steps not yet recorded.
  first = _ilora(workdir, "--config.train.log_every_steps=4", "--config.train.stop_after_steps=3")
  assert first.returncode == 0, first.stderr
  proc = _ilora(workdir, "--config.train.log_every_steps=4")
  assert proc.returncode == 0 and "resumed from step 3" in proc.stderr, proc.stderr
  every = [r for r in ilora_records(full_dir) if r["split"] == "train"]
  assert [r["step"] for r in every] == [1, 2, 3, 4, 5, 6]
  records = ilora_records(workdir)
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [4, 6]
  for record, steps in zip(train, (every[:4], every[4:])):
    for key in ("loss", "grad_norm", "gate_entropy", "gate_mean/0", "gate_mean/1"):
      assert record[key] == pytest.approx(np.mean([r[key] for r in steps]), rel=1e-6), key
    assert record["skipped_updates"] == steps[-1]["skipped_updates"]  # The run's count so far.
    assert record["lr"] == steps[-1]["lr"] and record["epoch"] == steps[-1]["epoch"]
  assert [r for r in records if r["split"] != "train"] == [
    r for r in ilora_records(full_dir) if r["split"] != "train"
  ]


def _ilora(workdir, *overrides: str):
  """The tiny config's iLoRA stage in `workdir` (a run, or its resume)."""
  return run_cli(TINY, f"--workdir={workdir}", "--config.stage=ilora", *overrides)


def _as_if_saved_by_older_code(workdir, *kept: str):
  """`workdir` with its checkpoints' settings cut to those recorded before d89df9d (and
  `kept`)."""
  import glob

  older = ("llm", "lora", "router", "data", "batch", "total_steps", "seed", "lr", "train_rows")
  older += kept
  paths = glob.glob(os.path.join(workdir, "checkpoints", "ilora", "*", "meta", "metadata"))
  assert paths
  for path in paths:
    with open(path) as f:
      meta = json.load(f)
    meta["settings"] = {k: meta["settings"][k] for k in older}
    with open(path, "w") as f:
      json.dump(meta, f)
  return workdir


def test_settings_added_later_against_older_checkpoints():
  from ilora_jax import checkpointing
  from ilora_jax.errors import UserError

  current = {"lr": 0.1, "bos": [1], "window": 16}
  older = {"lr": 0.1}  # A checkpoint saved before `bos` and `window` were recorded.
  unknown_bos = {"bos": checkpointing.UNKNOWN, "window": 16}
  checkpointing.check_same_settings(older, current, "d", added=unknown_bos)
  with pytest.raises(UserError, match=r"bos: checkpoint None vs config \[1\]"):
    checkpointing.check_same_settings(older, current, "d")  # Not declared as added.
  with pytest.raises(UserError, match=r"window: checkpoint 1 vs config 16"):  # Known old value.
    checkpointing.check_same_settings(older, current, "d", added={**unknown_bos, "window": 1})
  with pytest.raises(UserError, match=r"bos: checkpoint \[2\] vs config \[1\]"):
    checkpointing.check_same_settings({**current, "bos": [2]}, current, "d", added=unknown_bos)
  with pytest.raises(UserError, match=r"lr: checkpoint 0.2 vs config 0.1"):
    checkpointing.check_same_settings({"lr": 0.2}, current, "d", added=unknown_bos)


def test_evaluate_stage_for_ilora(pipeline, tmp_path):
  workdir = copy_of(pipeline[0], tmp_path / "w")  # evaluate appends to the workdir's records
  shutil.rmtree(os.path.join(workdir, "report"))  # Rebuilt with the new record.
  # On 8 devices, which do not divide the run's training batch of 4: nothing is trained, so
  # that is no error (it was one, for evaluate and recommend; found by the bad-input audit).
  proc = run_cli(
    TINY, f"--workdir={workdir}", "--config.stage=evaluate", "--config.eval.stage=ilora",
    "--config.ilora.eval_base=False", env={"XLA_FLAGS": xla_flags(8)},
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert os.path.isfile(os.path.join(workdir, "report", "summary.md"))
  assert "iLoRA: evaluating the weights of step 6, selected by val hits_over_total" in proc.stderr
  last = metrics_records(workdir)[-1]
  assert last["run"] == "evaluate" and last["stage"] == "ilora" and last["split"] == "val"
  assert (last["step"], last["selected_step"], last["selected_by"]) == (6, 6, "hits_over_total")
  # The restored adapters score val as the end of training did (its final val record).
  trained = [r for r in ilora_records(workdir) if r.get("final") and r["split"] == "val"][0]
  for key in ("valid_ratio", "hit_ratio@1", "hr@1", "hr@5", "ndcg@5", "mrr"):
    assert last[key] == pytest.approx(trained[key], abs=1e-6), key
  assert last["loss"] == pytest.approx(trained["loss"], rel=1e-4)
  # Its rows replace the run's (it is now the split's latest final record): the same rows.
  path = os.path.join(workdir, "predictions", "val.jsonl")
  head, *rows = [json.loads(line) for line in open(path)]
  assert head["metrics"]["hr@1"] == last["hr@1"] and "base/hit" not in rows[0]
  run_rows = os.path.join(pipeline[0], "predictions", "val.jsonl")
  before = [json.loads(line) for line in open(run_rows)]
  for ours, theirs in zip(rows, before[1:], strict=True):
    assert ours["hit"] == theirs["hit"] and ours["rank"] == theirs["rank"], ours["row"]
  # A metrics.jsonl that is no file (a folder here) is refused before the evaluation (it was
  # after it, as one it cannot append to).
  metrics_file, kept = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "kept")
  args = [TINY, f"--workdir={workdir}", "--config.stage=evaluate", "--config.eval.stage=ilora",
          "--config.ilora.eval_base=False"]  # fmt: skip
  os.rename(metrics_file, kept)
  os.mkdir(metrics_file)
  proc = run_cli(*args)
  assert_one_line_error(proc, f"{metrics_file} is not a file")
  assert proc.stdout == ""
  os.rmdir(metrics_file)
  os.rename(kept, metrics_file)
  # One it cannot append to (read-only: a bind mount in a user namespace) lost the evaluation,
  # with an error about checkpoints to resume from: its metrics are printed first, and the
  # error says so.
  if not unshare_works(str(tmp_path / "probe")):
    pytest.skip("needs `unshare --user --mount` (user namespaces) for a read-only metrics.jsonl")
  command = shlex.join([sys.executable, "-m", "ilora_jax.main", *args])
  script = (f"mount --bind {metrics_file} {metrics_file} && "
            f"mount -o remount,bind,ro {metrics_file} && exec {command}")  # fmt: skip
  env = {k: v for k, v in os.environ.items() if k != "ILORA_JAX_DEBUG"}
  proc = run_unshared(script, text=True, env=env)
  assert_one_line_error(proc, "cannot append to", "Read-only file system",
                        "the metrics are printed above")  # fmt: skip
  (line,) = [x for x in proc.stdout.splitlines() if x.startswith("ilora val step 6, ")]
  assert f" hr@1={last['hr@1']:.4f} " in line, line


def test_ilora_without_sasrec_is_a_clear_error(tmp_path):
  proc = run_cli(TINY, f"--workdir={tmp_path}", "--config.stage=ilora")
  assert proc.returncode != 0
  assert "error: the ilora stage needs a trained SASRec" in proc.stderr


def test_a_sasrec_trained_with_other_heads_is_refused(pipeline, tmp_path):
  pipeline_dir, _ = pipeline  # Its SASRec has tiny.py's one head; the weights fit two as well.
  workdir = with_sasrec_of(pipeline_dir, tmp_path / "w")
  proc = run_cli(
    TINY, f"--workdir={workdir}", "--config.stage=ilora", "--config.sasrec.num_heads=2"
  )
  assert_one_line_error(proc, "was trained with other settings", "num_heads 1 vs config 2")
  # Its dropout rate is no setting of the frozen model: another one loads the same weights.
  from ilora_jax import configuration, data, sharding, train_ilora

  config = configuration.load("configs/tiny.py", ["sasrec.dropout=0.3"])
  dataset = data.load_from_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  cfg, params = train_ilora.load_sasrec(config, workdir, dataset, mesh)
  assert cfg.dropout == 0.3 and jax.tree.leaves(params)


@pytest.mark.parametrize(
  "overrides,fragments",
  [
    (["--config.eval.stage=ilora", "--config.lora.rank=8"],
     ["ilora_best was made with other model settings (lora.rank 4 vs config 8); set them"]),
    (["--config.eval.stage=ilora", "--config.eval.weights=latest", "--config.router.kind=mlp"],
     ["checkpoints/ilora was made with other model settings (router.kind 'linear' vs config "
      "'mlp')"]),
    (["--config.eval.stage=ilora", "--config.data.synthetic.num_users=60"],  # Other data.
     ["ilora_best was made with other model settings (train_rows ",
      "the run was trained on other data: give the config.data.* it was trained with"]),
    (["--config.eval.stage=sasrec", "--config.sasrec.hidden=32"],
     ["checkpoints/sasrec was trained with other settings (hidden 16 vs config 32)"]),
  ],
)  # fmt: skip
def test_evaluating_with_another_model_shape_names_the_setting(pipeline, overrides, fragments):
  """The evaluate stage compares the checkpoint's recorded model settings with the config's
  before reading its arrays: one line naming the setting, not Orbax's shape error."""
  proc = run_cli(TINY, f"--workdir={pipeline[0]}", "--config.stage=evaluate", *overrides)
  assert_one_line_error(proc, *fragments)


def test_evaluating_on_another_sasrec_is_refused_and_another_llm_warns(pipeline, tmp_path):
  """The adapters, router and projector learned to read one SASRec: evaluating or recommending
  with another (here the workdir's SASRec without its last checkpoint, so the one of step 120
  loads) is refused by its fingerprint. Another LLM of the same shape (here other random
  weights) is only named in a warning: one model goes by several names."""
  workdir = copy_of(pipeline[0], tmp_path / "w")
  # config.eval.stage left at auto: the workdir's iLoRA stage, said.
  other = run_cli(TINY, f"--workdir={workdir}", "--config.stage=evaluate",
                  "--config.ilora.eval_base=False", "--config.llm.init_std=0.05")  # fmt: skip
  assert other.returncode == 0, other.stderr
  assert "evaluate: the ilora stage (config.eval.stage=auto: the workdir holds iLoRA" in (
    other.stderr
  )
  assert [metrics_records(workdir)[-1][k] for k in ("run", "stage")] == ["evaluate", "ilora"]
  assert "was trained with llm 'tiny', this config gives 'tiny (init_std 0.05)'" in other.stderr
  shutil.rmtree(os.path.join(workdir, "checkpoints", "sasrec", "130"))
  proc = run_cli(TINY, f"--workdir={workdir}", "--config.stage=evaluate",
                 "--config.eval.stage=ilora")  # fmt: skip
  line = assert_one_line_error(proc, "ilora_best was made with other model settings (sasrec ",
                               "the run was trained on another SASRec")  # fmt: skip
  assert "stopped at step 120 of 130; it is used as it is" in proc.stderr, line
  proc = run_cli(f"--workdir={workdir}", "--history=3|7", module="ilora_jax.recommend")
  assert_one_line_error(proc, "other model settings (sasrec ")


def test_a_resume_with_other_candidates_is_refused(pipeline, tmp_path):
  """The training prompts list `data.num_candidates` titles and the val sets that select the
  weights are drawn with `data.candidate_seed`: a resume (here of the finished run, which
  would re-evaluate) with either changed is refused by name, and the run's config stays. Its
  SASRec stage run again (`stage=sasrec`, which checks no iLoRA setting; here with another
  lora.rank) leaves the config the report and `recommend` read as the iLoRA run's too."""
  workdir = copy_of(pipeline[0], tmp_path / "w")
  for override, fragment in (("data.num_candidates=5", "data.num_candidates: checkpoint 20 vs "
                               "config 5"), ("data.candidate_seed=7", "data.candidate_seed: "
                               "checkpoint 2024 vs config 7")):  # fmt: skip
    proc = run_cli(TINY, f"--workdir={workdir}", "--config.stage=ilora", f"--config.{override}")
    assert_one_line_error(proc, "other settings", fragment)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["num_candidates"] == 20
  proc = run_cli(TINY, f"--workdir={workdir}", "--config.stage=sasrec", "--config.lora.rank=8")
  assert proc.returncode == 0, proc.stderr
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["stage"] == "pipeline" and saved["lora"]["rank"] == 4, saved


def test_an_unfinished_sasrec_is_refused_here_and_as_init_from(tmp_path, capsys):
  """A SASRec stage stopped at step 2 of its 130 is no frozen model for a new iLoRA run,
  whether it is the workdir's own or another workdir's given as sasrec.init_from. A run
  trained on one before this check existed keeps it outside training, with a warning."""
  part = tmp_path / "part"
  first = run_cli(TINY, f"--workdir={part}", "--config.stage=sasrec",
                  "--config.train.stop_after_steps=2", "--config.progress=False")  # fmt: skip
  assert first.returncode == 0, first.stderr
  own = run_cli(TINY, f"--workdir={part}", "--config.stage=ilora")
  assert_one_line_error(own, "stopped at step 2 of 130", "--config.stage=sasrec in this workdir")
  other = run_cli(TINY, f"--workdir={tmp_path / 'other'}", "--config.stage=ilora",
                  f"--config.sasrec.init_from={part}")  # fmt: skip
  assert_one_line_error(other, "stopped at step 2 of 130", f"in that workdir, {part},")
  assert not os.path.exists(tmp_path / "other" / "checkpoints" / "ilora")
  from ilora_jax import configuration, data, sharding, train_ilora

  config = configuration.load("configs/tiny.py", ["stage=evaluate"])
  dataset = data.load_from_config(config, str(part))
  _, params = train_ilora.load_sasrec(config, str(part), dataset, sharding.make_mesh(config.mesh))
  assert jax.tree.leaves(params)
  err = capsys.readouterr().err
  assert "warning: the SASRec in " in err and "stopped at step 2 of 130; it is used as it is" in err


def test_a_sasrec_trained_on_other_data_is_refused_then_warned(pipeline, tmp_path, capsys):
  """A SASRec trained on other rows (here the pipeline's, on synthetic seed 0, for data of
  seed 3 with the same items) would route and rank this data's users from another data
  set's item table: a new iLoRA run refuses it, given as init_from or as the workdir's own;
  an evaluation (of a run trained on one by older code) only warns."""
  from ilora_jax import configuration, data, sharding, train_ilora

  other_data = "--config.data.synthetic.seed=3"
  proc = run_cli(TINY, f"--workdir={tmp_path / 'new'}", "--config.stage=ilora", other_data,
                 f"--config.sasrec.init_from={pipeline[0]}")  # fmt: skip
  assert_one_line_error(proc, "was trained on other data", "iLoRA freezes a SASRec")
  assert not os.path.exists(tmp_path / "new" / "checkpoints" / "ilora")
  own = with_sasrec_of(pipeline[0], tmp_path / "own")
  proc = run_cli(TINY, f"--workdir={own}", "--config.stage=ilora", other_data)
  assert_one_line_error(proc, "was trained on other data", "iLoRA freezes a SASRec")
  config = configuration.load("configs/tiny.py", ["stage=evaluate", "data.synthetic.seed=3"])
  dataset = data.load_from_config(config, own)
  train_ilora.load_sasrec(config, own, dataset, sharding.make_mesh(config.mesh))
  err = capsys.readouterr().err
  assert "was trained on other data" in err and "it is used as it is" in err, err


def test_the_workdirs_own_sasrec_over_init_from_is_said(pipeline, tmp_path, capsys):
  """A new ilora run in a workdir with a SASRec of its own does not read the workdir given
  as sasrec.init_from, and says so. The pipeline, an original .pt (from which this
  workdir's SASRec stage may have started) and a run that has begun say nothing."""
  from ilora_jax import configuration, data, sharding, train_ilora

  workdir = with_sasrec_of(pipeline[0], tmp_path / "w")
  other = tmp_path / "other"
  other.mkdir()
  for stage, init_from, warned in (("ilora", other, True), ("pipeline", other, False),
                                   ("ilora", tmp_path / "x.pt", False)):  # fmt: skip
    config = configuration.load(
      "configs/tiny.py", [f"stage={stage}", f"sasrec.init_from={init_from}"]
    )
    dataset = data.load_from_config(config, workdir)
    train_ilora.load_sasrec(config, workdir, dataset, sharding.make_mesh(config.mesh))
    err = capsys.readouterr().err
    assert ("warning: config.sasrec.init_from=" in err) == warned, (stage, init_from, err)
    assert "iLoRA: SASRec from " + os.path.join(workdir, "checkpoints", "sasrec") in err
  begun = copy_of(pipeline[0], tmp_path / "begun")  # Holds ilora checkpoints.
  config = configuration.load("configs/tiny.py", ["stage=ilora", f"sasrec.init_from={other}"])
  train_ilora.load_sasrec(config, begun, data.load_from_config(config, begun),
                          sharding.make_mesh(config.mesh))  # fmt: skip
  assert "warning" not in capsys.readouterr().err


def test_a_damaged_checkpoint_is_one_line_naming_the_step_to_remove(pipeline, tmp_path):
  pipeline_dir, _ = pipeline
  workdir = copy_of(pipeline_dir, tmp_path / "w")
  ckpt_dir = os.path.join(workdir, "checkpoints", "ilora")
  latest = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  for root, _, files in os.walk(os.path.join(ckpt_dir, str(latest))):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        if os.path.getsize(path) > 1000 and f.read(1) != b"{":  # The arrays' data, not JSON.
          f.truncate(50)
  proc = run_cli(TINY, f"--workdir={workdir}", "--config.stage=ilora")
  assert_one_line_error(
    proc, f"checkpoint {latest} in", "damaged", f"remove {os.path.join(ckpt_dir, str(latest))}"
  )
  # The SASRec's array data cut to 10 bytes, restored by the evaluate stage: the same one line,
  # and nothing after it (Orbax's failed background reads log no tracebacks at exit).
  sas_dir = os.path.join(workdir, "checkpoints", "sasrec")
  sas_step = max(int(d) for d in os.listdir(sas_dir) if d.isdigit())
  for root, _, files in os.walk(os.path.join(sas_dir, str(sas_step))):
    if root.endswith(os.path.join("ocdbt.process_0", "d")):  # The arrays' data files.
      for name in files:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(10)
  proc = run_cli(TINY, f"--workdir={workdir}", "--config.stage=evaluate",
                 "--config.eval.stage=sasrec")  # fmt: skip
  assert_one_line_error(proc, f"checkpoint {sas_step} in", "unreadable", "remove")
  assert proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr[-2000:]


@pytest.fixture(scope="module")
def setup_tiny(pipeline):
  import sys

  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny

  from ilora_jax import train_ilora

  config = tiny.get_config()
  workdir, _ = pipeline
  return config, train_ilora.setup(config, workdir), workdir


def test_a_refused_resume_stops_before_the_llm_weights_are_read(
  setup_tiny, tmp_path, monkeypatch, capsys
):
  """The resume's check runs on settings known before the LLM's weights are read (a 7B
  model's 13 GB): those the setup computes equal what the run's checkpoint recorded, and with
  `llm.load` made to fail, a resume with another prompt start is still refused for it."""
  from ilora_jax import checkpointing, llm, train_ilora
  from ilora_jax.data import split_fingerprint
  from ilora_jax.errors import UserError

  config, su, pipeline_dir = setup_tiny
  # What a checkpoint records, from the tiny config (configs/tiny.py) and SmolLM2's tokenizer
  # (no BOS); the same keys and values as before the check moved (older checkpoints match).
  expected = {
    "llm": "tiny",
    "lora": config.lora.to_dict(),
    "router": config.router.to_dict(),
    "data": "synthetic",
    "batch": [4, 2],
    "total_steps": 6,
    "seed": config.train.seed,
    "lr": 1e-3,
    "train_rows": len(su.dataset.train),
    "data.train": split_fingerprint(su.dataset.train),
    "bos": [],
    "data.titles": hashlib.sha256(
      json.dumps(sorted(su.dataset.titles.items())).encode()
    ).hexdigest()[:16],
    "llm.dtype, param_dtype": ["float32", "float32"],
    "target_slots": su.parts.max_target_tokens,
    "ilora.train.clip_norm": config.ilora.train.clip_norm,
    "weight_decay": config.ilora.train.weight_decay,
    "sasrec": train_ilora.sasrec_fingerprint(su.frozen["sasrec"]),
    "sasrec.num_heads": config.sasrec.num_heads,
    "ilora.bucket_window": 16,
    "ilora.pad_multiple": 64,
    "llm.unroll_train": False,
    "data.num_candidates": config.data.num_candidates,
    "data.candidate_seed": config.data.candidate_seed,
    "llm_weights": None,  # A random preset: its name and init decide (files get a digest).
    "prompt templates": "8c5f4365d21c5f0b",  # Steam's (the original's game.txt).
    "prompt tokens": su.parts.builder.tokens_digest(),  # The run's tokenizer's splitting.
    "llm.rope": [10000.0, None],  # The tiny preset's.
  }
  assert checkpointing.jsonable(expected) == su.settings
  ckpt = checkpointing.StageCheckpoints(pipeline_dir, "ilora", 1, False, read_only=True)
  try:
    assert ckpt.restore_meta(ckpt.latest_step())["settings"] == su.settings
  finally:
    ckpt.close()
  workdir = copy_of(pipeline_dir, tmp_path / "w")

  def no_weights(*args, **kwargs):
    raise AssertionError("the LLM's weights were read before the resume's check")

  monkeypatch.setattr(llm, "load", no_weights)
  other = config.copy_and_resolve_references()
  other.llm.bos = "always"
  with pytest.raises(UserError, match=r"other settings \(bos: checkpoint \[\] vs config"):
    train_ilora.run(other, str(workdir))
  other = config.copy_and_resolve_references()
  other.data.synthetic.titles = "words"  # Other titles of the same items: other prompts.
  with pytest.raises(UserError, match=r"other settings \(data.titles: checkpoint '"):
    train_ilora.run(other, str(workdir))
  # Other training rows, as many (another synthetic seed): the resume would train on them.
  # (Its SASRec, trained on the pipeline's rows, is only warned of where a run has begun.)
  other = config.copy_and_resolve_references()
  other.data.synthetic.seed = 3
  with pytest.raises(UserError, match=r"other settings \(.*data.train: checkpoint '"):
    train_ilora.run(other, str(workdir))
  # Another padding multiple or the layers unrolled: other dropout masks (an audit's resume
  # trained on with them, its later steps' losses and weights other than the run's).
  other = config.copy_and_resolve_references()
  other.ilora.pad_multiple, other.llm.unroll_train = 32, True
  refused = (r"other settings \(ilora.pad_multiple: checkpoint 64 vs config 32; "
             r"llm.unroll_train: checkpoint False vs config True\)")  # fmt: skip
  with pytest.raises(UserError, match=refused):
    train_ilora.run(other, str(workdir))
  # An evaluation or a recommendation on other titles is warned of.
  capsys.readouterr()
  ckpt = checkpointing.StageCheckpoints(pipeline_dir, "ilora", 1, False, read_only=True)
  try:
    step = ckpt.latest_step()
    train_ilora._check_model_settings(ckpt, step, su.settings)
    assert "warning" not in capsys.readouterr().err
    train_ilora._check_model_settings(ckpt, step, {**su.settings, "data.titles": "0" * 16})
  finally:
    ckpt.close()
  assert f"warning: checkpoint {step} in {ckpt.directory} was trained with other item titles " \
    "than the data's titles file holds now" in capsys.readouterr().err  # fmt: skip
  # A fresh run that fails while loading the LLM creates no checkpoint folder of its own.
  fresh = with_sasrec_of(pipeline_dir, tmp_path / "fresh")
  with pytest.raises(AssertionError, match="weights were read"):
    train_ilora.run(config, fresh)
  assert os.listdir(os.path.join(fresh, "checkpoints")) == ["sasrec"]


def test_titles_longer_than_the_target_cap_are_named_in_a_warning(setup_tiny, capsys):
  """Titles with more tokens than `ilora.max_target_tokens` lose their tail from the loss
  (3 of 3,581 Steam titles with SmolLM2's tokenizer): a warning says how many; none at the
  default cap."""
  from ilora_jax import train_ilora

  config, su, workdir = setup_tiny
  lengths = [len(su.parts.builder.target_tokens(i)) for i in su.dataset.titles]
  cap = max(lengths) - 1  # The longest titles are longer.
  capsys.readouterr()
  train_ilora.prompt_inputs(config, workdir, su.dataset, su.mesh)
  assert "warning" not in capsys.readouterr().err
  config = copy.deepcopy(config)
  config.ilora.max_target_tokens = cap
  train_ilora.prompt_inputs(config, workdir, su.dataset, su.mesh)
  over = sum(n > cap for n in lengths)
  assert over > 0
  assert (f"warning: {over} of {len(lengths)} titles have more than "
          f"config.ilora.max_target_tokens={cap} tokens (the longest {max(lengths)}): the "
          f"loss scores their first {cap}") in capsys.readouterr().err  # fmt: skip


def _target_logp(su, trainable, stats, batch):
  """(row, log-probability) of every target token of `batch` (one micro-batch, `loss_mask`
  marking the answer), from the adapted model's full logits over the whole sequence, the
  softmax in numpy (float64): log softmax(logits[t - 1])[ids[t]] for each target token t."""
  from ilora_jax import train_ilora

  @jax.jit
  def full_logits(trainable, stats, frozen, batch):
    gate, _ = train_ilora.gate_weights(
      su.parts, trainable, stats, frozen, batch["seq"], batch["len_seq"], False, su.gate_kind
    )
    mask, embeds = train_ilora.replacement(su.parts, trainable, frozen, batch["item_ids"])
    params = train_ilora._merge(frozen["llm"], trainable["lora"])
    return su.parts.model.module.apply(
      {"params": params}, batch["input_ids"], batch["attention"], gate_weights=gate,
      deterministic=True, replace_mask=mask, replace_embeds=embeds,
    )  # fmt: skip

  logits = np.asarray(full_logits(trainable, stats, su.frozen, batch), np.float64)[:, :-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  ids, targets = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"])
  rows, cols = np.nonzero(targets[:, 1:])
  return rows, logp[rows, cols, ids[rows, cols + 1]]


def test_target_slots_and_unrolled_layers_keep_the_loss(setup_tiny):
  """The loss gathers the longest title's tokens rounded up to 8, not the cap of 48: fewer
  rows through the LM head, the same loss as with the cap. `llm.unroll_train` runs the same
  params through unrolled layers: the same loss and gradients as the scan."""
  import dataclasses

  from ilora_jax import configuration, sharding, train_ilora

  config, su, _ = setup_tiny
  assert train_ilora.target_slots(3, 48) == 8 and train_ilora.target_slots(16, 48) == 16
  assert train_ilora.target_slots(60, 48) == 48
  longest = max(len(su.parts.builder.target_tokens(i)) for i in su.dataset.titles)
  assert su.parts.max_target_tokens == -(-longest // 8) * 8 < config.ilora.max_target_tokens
  trainable, stats = train_ilora.init_trainable(su.parts, su.mesh, sharding.rules(config), 1)
  trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # non-zero adapters (B starts at 0)
  host = train_ilora.train_batch(
    su.parts, config, su.dataset.train, np.arange(8), 0, 0, su.total_steps, su.seed, su.accum
  )
  batch = jax.tree.map(lambda x: x[0], host)  # the first micro-batch

  jitted = {}  # Jitted: run op by op, the model's many small ops each compile on their own.

  def loss(parts, trainable=trainable):
    if id(parts) not in jitted:
      jitted[id(parts)] = jax.jit(
        lambda t, frozen, batch: train_ilora.loss_fn(
          parts, su.gate_kind, t, stats, frozen, batch, jax.random.PRNGKey(0), False
        )[0]
      )
    return jitted[id(parts)](trainable, su.frozen, batch)

  capped = dataclasses.replace(su.parts, max_target_tokens=config.ilora.max_target_tokens)
  np.testing.assert_allclose(loss(su.parts), loss(capped), rtol=1e-6)

  # Against the model's full logits and the formula (numpy, float64): the mean over target
  # tokens t of -log softmax(logits[t - 1])[ids[t]].
  rows, logp = _target_logp(su, trainable, stats, batch)
  assert len(rows) > len(set(rows.tolist()))  # several target tokens per row
  np.testing.assert_allclose(float(loss(su.parts)), -logp.mean(), rtol=2e-5)

  unrolled_config = configuration.override(config, ["llm.unroll_train=True"])
  unrolled = train_ilora.make_parts(
    unrolled_config, su.parts.model, su.parts.sasrec.cfg, su.parts.builder, su.parts.n_items,
    longest, su.parts.newline_ids,
  )  # fmt: skip
  assert unrolled.unroll_train and not su.parts.unroll_train
  assert unrolled.max_target_tokens == su.parts.max_target_tokens
  scanned = jax.jit(jax.value_and_grad(lambda t: loss(su.parts, t)))(trainable)
  chex.assert_trees_all_close(
    jax.jit(jax.value_and_grad(lambda t: loss(unrolled, t)))(trainable), scanned, rtol=1e-5,
    atol=1e-6,
  )  # fmt: skip


def test_placeholders_get_the_projected_sasrec_embedding_of_their_item(setup_tiny):
  """Where a hybrid prompt holds `[HistoryEmb]` or `[CansEmb]`, the LLM reads the projector's
  output for that item's row of SASRec's item table: numpy's Linear, exact GELU, Linear of
  the table's rows (float64), the history's placeholders in the row's history order and the
  candidates' covering the target and 19 other items outside the history."""
  import math

  from ilora_jax import prompts, sharding, train_ilora

  config, su, _ = setup_tiny
  step = su.total_steps  # The curriculum's probability of a hybrid micro-batch is then 1.
  host = train_ilora.train_batch(
    su.parts, config, su.dataset.train, np.arange(8), 0, step, su.total_steps, su.seed, su.accum
  )
  batch = jax.tree.map(lambda x: x[0], host)
  trainable, _ = train_ilora.init_trainable(su.parts, su.mesh, sharding.rules(config), 3)
  mask, embeds = jax.jit(lambda t, f, i: train_ilora.replacement(su.parts, t, f, i))(
    trainable, su.frozen, batch["item_ids"]
  )
  ids, items = np.asarray(batch["input_ids"]), np.asarray(batch["item_ids"])
  special = su.parts.builder.special_ids
  history, candidate = ids == special[prompts.HISTORY], ids == special[prompts.CANDIDATE]
  np.testing.assert_array_equal(np.asarray(mask), history | candidate)
  for row in range(ids.shape[0]):
    n = int(batch["len_seq"][row])
    assert items[row][history[row]].tolist() == batch["seq"][row][:n].tolist()
    cands = items[row][candidate[row]].tolist()
    assert len(set(cands)) == len(cands) == config.data.num_candidates
    assert int(su.dataset.train.next[row]) in cands
    assert not set(cands) & set(batch["seq"][row][:n].tolist()) - {int(su.dataset.train.next[row])}
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), trainable["projector"])
  table = np.asarray(su.frozen["sasrec"]["item_embeddings"]["embedding"], np.float64)
  x = table[items[mask]] @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  x = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  want = x @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  np.testing.assert_allclose(np.asarray(embeds)[np.asarray(mask)], want, rtol=1e-4, atol=1e-5)


def test_a_step_averages_its_micro_batches_and_a_nan_step_keeps_router_statistics(
  pipeline, tmp_path
):
  """With the resnet1d router (BatchNorm statistics) and two micro-batches per update: the
  step's loss and gradient norm are those of the mean of the two micro-batches' gradients,
  each taken alone with its own dropout key, and the router's statistics move. A step whose
  loss is NaN (here a NaN projector) changes neither weights nor statistics and is counted."""
  from ilora_jax import configuration, optim, train_ilora

  config = configuration.load("configs/tiny.py", ["stage=ilora", "router.kind=resnet1d"])
  su = train_ilora.setup(config, with_sasrec_of(pipeline[0], tmp_path / "w"))
  assert su.accum == 2 and jax.tree.leaves(su.state["stats"])
  host = train_ilora.train_batch(su.parts, config, su.dataset.train, np.arange(8), 0,
                                 su.total_steps, su.total_steps, su.seed, su.accum)  # fmt: skip
  step = jax.jit(train_ilora.make_train_step(su.parts, su.make_tx, su.gate_kind))
  state = jax.tree.map(np.asarray, su.state)
  after, metrics = step(state, su.frozen, host)

  step_key = jax.random.fold_in(su.frozen["run"]["key"], state["step"])

  @jax.jit
  def micro_grad(trainable, batch, key):
    def loss(t):
      return train_ilora.loss_fn(su.parts, su.gate_kind, t, state["stats"], su.frozen, batch,
                                 key, True)[0]  # fmt: skip

    return jax.value_and_grad(loss)(trainable)

  losses, grads = zip(*(micro_grad(state["trainable"], jax.tree.map(lambda x, a=a: x[a], host),
                                   jax.random.fold_in(step_key, a)) for a in range(2)))  # fmt: skip
  mean = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) + np.asarray(b)) / 2, *grads)
  norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(mean)))
  np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["stats"]),
                                                     jax.tree.leaves(state["stats"]))]  # fmt: skip
  assert all(moved)

  state = jax.tree.map(np.asarray, after)
  state["trainable"]["projector"] = jax.tree.map(
    lambda x: x * np.nan, state["trainable"]["projector"]
  )
  nan_after, nan_metrics = step(state, su.frozen, host)
  assert not np.isfinite(float(nan_metrics["loss"]))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nan_after["stats"]), state["stats"])
  chex.assert_trees_all_equal(
    jax.tree.map(np.asarray, nan_after["trainable"]["lora"]), state["trainable"]["lora"]
  )
  assert int(optim.skipped_updates(nan_after["opt_state"])) == 1


def test_generated_answers_are_matched_with_their_own_rows_target(setup_tiny):
  """The generation metric of each row compares its answer with that row's target, through
  batches and the length-sorted order: the model's answers scripted (the target's title for
  rows of even id, another candidate's for odd ones), each row's validity and hit and
  hits_over_total are the by-hand ones (`match_generation` on the row's own candidates and
  next item). Its answers end as the original's: never at a first end of text."""
  from ilora_jax import configuration, metrics, sharding, train_ilora

  config, su, _ = setup_tiny
  config = configuration.override(config, ["ilora.eval_rows=10", "ilora.eval_batch_size=4"])
  ev = train_ilora.Evaluator(su.parts, config, su.dataset.val, su.gate_kind)
  assert config.ilora.eval_sort and not np.array_equal(ev.order, np.sort(ev.order))
  assert ev._stop["min_new_tokens"] == 1  # The original's generate(min_new_tokens=1).
  titles, tokenizer = su.parts.builder.titles, su.parts.model.tokenizer
  row_of = {tuple(ev.cands[r]): r for r in ev.idx}
  assert len(row_of) == len(ev.idx)  # Each row's candidates tell it apart.
  split = su.dataset.val
  answer = {}
  for r in ev.idx:
    nxt = int(split.next[r])
    answer[r] = nxt if r % 2 == 0 else next(int(c) for c in ev.cands[r] if c != nxt)

  def scripted(module, params, gate, mask, embeds, prompt, cands):
    texts = [tokenizer.encode(f"{titles[answer[row_of[tuple(c)]]]}\n", add_special_tokens=False)
             if tuple(c) in row_of else [] for c in cands]  # fmt: skip
    ids = np.zeros((len(cands), max(map(len, texts))), np.int32)
    for j, t in enumerate(texts):
      ids[j, : len(t)] = t
    return ids, np.array([len(t) for t in texts]), np.zeros(cands.shape, np.float32)

  ev._generate_and_score = scripted
  trainable, stats = train_ilora.init_trainable(su.parts, su.mesh, sharding.rules(config), 0)
  result = ev(trainable, stats, su.frozen, False)
  want = [metrics.match_generation(titles[answer[r]] + "\n", [titles[int(c)] for c in ev.cands[r]],
                                   int(np.flatnonzero(ev.cands[r] == split.next[r])[0]))
          for r in ev.idx]  # fmt: skip
  assert [(row["valid"], row["hit"]) for row in ev.rows] == want
  assert sum(h for _, h in want) >= 3  # The even rows' answers are hits.
  assert result["hits_over_total"] == sum(h for _, h in want) / len(ev.idx)


def test_training_candidates_are_drawn_anew_each_epoch(setup_tiny):
  """As the original draws its negatives on every pass: each epoch gives a row other
  candidates, each draw holding the row's next item once and nothing of its history."""
  from ilora_jax import train_ilora

  config, su, _ = setup_tiny
  split = su.dataset.train
  draws = [train_ilora.train_candidates(su.parts, config, split, e, su.seed) for e in (0, 1)]
  changed = np.mean([set(a) != set(b) for a, b in zip(*draws)])
  assert changed > 0.9, changed
  for cands in draws:
    for r in range(len(split)):
      assert list(cands[r]).count(split.next[r]) == 1
      assert len(set(cands[r].tolist())) == config.data.num_candidates
      history = set(split.seq[r][: split.len_seq[r]].tolist()) - {int(split.next[r])}
      assert not history & set(cands[r].tolist())


def _holds(seq: list, part: list) -> bool:
  """Whether `part` runs contiguously in `seq`."""
  return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def test_each_micro_batch_draws_its_template_and_form(setup_tiny):
  """The original draws a template per batch and accumulates gradients over batches: here each
  micro-batch of a step has its own template and hybrid or text-only form, text-only at step
  0 (the curriculum's probability step / total_steps), both forms and several templates
  within later steps, all rows of a micro-batch alike."""
  from ilora_jax import prompts, train_ilora

  config, su, _ = setup_tiny
  builder = su.parts.builder
  # Each template's text before the history and after it (two of Steam's begin alike).
  heads = [(t[0], t[1]) for t in builder.templates]
  marks = {builder.special_ids[prompts.HISTORY], builder.special_ids[prompts.PLACEHOLDER]}
  accum, total = 8, 4
  drawn = {}
  for step in range(total):
    host = train_ilora.train_batch(
      su.parts, config, su.dataset.train, np.arange(16), 0, step, total, su.seed, accum
    )
    chex.assert_shape(host["input_ids"], (accum, 2, None))
    for a in range(accum):
      forms, templates = set(), set()
      for ids in host["input_ids"][a].tolist():
        body = ids[len(builder.bos) :]
        templates |= {
          t for t, (h, m) in enumerate(heads) if body[: len(h)] == h and _holds(body, m)
        }
        forms.add(builder.special_ids[prompts.HISTORY] in ids)
        assert marks & set(ids)
      assert len(forms) == 1 and len(templates) == 1, (step, a, forms, templates)
      drawn[step, a] = (templates.pop(), forms.pop())
  assert not any(drawn[0, a][1] for a in range(accum))  # step 0: text-only
  later = [[drawn[s, a] for a in range(accum)] for s in range(1, total)]
  assert any(len({t for t, _ in step}) > 1 for step in later)
  assert any(len({h for _, h in step}) == 2 for step in later)


def test_step_changes_only_trainable_state_and_compiles_once(setup_tiny):
  from ilora_jax import train_ilora

  config, su, _ = setup_tiny
  counted = chex.assert_max_traces(
    train_ilora.make_train_step(su.parts, su.make_tx, su.gate_kind), n=1
  )
  step, _ = train_ilora.jit_train_step(su, counted)  # The run's jit: shardings, donation.
  frozen_before = jax.tree.map(np.asarray, su.frozen)
  state = jax.tree.map(jnp.array, su.state)  # A copy: the step donates it (the fixture's).
  trainable_before = jax.tree.map(np.asarray, state["trainable"])
  assert {"lora", "router", "projector"} <= set(trainable_before)
  for s in range(2):
    idx = np.arange(s * 8, s * 8 + 8)
    # Drawn as at the curriculum's end (total_steps 1): hybrid prompts, so the projector has
    # a gradient; B starts at 0, so A and the router have one from the second step on.
    host = train_ilora.train_batch(
      su.parts, config, su.dataset.train, idx, 0, s + 1, 1, su.seed, su.accum, length=512
    )
    state, metrics = step(state, su.frozen, host)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, su.frozen), frozen_before)
  before = jax.tree_util.tree_leaves_with_path(trainable_before)
  after = jax.tree.leaves(state["trainable"])
  unchanged = [
    jax.tree_util.keystr(path)
    for (path, a), b in zip(before, after)
    if np.array_equal(a, np.asarray(b))
  ]
  assert not unchanged, unchanged  # every adapter, router and projector leaf trained
  assert int(state["step"]) == 2


def test_a_step_of_text_only_prompts_leaves_the_projector_as_it_was(setup_tiny):
  """At the curriculum's start every prompt is text-only: the projector computes nothing and
  gets no gradient, and the original (its gradients turned off, torch's Adam skipping it)
  leaves it alone. The coupled L2 alone moved it by about the learning rate per step. The
  adapters train all the same."""
  from ilora_jax import train_ilora

  config, su, _ = setup_tiny
  step, _ = train_ilora.jit_train_step(su)
  state = jax.tree.map(jnp.array, su.state)  # A copy: the step donates its state.
  before = jax.tree.map(np.asarray, state)
  host = train_ilora.train_batch(
    su.parts, config, su.dataset.train, np.arange(8), 0, 0, 100, su.seed, su.accum, length=512
  )
  assert host["item_ids"].size and not np.any(host["item_ids"] < su.parts.n_items)  # No items.
  state, metrics = step(state, su.frozen, host)
  assert bool(metrics["finite"])
  chex.assert_trees_all_equal(
    jax.tree.map(np.asarray, state["trainable"]["projector"]), before["trainable"]["projector"]
  )
  lora = zip(
    jax.tree.leaves(before["trainable"]["lora"]), jax.tree.leaves(state["trainable"]["lora"])
  )
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in lora)


def test_recommend_cli_and_api(pipeline):
  from conftest import assert_one_line_error

  import ilora_jax
  from ilora_jax import synthetic

  workdir, _ = pipeline
  titles = synthetic.titles(60)
  proc = run_cli(f"--workdir={workdir}", f"--history=3|{titles[5]}|7", "--k=3",
                 module="ilora_jax.recommend", env={"XLA_FLAGS": xla_flags(8)})  # fmt: skip
  assert proc.returncode == 0, proc.stderr  # 8 devices and a training batch of 4: no matter.
  # The run's one epoch is its best: the weights of its last step, kept as the selected ones.
  assert "recommend: ranking with the weights of step 6, selected by val hits_over_total" in (
    proc.stderr
  )
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
  # Entries resolve before the model is built: the error is all that is printed.
  assert proc.stderr.strip() == line and not proc.stdout
  # The API re-ranks given candidates by the log-likelihood of each title (and its line end)
  # after the prompt: each the sum over the answer's tokens of the adapted model's full
  # logits' log-softmax, the prompt listing the candidates in the order given (template 0).
  cands = [titles[i] for i in (10, 11, 12, 13)]
  top = ilora_jax.recommend(workdir, history=[1, 2, 4], candidates=cands, k=4)
  assert sorted(t for _, t, _ in top) == sorted(cands)
  assert [s for *_, s in top] == sorted((s for *_, s in top), reverse=True)
  from ilora_jax.recommend import Recommender

  restored = Recommender(workdir).restored
  state, parts = restored.state, restored.su.parts
  want = {}
  for item in (10, 11, 12, 13):
    answered = parts.builder.batch([([1, 2, 4], [10, 11, 12, 13], item)], 0, True)
    batch = dict(answered.as_dict(), seq=np.array([[1, 2, 4] + [60] * 7]), len_seq=np.array([3]))
    want[item] = _target_logp(restored.su, state["trainable"], state["stats"], batch)[1].sum()
  np.testing.assert_allclose([s for *_, s in top], [want[i] for i, *_ in top], rtol=1e-4)


def test_runs_of_other_seeds_rates_and_lengths_share_one_compiled_step(setup_tiny):
  """Seed, learning rate and run length reach the train step as inputs (`frozen["run"]`),
  not as constants: two such runs lower to the same program (so a sweep's later runs load
  the first one's compiled step from the persistent cache), and the inputs still act: the
  same step on the same batch gives other updates."""
  from ilora_jax import train_ilora

  config, su, workdir = setup_tiny
  other = config.copy_and_resolve_references()
  other.train.seed, other.train.lr, other.train.steps = 7, 3e-3, 11
  su2 = train_ilora.setup(other, workdir)
  assert (su2.seed, su2.lr, su2.total_steps) != (su.seed, su.lr, su.total_steps)
  host = train_ilora.train_batch(
    su.parts, config, su.dataset.train, np.arange(8), 0, 1, 1, su.seed, su.accum, length=512
  )
  texts, updates = [], []
  for s in (su, su2):
    state = jax.tree.map(jnp.array, su2.state)  # A fresh copy (other tests donate su.state).
    step, _ = train_ilora.jit_train_step(s)
    texts.append(step.lower(state, s.frozen, host).as_text())
    new, _ = step(state, s.frozen, host)
    updates.append(jax.tree.map(np.asarray, new["trainable"]["projector"]))
  assert texts[0] == texts[1]
  differ = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), *updates))
  assert differ and all(differ)


def test_recommend_cli_uses_the_runs_compile_cache(pipeline, tmp_path):
  workdir = tmp_path / "run"
  copy_of(pipeline[0], workdir)
  cache = tmp_path / "xla"
  with open(workdir / "config.json") as f:
    saved = json.load(f)
  saved["compile_cache_dir"] = str(cache)  # As if the run had been started with it.
  with open(workdir / "config.json", "w") as f:
    json.dump(saved, f)
  proc = run_cli(f"--workdir={workdir}", "--history=3|7", "--k=2", module="ilora_jax.recommend")
  assert proc.returncode == 0, proc.stderr
  assert cache.is_dir() and os.listdir(cache), "the recommend CLI wrote no compiled program"


def test_base_llm_baseline_equals_full_forward_of_text_prompts(setup_tiny):
  """`base/...` ranks candidates by the frozen LLM on text-only prompts: checked by brute force."""
  from ilora_jax import metrics, train_ilora

  config, su, _ = setup_tiny
  config = config.copy_and_resolve_references()
  config.ilora.eval_rows, config.ilora.eval_generate, config.ilora.eval_base = 4, False, True
  from ilora_jax import sharding

  ev = train_ilora.Evaluator(su.parts, config, su.dataset.val, su.gate_kind)
  # Fresh adapters (other tests donate su.state to their steps); B = 0 but the hybrid prompt.
  trainable, stats = train_ilora.init_trainable(su.parts, su.mesh, sharding.rules(config), 0)
  result = ev(trainable, stats, su.frozen, False, baselines=True)
  builder, split = su.parts.builder, su.dataset.val
  seqs, spans = [], []
  for r in range(4):  # Every (prompt, candidate) pair as its own right-padded sequence.
    history = split.seq[r, : split.len_seq[r]].tolist()
    ids, _, _ = builder.encode_row(history, ev.cands[r].tolist(), None, 0, False)
    for c in ev.cands[r]:
      title = builder.target_tokens(int(c))
      seqs.append(ids + title)
      spans.append((len(ids), len(title)))
  length, longest = max(map(len, seqs)), max(n for _, n in spans)
  module = su.parts.model.base_module

  @jax.jit
  def answer_logits(params, tokens, mask, starts):
    """Logits at the positions that predict each answer token: [b, longest, vocab]."""
    logits = module.apply({"params": params}, tokens, mask)
    at = jnp.minimum(starts[:, None] - 1 + jnp.arange(longest)[None], length - 1)
    return jnp.take_along_axis(logits, at[..., None], axis=1)

  brute = []
  for r in range(4):  # One row's 20 candidates at a time: full logits of 80 rows take gigabytes.
    rows = range(r * len(ev.cands[r]), (r + 1) * len(ev.cands[r]))
    tokens = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(tokens)
    for k, i in enumerate(rows):
      tokens[k, : len(seqs[i])], mask[k, : len(seqs[i])] = seqs[i], 1
    starts = np.array([spans[i][0] for i in rows], np.int32)
    logits = answer_logits(su.frozen["llm"], tokens, mask, starts)
    x = np.asarray(logits, np.float64)
    x -= x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))  # log-softmax in float64, in numpy
    for k, i in enumerate(rows):
      start, n = spans[i]
      brute.append(sum(logp[k, j, tokens[k, start + j]] for j in range(n)))
  brute = np.array(brute).reshape(4, -1)
  np.testing.assert_allclose(ev.scores["base"], brute, rtol=1e-4, atol=1e-4)
  expected = metrics.ranking_metrics(metrics.target_ranks(brute, ev.target[:4]))
  for key, value in expected.items():
    assert result[f"base/{key}"] == pytest.approx(value)
  # The adapted model reads the hybrid prompt, so its scores differ from the base model's.
  assert not np.allclose(ev.scores["model"], ev.scores["base"])


def test_length_sorted_evaluation_keeps_every_row_result_and_the_loss(setup_tiny):
  """`ilora.eval_sort` evaluates the rows in order of prompt length, so a batch pads to
  prompts of similar length, and reports every per-row result in the split's order: the same
  candidate scores, gates, SASRec ranks, generations and metrics as the split's own order.
  The loss taken from the scores equals the loss of a pass of its own."""
  from ilora_jax import sharding, train_ilora

  config, su, _ = setup_tiny
  trainable, stats = train_ilora.init_trainable(su.parts, su.mesh, sharding.rules(config), 3)
  trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # B starts at 0: adapters that act
  rows, bs = 16, 4
  builder, split = su.parts.builder, su.dataset.val
  evs, results = {}, {}
  for sort in (False, True):
    c = config.copy_and_resolve_references()
    c.ilora.eval_rows, c.ilora.eval_batch_size, c.ilora.eval_sort = rows, bs, sort
    c.ilora.eval_base = False
    evs[sort] = train_ilora.Evaluator(su.parts, c, split, su.gate_kind)
    results[sort] = evs[sort](trainable, stats, su.frozen, False, baselines=True)
  plain, ordered = evs[False], evs[True]
  np.testing.assert_array_equal(plain.order, np.arange(rows))
  assert sorted(ordered.order.tolist()) == list(range(rows))
  # The prompts' real lengths (hybrid form, template 0, as evaluation encodes them) in the
  # evaluated order: each batch's rows are no longer than the next batch's, up to the few
  # tokens by which joined titles tokenize differently from titles alone.
  length = np.array(
    [
      len(
        builder.encode_row(
          split.seq[r, : split.len_seq[r]].tolist(), ordered.cands[r].tolist(), None, 0, True
        )[0]
      )
      for r in range(rows)
    ]
  )
  by_batch = length[ordered.order].reshape(-1, bs)
  assert np.all(by_batch.max(1)[:-1] <= by_batch.min(1)[1:] + 3), by_batch
  padded = lambda order: sum(length[order].reshape(-1, bs).max(1))  # noqa: E731
  assert padded(ordered.order) < padded(plain.order)
  assert results[True].keys() == results[False].keys()
  for key, value in results[False].items():
    assert results[True][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  np.testing.assert_allclose(ordered.scores["model"], plain.scores["model"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ordered.gates, plain.gates, rtol=1e-6, atol=1e-7)
  # With scoring, the loss is the target's score (a candidate) per answer token; a pass of
  # its own over prompt and answer (what runs without scoring) gives the same mean.
  c = config.copy_and_resolve_references()
  c.ilora.eval_rows, c.ilora.eval_batch_size = rows, bs
  c.ilora.eval_score = c.ilora.eval_generate = False
  alone = train_ilora.Evaluator(su.parts, c, split, su.gate_kind)
  result = alone(trainable, stats, su.frozen, False)
  assert "hr@1" not in result and "loss" in alone.timings and "loss" not in ordered.timings
  assert result["loss"] == pytest.approx(results[True]["loss"], rel=1e-5)


def test_evaluation_with_one_prefill_for_both_modes_gives_each_modes_results(setup_tiny):
  """`ilora.eval_shared_prefill` and `ilora.score_packed` (both the default): generation and
  scoring continue from one prefill of each prompt, and each row's candidates run packed in
  one pass, for the adapted model and the base model, with the metrics, scores and generated
  tokens of running each mode on its own with candidates in padded chunks."""
  from ilora_jax import sharding, train_ilora

  config, su, _ = setup_tiny
  trainable, stats = train_ilora.init_trainable(su.parts, su.mesh, sharding.rules(config), 4)
  trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # B starts at 0: adapters that act
  evs, results = {}, {}
  for shared in (False, True):
    c = config.copy_and_resolve_references()
    c.ilora.eval_rows, c.ilora.eval_batch_size, c.ilora.eval_shared_prefill = 8, 4, shared
    c.ilora.score_packed = shared
    c.ilora.eval_base = True
    evs[shared] = train_ilora.Evaluator(su.parts, c, su.dataset.val, su.gate_kind)
    results[shared] = evs[shared](trainable, stats, su.frozen, False, baselines=True)
  alone, shared = evs[False], evs[True]
  assert {"generate", "score", "base_generate", "base_score"} <= alone.timings.keys()
  assert {"generate+score", "base_generate+score"} <= shared.timings.keys()
  assert not {"generate", "score", "base_generate", "base_score"} & shared.timings.keys()
  assert "valid_ratio" in results[True] and "base/hr@1" in results[True]
  assert results[True].keys() == results[False].keys()
  for key, value in results[False].items():
    assert results[True][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  assert shared.generated_tokens == alone.generated_tokens > 0
  for name in ("model", "base"):
    np.testing.assert_allclose(shared.scores[name], alone.scores[name], rtol=1e-5, atol=1e-5)


def test_plain_lora_run_joins_the_comparison_table(pipeline, tmp_path):
  """E = 1 with a constant gate trains end to end; its report compares it with the iLoRA run."""
  ilora_dir, _ = pipeline
  workdir = with_sasrec_of(ilora_dir, tmp_path / "plain")
  proc = run_cli(
    TINY, f"--workdir={workdir}", "--config.stage=ilora", "--config.lora.num_experts=1",
    "--config.lora.gate=constant", "--config.ilora.eval_base=False",
    f"--config.report.compare=ilora={ilora_dir},elsewhere={tmp_path / 'missing'}",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  # The router takes no part in plain LoRA: named apart, out of the trainable total.
  line = next(x for x in proc.stderr.splitlines() if "iLoRA: trainable" in x)
  count = re.match(
    r"iLoRA: trainable lora ([\d,]+), projector ([\d,]+) = ([\d,]+) \(.*\); router ([\d,]+) "
    r"unused \(lora.gate=constant\)$", line
  )  # fmt: skip
  assert count, line
  lora_n, projector_n, total_n, router_n = (int(g.replace(",", "")) for g in count.groups())
  assert total_n == lora_n + projector_n and router_n > 0

  def final_val(records):
    return [r for r in records if r.get("final") and r["split"] == "val" and r["stage"] == "ilora"]

  ours, theirs = final_val(metrics_records(workdir))[-1], final_val(metrics_records(ilora_dir))[0]
  assert ours["candidates"] == theirs["candidates"]  # Same rows, same 20 candidates.
  assert not any(k.startswith("base/") for k in ours)
  summary = open(os.path.join(workdir, "report", "summary.md")).read()
  cells = " | ".join(f"{theirs[k]:.4f}" for k in ("valid_ratio", "hit_ratio@1"))
  assert f"| ilora: iLoRA (E=2, router linear) | {cells} |" in summary
  assert "| plain LoRA (r=4), this run | " in summary
  assert "elsewhere: model | no final val evaluation" in summary
  rows = len(open(os.path.join(workdir, "predictions", "val.jsonl")).readlines()) - 1
  assert f"Paired with ilora on the same {rows} rows: generation hits: " in summary


def test_bench_both_evaluation_modes_on_real_prompts(pipeline, tmp_path):
  """`bench.eval_data` times generation and scoring on the split's prompts (workdir's SASRec)."""
  workdir = copy_of(pipeline[0], tmp_path / "w")
  proc = run_cli(TINY, f"--workdir={workdir}", "--config.bench.eval_data=True",
                 "--config.bench.eval_rows=6", module="ilora_jax.bench")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["eval_data_rows"] == 6 and result["eval_data_split"] == "val"
  for mode in ("generate", "score"):
    seconds = result[f"eval_data_{mode}_s"]
    assert seconds > 0 and result[f"eval_data_{mode}_prompts_per_s"] == pytest.approx(6 / seconds)
  assert 1 <= result["eval_data_generated_tokens_per_row"] <= 8  # tiny: max_new_tokens = 8.
  assert result["eval_data_score_speedup"] == pytest.approx(
    result["eval_data_generate_s"] / result["eval_data_score_s"]
  )
  assert 0 <= result["eval_data_hr@1"] <= 1
  # The contract's train-step keys: null, the table saying why.
  assert all(result[key] is None for key in ("step_s", "tokens_per_s", "compile_s", "mfu"))
  assert re.search(r"^step_s +null: bench.eval_data times the evaluations", proc.stdout, re.M)


def test_bucketed_order_regroups_each_window_by_length():
  from ilora_jax import train_ilora

  rng = np.random.default_rng(0)
  rows, per_step, window = 1000, 32, 8  # 31 steps: windows of 8, 8, 8, 7; 8 rows left over.
  sizes = rng.integers(100, 300, size=rows)
  order = rng.permutation(rows)
  out = train_ilora.bucketed_order(order, sizes, per_step, window, np.random.default_rng(1))
  np.testing.assert_array_equal(np.sort(out), np.arange(rows))  # Each row once.
  np.testing.assert_array_equal(out[31 * per_step :], order[31 * per_step :])  # The tail stays.
  for first in range(0, 31, window):
    span = slice(first * per_step, min(first + window, 31) * per_step)
    np.testing.assert_array_equal(np.sort(out[span]), np.sort(order[span]))  # Same window.
    # Its steps are the window's rows sorted by size, cut in consecutive runs (ties aside).
    steps = sizes[out[span]].reshape(-1, per_step)
    runs = np.sort(sizes[order[span]]).reshape(-1, per_step)
    np.testing.assert_array_equal(np.sort(steps.max(1)), runs.max(1))
    np.testing.assert_array_equal(np.sort(steps.min(1)), runs.min(1))
  longest = lambda o: sizes[o[: 31 * per_step]].reshape(31, per_step).max(1).sum()  # noqa: E731
  assert longest(out) < 0.9 * longest(order)
  same = train_ilora.bucketed_order(order, sizes, per_step, 1, np.random.default_rng(1))
  np.testing.assert_array_equal(same, order)


def test_bucketing_cuts_the_padding_of_real_lastfm_steps(tmp_path):
  """On LastFM's training rows (SmolLM2's tokenizer, the paper's 8 x 16 rows per step), the
  sort key follows the prompts' real lengths and bucketed steps hold less padding."""
  import sys

  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny

  from ilora_jax import train_ilora

  config = tiny.get_config()
  config.data.name = "lastfm"
  config.data.dir = shared_path("data", "lastfm")
  config.data.n_items, config.data.min_len = 0, 3  # The original's (tiny keeps every row).
  config.sasrec.init_from = shared_path("checkpoints", "sasrec", "lastfm.pt")
  config.sasrec.hidden = 64
  config.ilora.train.batch_size, config.ilora.train.grad_accum = 8, 16
  su = train_ilora.setup(config, str(tmp_path))
  parts, train, per_step = su.parts, su.dataset.train, su.micro * su.accum
  steps = 16  # One window of the default `ilora.bucket_window`.
  order, bucketed = (
    train_ilora.epoch_order(parts, config, train, 0, su.seed, per_step, w) for w in (1, steps)
  )
  sizes = train_ilora.prompt_sizes(parts, config, train, 0, su.seed)

  def batches(o):
    for s in range(steps):
      idx = o[s * per_step : (s + 1) * per_step]
      yield idx, train_ilora.train_batch(parts, config, train, idx, 0, s, 100, su.seed, su.accum)

  real, slots, offsets = {}, {}, []
  for name, o in (("plain", order), ("bucketed", bucketed)):
    real[name] = slots[name] = 0
    for idx, b in batches(o):
      lengths = b["attention"].sum(-1)  # [accum, micro]
      if name == "plain":  # A micro-batch shares its template and form: a constant offset.
        offset = lengths - sizes[idx].reshape(lengths.shape)
        offsets.append(offset - offset.mean(1, keepdims=True))
      real[name] += lengths.sum()
      slots[name] += b["attention"].size
  spread = np.concatenate(offsets).std()
  assert spread < 0.25 * sizes.std(), (spread, sizes.std())
  # Measured with this setup: 16% of the slots are padding plain, 8% bucketed.
  plain, ours = real["plain"] / slots["plain"], real["bucketed"] / slots["bucketed"]
  assert ours > plain + 0.05, (plain, ours)
  print(
    f"sizes std {sizes.std():.1f}, offset spread {spread:.2f}; filled {plain:.3f} -> {ours:.3f}"
  )


def test_final_evaluations_use_the_weights_of_the_best_val_epoch(tmp_path, monkeypatch):
  """`ilora.select_by`: three short epochs, the val metric scripted per set of weights so that
  the first epoch's wins. The final val and test evaluations run on those
  weights (recognised by the scripted value), checkpoints/ilora_best keeps them, and
  `evaluate` / `recommend` restore them; the last weights' val is an ordinary epoch record."""
  import sys

  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny

  from ilora_jax import checkpointing, train_ilora, train_sasrec
  from ilora_jax.errors import UserError

  config = tiny.get_config()
  config.data.synthetic.num_users = 10  # 8 training users of short histories: a few steps
  config.data.synthetic.seq_len = 5  # of 8 rows an epoch.
  workdir = str(tmp_path / "w")
  config.stage = "sasrec"  # A SASRec of this data (2 steps): one of other rows is refused.
  train_sasrec.run(config, workdir)
  config.stage = "ilora"
  config.train.epochs = 3
  config.ilora.eval_base = False
  config.ilora.max_new_tokens = 2

  scripted = [0.9, 0.5, 0.7]  # The val metric of the 1st, 2nd and 3rd weights seen.
  seen, calls = [], []  # Fingerprints of the weights, in the order first seen; every call.
  original = train_ilora.Evaluator.__call__

  def fingerprint(trainable):
    return round(float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(
      trainable))), 6)  # fmt: skip

  def scripted_call(self, trainable, stats, frozen, progress, baselines=False, stop=None):
    metrics = original(self, trainable, stats, frozen, progress, baselines, stop)
    key = fingerprint(trainable)
    if key not in seen:
      seen.append(key)
    calls.append((self.split.name, key))
    return dict(metrics, hits_over_total=scripted[seen.index(key)])

  monkeypatch.setattr(train_ilora.Evaluator, "__call__", scripted_call)
  train_ilora.run(config, workdir)

  records = ilora_records(workdir)
  epochs = [r["step"] for r in records if r["split"] == "val" and not r.get("final")]
  per = epochs[0]  # Steps per epoch (the split's size decides it).
  assert epochs == [per, 2 * per, 3 * per]
  assert [r["hits_over_total"] for r in records if r["split"] == "val" and not r.get("final")] == [
    0.9, 0.5, 0.7]  # fmt: skip
  finals = {r["split"]: r for r in records if r.get("final")}
  assert set(finals) == {"val", "test"}
  for r in finals.values():
    assert (r["step"], r["selected_step"], r["selected_by"]) == (3 * per, per, "hits_over_total")
  assert finals["val"]["hits_over_total"] == 0.9  # Evaluated on the first epoch's weights.
  first = seen[0]
  assert calls[-2:] == [("val", first), ("test", first)], calls
  with open(os.path.join(workdir, "report", "summary.md")) as f:
    assert f"this run (weights of step {per}, best val hits_over_total)" in f.read()
  best_dir = os.path.join(workdir, "checkpoints", "ilora_best")
  assert sorted(os.listdir(best_dir)) == [str(per)]
  # `evaluate` and `recommend` take the selected weights; "latest" takes the last step's.
  su = train_ilora.setup(config, workdir)
  abstract = checkpointing.abstract_like(su.state)
  state, step, how, by = train_ilora.restore_for_use(workdir, abstract)
  assert (step, by) == (per, "hits_over_total") and "selected by val hits_over_total" in how
  assert fingerprint(state["trainable"]) == first
  state, step, _, by = train_ilora.restore_for_use(workdir, abstract, "latest")
  assert (step, by) == (3 * per, None) and fingerprint(state["trainable"]) == seen[2]
  # A resume that would select by another metric, or select nothing, is refused, naming the
  # one to use, and leaves the run's records as they were.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    before = f.read()
  for other in ("hr@1", ""):
    config.ilora.select_by = other
    with pytest.raises(UserError, match="resume with --config.ilora.select_by='hits_over_total'"):
      train_ilora.run(config, workdir)
  config.ilora.select_by = "auto"  # Nor on other val evaluations (prompts, length, modes).
  for key, value, read in (("eval_template", -1, 0), ("max_new_tokens", 3, 2),
                           ("eval_generate", False, True)):  # fmt: skip
    config.ilora[key] = value
    with pytest.raises(UserError) as raised:
      train_ilora.run(config, workdir)
    assert re.fullmatch(
      rf"this run's val evaluations were made with ilora.{key}={read}, this config's with "
      rf"{value}: resume with --config.ilora.{key}={read} \(the epochs before step \d+ were "
      r"compared on them; stage=evaluate may use others\)",
      str(raised.value),
    ), raised.value
    config.ilora[key] = read
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read() == before
  # Killed right after the first epoch's weights were kept, before that step's own checkpoint:
  # the resume replays the epoch, finds its val value kept already, and ends as the
  # uninterrupted run did.
  config.checkpoint.every_steps, config.checkpoint.async_save = 1, False
  killed = with_sasrec_of(workdir, tmp_path / "killed")

  class Killed(BaseException):  # Not an Exception: no handler of the run sees it, as a SIGKILL.
    pass

  save = checkpointing.StageCheckpoints.save
  dying = []

  def save_then_die(self, at, state, meta):
    save(self, at, state, meta)
    if self.stage == train_ilora.BEST:
      dying.append(self)
      raise Killed

  monkeypatch.setattr(checkpointing.StageCheckpoints, "save", save_then_die)
  with pytest.raises(Killed):
    train_ilora.run(config, killed)
  monkeypatch.setattr(checkpointing.StageCheckpoints, "save", save)
  assert dying[0]._closed  # The run's exit closed the selected weights' folder all the same.
  assert sorted(os.listdir(os.path.join(killed, "checkpoints", "ilora_best"))) == [str(per)]
  assert complete_steps(killed)[-1] == per - 1  # The epoch end's own was never written.
  train_ilora.run(config, killed)
  assert ilora_records(killed) == records
  assert sorted(os.listdir(os.path.join(killed, "checkpoints", "ilora_best"))) == [str(per)]
  # The weights a final record holds are plotted and logged at their own step, once.
  from ilora_jax import report

  assert report._of_earlier_weights(finals["val"])
  assert not report._of_earlier_weights({"step": 4, "selected_step": 4})


def test_better_follows_the_direction_of_each_metric():
  from ilora_jax import train_ilora

  assert train_ilora.better("hr@1", 0.3, None) and train_ilora.better("hr@1", 0.3, 0.2)
  assert not train_ilora.better("hr@1", 0.2, 0.2)  # A tie keeps the earlier weights.
  assert train_ilora.better("loss", 1.0, 2.0) and not train_ilora.better("loss", 2.0, 1.0)
  assert not train_ilora.better("loss", float("nan"), None)


def test_select_by_names_a_metric_the_evaluation_produces():
  import sys

  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny

  from ilora_jax import configuration
  from ilora_jax.errors import UserError

  config = tiny.get_config()
  assert configuration.selection_metric(config) == "hits_over_total"  # "auto", generation on
  config.ilora.eval_generate = False
  assert configuration.selection_metric(config) == "hr@1"
  config.ilora.eval_score = False
  assert configuration.selection_metric(config) == "loss"
  configuration.validate(config)
  for value, fragment in (("hits_over_total", "needs ilora.eval_generate=True"),
                          ("mrr", "needs ilora.eval_score=True"),
                          ("ndcg@10", "is not one of")):  # fmt: skip
    config.ilora.select_by = value
    with pytest.raises(UserError, match=f"config.ilora.select_by='?{value}'? .*{fragment}"):
      configuration.validate(config)
  config.ilora.select_by = ""
  assert configuration.selection_metric(config) == ""


def test_predictions_file_takes_numpy_and_non_finite_metrics(tmp_path):
  """The head line is JSON for any metric value a record takes (numpy scalars, NaN)."""
  import types

  from ilora_jax import train_ilora

  evaluator = types.SimpleNamespace(fingerprint="abc", rows=[{"row": 3, "hit": True}])
  metrics = {"hr@1": np.float32(0.25), "loss": float("nan"), "rows": np.int64(1)}
  train_ilora.write_predictions(str(tmp_path), "val", evaluator, metrics)
  with open(tmp_path / "predictions" / "val.jsonl") as f:
    head, row = [json.loads(line) for line in f]
  assert head == {"split": "val", "candidates": "abc", "rows": 1,
                  "metrics": {"hr@1": 0.25, "loss": "nan", "rows": 1}}  # fmt: skip
  assert row == {"row": 3, "hit": True}
