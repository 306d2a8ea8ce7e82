"""Faults during iLoRA training (kill mid-save, full disk, read-only workdir, non-finite
losses): each trains its own copy of the tiny pipeline's iLoRA stage and compares it with the
shared `pipeline` fixture (conftest.py), which it only reads. The two-process run is in
test_ilora_mesh.py, compared with the same mesh in one process."""

import os

import jax
import numpy as np
import pytest
from conftest import (
  TINY,
  complete_steps,
  ilora_records,
  run_cli,
  run_unshared,
  unshare_works,
  with_sasrec_of,
)


def test_kill_during_save_loses_at_most_one_interval(pipeline, tmp_path):
  """SIGKILL while checkpoint 4 is being written: step 2 stays readable, resume is exact."""
  ref_dir, _ = pipeline
  workdir = with_sasrec_of(ref_dir, tmp_path / "w")
  args = [TINY, f"--workdir={workdir}", "--config.stage=ilora", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.async_save=True"]  # fmt: skip
  killed = run_cli(*args, env={"ILORA_JAX_KILL_DURING_SAVE": "ilora:4"})
  assert killed.returncode == -9, killed.stderr
  leftovers = os.listdir(os.path.join(workdir, "checkpoints", "ilora"))
  assert complete_steps(workdir) == [2], leftovers  # The interrupted save never became a step.
  assert any("tmp" in name for name in leftovers), leftovers  # It was cut mid-write.
  resumed = run_cli(*args)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step 2" in resumed.stderr
  assert ilora_records(workdir) == ilora_records(ref_dir)


def test_full_disk_and_read_only_workdir_keep_the_last_checkpoint(pipeline, tmp_path):
  """Real ENOSPC (a small tmpfs) and EROFS (a read-only bind mount) in a user namespace."""
  import shlex
  import sys

  if not unshare_works(str(tmp_path / "probe")):
    pytest.skip("needs `unshare --user --mount` (user namespaces) to mount a small filesystem")
  ref_dir, _ = pipeline
  workdir = with_sasrec_of(ref_dir, tmp_path / "w")
  ckpt = os.path.join(workdir, "checkpoints", "ilora")
  os.makedirs(ckpt)
  argv = [sys.executable, "-m", "ilora_jax.main", TINY, f"--workdir={workdir}",
          "--config.stage=ilora", "--config.checkpoint.every_steps=2",
          "--config.checkpoint.max_to_keep=3"]  # fmt: skip
  cmd = " ".join(shlex.quote(a) for a in argv)
  logs = {n: str(tmp_path / f"{n}.log") for n in ("full", "ro", "resumed")}
  script = f"""
    mount -t tmpfs -o size=560k tmpfs {ckpt}
    {cmd} 2> {logs["full"]}; echo "full=$?"
    ls {ckpt}
    mount --bind {workdir} {workdir} && mount -o remount,bind,ro {workdir}
    {cmd} 2> {logs["ro"]}; echo "ro=$?"
    umount {workdir}
    mount -o remount,size=64m {ckpt}
    {cmd} 2> {logs["resumed"]}; echo "resumed=$?"
  """
  proc = run_unshared(script, timeout=900, text=True)
  err = {n: open(p).read() for n, p in logs.items()}
  for name in ("full", "ro"):  # Both failed, with a non-zero exit code.
    assert f"{name}=" in proc.stdout and f"{name}=0" not in proc.stdout, proc.stdout + str(err)
  assert "resumed=0" in proc.stdout, err["resumed"]
  for name, fragments in (("full", ["cannot write checkpoint", "No space left on device",
                                    "checkpoint 2 is kept"]),
                          ("ro", ["Read-only file system"])):  # fmt: skip
    lines = [line for line in err[name].splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err[name], err[name]
    assert all(f in lines[0] for f in fragments), lines[0]
  assert "resumed from step 2" in err["resumed"]
  assert ilora_records(workdir) == ilora_records(ref_dir)


def test_persistent_non_finite_losses_stop_without_nan_weights(pipeline, tmp_path):
  """An absurd learning rate: bad updates are skipped and counted, then the run stops clearly."""
  import orbax.checkpoint as ocp
  from conftest import assert_one_line_error

  ref_dir, _ = pipeline
  workdir = with_sasrec_of(ref_dir, tmp_path / "w")
  proc = run_cli(TINY, f"--workdir={workdir}", "--config.stage=ilora",
                 "--config.ilora.train.lr=1e35", "--config.ilora.max_bad_steps=2",
                 "--config.checkpoint.every_steps=1")  # fmt: skip
  assert_one_line_error(proc, "2 optimizer steps in a row had a non-finite loss")
  train = [r for r in ilora_records(workdir) if r["split"] == "train"]
  assert np.isfinite(train[0]["loss"]) and train[-1]["skipped_updates"] >= 1
  steps = complete_steps(workdir)
  assert steps, "no checkpoint was kept"
  saved = ocp.PyTreeCheckpointer().restore(
    os.path.join(workdir, "checkpoints", "ilora", str(steps[-1]), "state")
  )
  leaves = jax.tree.leaves(saved["trainable"]) + jax.tree.leaves(saved["opt_state"])
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_only_a_damaged_checkpoint_gets_the_advice_to_remove_it(tmp_path, caplog):
  import logging

  from ilora_jax import checkpointing, console
  from ilora_jax.errors import UserError

  console.quiet_libraries()
  (tmp_path / "checkpoints" / "ilora" / "7").mkdir(parents=True)  # A step folder left empty.
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "ilora", 2, False)
  assert ckpt.latest_step() == 7
  with caplog.at_level(logging.WARNING):
    with pytest.raises(UserError, match=r"checkpoint 7 in .* is unreadable .*; remove .*ilora/7 "):
      ckpt.restore_meta(7)
  # Orbax's warning about the missing metadata file is not printed before that one line.
  assert not [r for r in caplog.records if "Metadata file" in r.getMessage()], caplog.text
  # A failure that says nothing about the files (memory, say): no advice to delete them.
  error = ckpt._unreadable(7, RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
  assert "cannot restore checkpoint 7" in str(error) and "remove" not in str(error)
  # TensorStore's words for array files cut short (a restore of truncated data files).
  cut = Exception("Encountered error while reading array index (0,): OUT_OF_RANGE")
  assert "remove" in str(ckpt._unreadable(7, cut))
  ckpt.close()


def test_damage_advice_fits_the_folder_and_names_the_array(tmp_path):
  """The advice says what removing the step gives (the checkpoint before it, or a new start;
  for the kept selection, the whole folder), and the reason is TensorStore's own report from
  the error chain, without the object spec Orbax prints."""
  from ilora_jax import checkpointing

  spec = (
    "Encountered error while reading array index: (slice(0, 2, 1),). See full TensorStore "
    "details: <bound method pybind11_detail_function_record.spec of TensorStore({})>."
  )
  cause = ValueError(
    'FAILED_PRECONDITION: Error reading "opt_state.mu.lora_a/0.0" in OCDBT database at local '
    'file "/w/checkpoints/ilora/7/state/": ZSTD_decompressStream() failed: Data corruption '
    "detected; at byte 0"
  )
  top = Exception(spec)
  top.__cause__ = cause
  for n, (stage, steps, advice) in enumerate(
    (
      ("ilora", (3, 7), "; remove {d}/7 to resume from checkpoint 3, or use another --workdir"),
      ("ilora", (7,), "; remove {d}/7 to start the ilora stage anew, or use another --workdir"),
      ("ilora_best", (7,), "; remove {d} to drop the kept selection (evaluations then use the"),
    )
  ):
    folder = tmp_path / str(n) / "checkpoints" / stage
    for step in steps:
      (folder / str(step)).mkdir(parents=True)
    ckpt = checkpointing.StageCheckpoints(str(tmp_path / str(n)), stage, 2, False, read_only=True)
    message = str(ckpt._unreadable(7, top))
    ckpt.close()
    assert message.startswith(
      f"checkpoint 7 in {folder} is unreadable (array opt_state.mu.lora_a/0.0: "
      "ZSTD_decompressStream() failed: Data corruption detected; at byte 0)"
    ), message
    assert advice.format(d=folder) in message, message
  alone = str(ckpt._unreadable(7, Exception(spec)))  # No report behind it: the spec cut off.
  assert "pybind11" not in alone and "error while reading array index" in alone, alone


def test_a_read_only_checkpoint_folder_is_not_created(tmp_path):
  """Evaluate and recommend only restore: a workdir without the stage's checkpoints keeps no
  empty `checkpoints/` folder after their error; training creates it."""
  from ilora_jax import checkpointing

  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "ilora", 2, False, read_only=True)
  assert ckpt.latest_step() is None
  ckpt.close()
  assert os.listdir(tmp_path) == []
  checkpointing.StageCheckpoints(str(tmp_path), "ilora", 2, False).close()
  assert os.path.isdir(tmp_path / "checkpoints" / "ilora")


def test_a_restore_into_other_shapes_names_them_without_orbax_advice(tmp_path):
  import jax
  import numpy as np

  from ilora_jax import checkpointing
  from ilora_jax.errors import UserError

  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "sasrec", 2, False)
  ckpt.save(1, {"w": jax.numpy.zeros((2, 3))}, {"step": 1})
  ckpt.wait()
  other = {"w": jax.ShapeDtypeStruct((4, 3), np.float32, sharding=jax.numpy.zeros(1).sharding)}
  with pytest.raises(UserError) as info:
    ckpt.restore(1, other)
  ckpt.close()
  message = str(info.value)
  assert "does not match this model" in message and "(4, 3)" in message, message
  assert "stored shape: (2, 3)" in message and "strict=False" not in message, message
  assert message.endswith("it was written with other model settings"), message
