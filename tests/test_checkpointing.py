"""How checkpoint write and read failures are put into words: the exception chain walked once
(cycles included), the file-system reason found wherever it sits in the chain."""

import errno
import logging
import os
import shutil
import threading

import pytest

from ilora_jax import checkpointing
from ilora_jax.errors import UserError


def _raised(inner: BaseException, outer: BaseException) -> BaseException:
  try:
    try:
      raise inner
    except BaseException as exc:
      raise outer from exc
  except BaseException as exc:
    return exc


def test_a_write_failure_is_found_anywhere_in_the_chain():
  full = _raised(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), RuntimeError("save failed"))
  assert checkpointing._write_failure(full) == os.strerror(errno.ENOSPC)
  # TensorStore's form: a ValueError whose text holds the errno.
  store = ValueError("RESOURCE_EXHAUSTED: Error writing local file: [os_error_code='30']")
  wrapped = _raised(store, RuntimeError("async save failed"))
  assert checkpointing._write_failure(wrapped) == os.strerror(errno.EROFS)
  assert checkpointing._write_failure(_raised(KeyError("x"), RuntimeError("y"))) is None


def test_a_cyclic_chain_ends():
  a, b = RuntimeError("a"), RuntimeError("b")
  a.__cause__, b.__cause__ = b, a
  assert checkpointing._chain(a) == [a, b]
  assert checkpointing._write_failure(a) is None
  assert checkpointing._reason(a) == "a"


def test_a_read_failure_names_tensorstores_array_and_reason():
  store = ValueError('DATA_LOSS: Error reading "params.dense.kernel": Unexpected end of file')
  exc = _raised(store, RuntimeError("restore failed"))
  assert checkpointing._reason(exc) == "array params.dense.kernel: Unexpected end of file"
  # Without an array's report: the error's own text, without TensorStore's printed specs.
  other = ValueError("NOT_FOUND: no metadata  See full TensorStore details: {'driver': 1}")
  assert checkpointing._reason(other) == "NOT_FOUND: no metadata"


def test_one_sasrec_on_two_backends_is_the_same_sasrec():
  """A SASRec's fingerprint prints its float32 |w| sum to four digits; the same weights summed
  on another backend may round to the neighbouring value, which is no other SASRec. Another
  checkpoint (the tiny pipeline's step 120 against 130: 505.7 against 508.9) is."""
  from ilora_jax.train_ilora import SAME_SETTINGS, same_sasrec

  fp = "3644 weights, |w| sum {}".format
  assert same_sasrec(fp("508.9"), fp("508.8")) and same_sasrec(fp("1.234e+04"), fp("1.235e+04"))
  assert not same_sasrec(fp("508.9"), fp("505.7"))
  assert not same_sasrec(fp("508.9"), "3645 weights, |w| sum 508.9")
  assert not same_sasrec(None, fp("508.9"))
  # The settings comparisons a resume and a restore make take that equality for "sasrec" only.
  saved, current = {"sasrec": fp("508.9"), "lr": 1}, {"sasrec": fp("508.8"), "lr": 1}
  checkpointing.check_same_settings(saved, current, "d", same=SAME_SETTINGS)
  assert checkpointing.setting_diffs(saved, current, ["sasrec", "lr"], SAME_SETTINGS) == []
  with pytest.raises(UserError, match=r"sasrec: checkpoint '3644 weights, \|w\| sum 508.9'"):
    checkpointing.check_same_settings(saved, current, "d")
  other = {"sasrec": fp("505.7"), "lr": 2}
  assert checkpointing.setting_diffs(saved, other, ["sasrec", "lr"], SAME_SETTINGS) == [
    f"sasrec {fp('508.9')!r} vs config {fp('505.7')!r}",
    "lr 1 vs config 2",
  ]
  # A tolerance for one setting is none for another with the same values.
  with pytest.raises(UserError, match="data: checkpoint"):
    checkpointing.check_same_settings(
      {"data": fp("508.9")}, {"data": fp("508.8")}, "d", same=SAME_SETTINGS
    )


def test_an_llm_is_known_by_its_weights_where_a_checkpoint_has_their_fingerprint():
  """A checkpoint with the LLM weights' fingerprint: the model's files under another name
  (a moved folder, a trailing slash) pass and other weights are refused; random presets go by
  their names; a checkpoint of older code (no fingerprint) compares the names strictly."""
  from ilora_jax.checkpointing import UNKNOWN, check_same_settings
  from ilora_jax.train_ilora import same_settings

  def check(saved, current):
    check_same_settings(saved, current, "d", {"llm_weights": UNKNOWN}, same_settings(saved))

  check({"llm": "/a/m", "llm_weights": "f1"}, {"llm": "/b/m/", "llm_weights": "f1"})
  check({"llm": "/a/m", "llm_weights": "f1"}, {"llm": "/a/m", "llm_weights": None})  # Not read.
  with pytest.raises(UserError, match="llm_weights: checkpoint 'f1' vs config 'f2'"):
    check({"llm": "/a/m", "llm_weights": "f1"}, {"llm": "/a/m", "llm_weights": "f2"})
  with pytest.raises(UserError, match="llm: checkpoint 'tiny' vs config 'smollm2-135m-random'"):
    check({"llm": "tiny", "llm_weights": None}, {"llm": "smollm2-135m-random", "llm_weights": None})
  with pytest.raises(UserError, match="llm: checkpoint 'tiny' vs config 'tiny \\(init_std 0.5"):
    check({"llm": "tiny", "llm_weights": None}, {"llm": "tiny (init_std 0.5)", "llm_weights": None})
  with pytest.raises(UserError, match="llm: checkpoint '/a/m' vs config '/b/m'"):
    check({"llm": "/a/m"}, {"llm": "/b/m", "llm_weights": "f1"})  # Older code's checkpoint.
  check({"llm": "/a/m"}, {"llm": "/a/m", "llm_weights": "f1"})


def _fmix_sums(x) -> list[int]:
  """Reference of a checksum and of the fingerprint's sums, written apart from the package:
  per array, two sums mod 2**32 of MurmurHash3's 32-bit finaliser of (bit pattern + flat
  position x seed), in uint64 reduced mod 2**32 at each step."""
  import numpy as np

  unsigned = {4: np.uint32, 2: np.uint16, 1: np.uint8}[x.dtype.itemsize]
  bits = np.asarray(x).reshape(-1).view(unsigned).astype(np.uint64)
  index = np.arange(bits.size, dtype=np.uint64)
  sums = []
  for seed in (0x9E3779B9, 0x7F4A7C15):
    h = (bits + index * np.uint64(seed)) % 2**32
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
      h = ((h ^ (h >> np.uint64(shift))) * np.uint64(factor)) % 2**32
    sums.append(int(np.sum(h ^ (h >> np.uint64(16))) % 2**32))
  return sums


def _weighted_sum(x) -> int:
  """Reference of older checkpoints' checksum: the sum mod 2**32 of the elements' bit
  patterns times 2i + 1 (i the flat position)."""
  import numpy as np

  unsigned = {4: np.uint32, 2: np.uint16, 1: np.uint8}[x.dtype.itemsize]
  bits = np.asarray(x).reshape(-1).view(unsigned).astype(np.uint64)
  weights = 2 * np.arange(bits.size, dtype=np.uint64) + 1
  return int(np.sum((bits * weights) % 2**32) % 2**32)


# Run in a process of two CPU devices (a test process has one): each array's device sums
# (this code's and older code's) and the fingerprint of the arrays, each split over both.
_TWO_DEVICES = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ilora_jax import checkpointing
assert len(jax.devices()) == 2, jax.devices()
stored = np.load(sys.argv[1])
arrays = [stored[k].view(jnp.bfloat16) if k.endswith("bf16") else stored[k] for k in stored.files]
split = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), PartitionSpec("x"))
on = [jax.device_put(x, split) for x in arrays]
assert all(len(y.sharding.device_set) == 2 for y in on)
def summed(kind, y):
  return jax.device_get(checkpointing._device_sums(kind, [y]))[0]
sums = [[int(v) for v in summed(checkpointing.CHECKSUMS, y)] for y in on]
old = [int(summed(checkpointing._OLD_CHECKSUMS, y)) for y in on]
print("RESULT " + json.dumps({"sums": sums, "old": old,
      "fingerprint": checkpointing.fingerprint({k: y for k, y in zip(stored.files, on)})}))
"""


def _on_two_devices(folder, arrays: dict) -> dict:
  """`_TWO_DEVICES` on `arrays` (name -> array whose first axis is even; a bfloat16 one's name
  ends in "bf16"), run in a child process."""
  import json
  import subprocess
  import sys

  import numpy as np
  from conftest import ROOT, xla_flags

  path = os.path.join(folder, "arrays.npz")
  np.savez(path, **{k: x.view(np.uint16) if k.endswith("bf16") else x for k, x in arrays.items()})
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES, path], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])


def test_checksums_match_a_numpy_formula_on_any_sharding(tmp_path):
  """A checkpoint's checksum of an array (`_fmix_sums`, and older code's `_weighted_sum`,
  which restores still verify), whatever the array's dtype, summed on the host or on the
  devices, on one device and split over two (the program a multi-process run sums its shards
  with)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  half = np.asarray(jnp.asarray(rng.normal(size=(8, 3)), jnp.bfloat16))
  arrays = [rng.normal(size=(8, 24)).astype(np.float32), rng.integers(-9, 9, (8, 5), np.int32),
            half, np.float32(2.5), np.array([True, False, True])]  # fmt: skip
  old = checkpointing._OLD_CHECKSUMS
  for x in arrays:
    want = f"{x.dtype}:" + "".join(f"{v:08x}" for v in _fmix_sums(np.asarray(x)))
    want_old = f"{x.dtype}:{_weighted_sum(np.asarray(x)):08x}"
    assert checkpointing.checksums({"a": jnp.asarray(x)}) == {"['a']": want}  # On the host.
    assert checkpointing.checksums({"a": jnp.asarray(x)}, old) == {"['a']": want_old}
    y = jnp.asarray(x)  # On one device.
    sums = jax.device_get(checkpointing._device_sums(checkpointing.CHECKSUMS, [y]))[0]
    assert [int(v) for v in sums] == _fmix_sums(np.asarray(x))
    assert int(jax.device_get(checkpointing._device_sums(old, [y]))[0]) == _weighted_sum(x)
  split = {"f32": arrays[0], "i32": arrays[1], "bf16": arrays[2]}
  two = _on_two_devices(tmp_path, split)
  assert two["sums"] == [_fmix_sums(x) for x in split.values()]
  assert two["old"] == [_weighted_sum(x) for x in split.values()]
  one = arrays[0].copy()
  one[3, 7] = np.nextafter(one[3, 7], np.float32(9))  # One bit of one element.
  assert _fmix_sums(one) != _fmix_sums(arrays[0])
  assert _weighted_sum(one) != _weighted_sum(arrays[0])


def test_arrays_that_are_not_what_was_saved_are_refused(tmp_path):
  """A checkpoint whose arrays decode but are not those saved (another step's state in its
  folder; a disk that changed bytes in a file that still decodes, as an audit did, alike)
  is refused by its checksums, naming the array, also where older code's checksum could not
  see the change (a matrix's row doubled) and by older code's checksums where the meta holds
  those; so is one without its state's _METADATA (Orbax reports it as another tree
  structure). Checkpoints without checksums restore."""
  import json
  import shutil

  import jax.numpy as jnp
  import numpy as np
  import optax

  m = np.random.default_rng(0).normal(size=(2, 4096)).astype(np.float32)
  state = {"w": jnp.linspace(0, 1, 64), "b": jnp.arange(10, dtype=jnp.int32), "m": jnp.asarray(m)}
  state["opt"] = optax.adam(1e-3).init({"w": state["w"]})  # Tuples of named tuples.
  doubled = {**state, "m": state["m"].at[1].multiply(2.0)}
  old = checkpointing._OLD_CHECKSUMS
  assert checkpointing.checksums(doubled, old) == checkpointing.checksums(state, old)
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 9, False)
  for step, tree in ((3, state), (4, {**state, "w": state["w"].at[5].set(2.0)}), (5, state),
                     (6, doubled), (7, state)):  # fmt: skip
    ckpt.save(step, tree, {"step": step})
  ckpt.close()
  folder = tmp_path / "checkpoints" / "x"
  for into, source in ((3, 4), (5, 6)):
    shutil.rmtree(folder / str(into) / "state")
    shutil.copytree(folder / str(source) / "state", folder / str(into) / "state")
  (folder / "7" / "state" / "_METADATA").unlink()
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 9, False, read_only=True)
  target = checkpointing.abstract_like(state)

  def changed(step: int, name: str) -> str:
    return (rf"checkpoint {step} in .* is unreadable \(array \['{name}'\] does not hold what "
            rf"was saved: its checksum differs\); remove .*x/{step} to")  # fmt: skip

  with pytest.raises(UserError, match=changed(3, "w")):
    ckpt.restore(3, target)
  with pytest.raises(UserError, match=changed(5, "m")):
    ckpt.restore(5, target)
  with pytest.raises(UserError, match=r"unreadable \(.*7/state/_METADATA is missing\); remove "
                     r".*x/7 to resume from checkpoint 6"):  # fmt: skip
    ckpt.restore(7, target)
  restored, meta = ckpt.restore(4, target)
  assert float(restored["w"][5]) == 2.0 and meta["step"] == 4
  # Older code recorded weighted sums under another key: verified as such.
  path = folder / "3" / "meta" / "metadata"
  path.write_text(json.dumps({"step": 3, old: checkpointing.checksums(state, old)}))
  with pytest.raises(UserError, match=changed(3, "w")):
    ckpt.restore(3, target)
  # Still older code wrote no checksums: the same arrays in step 3 then restore as they are.
  path.write_text(json.dumps({"step": 3}))
  restored, _ = ckpt.restore(3, target)
  assert float(restored["w"][5]) == 2.0


def test_fingerprint_matches_a_numpy_formula_and_sees_what_the_checksum_misses(tmp_path):
  """`fingerprint` (the LLM weights' digest a run records): per array, the sums of
  `_fmix_sums`, the same on any sharding. A matrix doubled, which older checkpoints'
  weighted checksum cannot see here (it adds 2**23 to each float32 pattern of a 4096-element
  block), changes it and the checksums of this code; so does one bit."""
  import hashlib
  import json

  import jax.numpy as jnp
  import numpy as np

  def reference(tree: dict) -> str:
    described = [[f"['{name}']", str(x.dtype), list(x.shape), _fmix_sums(x)]
                 for name, x in tree.items()]  # fmt: skip
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]

  rng = np.random.default_rng(1)
  tree = {"a": rng.normal(size=(2, 4096)).astype(np.float32),
          "bf16": np.asarray(jnp.asarray(rng.normal(size=(8, 3)), jnp.bfloat16))}  # fmt: skip
  want = reference(tree)
  assert checkpointing.fingerprint({k: jnp.asarray(v) for k, v in tree.items()}) == want
  assert _on_two_devices(tmp_path, tree)["fingerprint"] == want  # Each array split over two.
  doubled = {**tree, "a": tree["a"].copy()}
  doubled["a"][1] *= 2
  old = checkpointing._OLD_CHECKSUMS
  assert checkpointing.checksums(doubled, old) == checkpointing.checksums(tree, old)  # Blind.
  assert checkpointing.checksums(doubled) != checkpointing.checksums(tree)
  assert checkpointing.fingerprint(doubled) == reference(doubled) != want
  one = {**tree, "a": tree["a"].copy()}
  one["a"][0, 7] = np.nextafter(one["a"][0, 7], np.float32(9))
  assert checkpointing.fingerprint(one) != want


def _small_state():
  import jax.numpy as jnp

  return {"w": jnp.linspace(0, 1, 12, dtype=jnp.float32), "b": jnp.arange(5, dtype=jnp.int32),
          "m": jnp.ones((2, 3), jnp.float32)}  # fmt: skip


def test_only_the_newest_checkpoints_are_kept_and_the_latest_is_resumed(tmp_path):
  """`max_to_keep` steps stay on disk, the newest; a resume (a reopened folder) finds the last
  step saved and restores that step's arrays and record, also after asynchronous saves."""
  import numpy as np

  state = _small_state()
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 2, True)
  for step in (10, 20, 30, 40, 50):
    ckpt.save(step, {**state, "b": state["b"] + step}, {"step": step})
  ckpt.close()
  folder = tmp_path / "checkpoints" / "x"
  assert sorted(int(p) for p in os.listdir(folder) if p.isdigit()) == [40, 50]
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 2, False, read_only=True)
  assert ckpt.latest_step() == 50
  restored, meta = ckpt.restore(50, checkpointing.abstract_like(state))
  assert meta["step"] == 50 and np.array_equal(restored["b"], np.arange(5) + 50)
  assert ckpt.restore_meta(40)["step"] == 40
  ckpt.close()


def test_a_save_left_unfinished_is_removed_when_the_stage_is_opened_to_write(tmp_path):
  """A kill mid-save leaves Orbax's temporary folder (`<step>.orbax-checkpoint-tmp-<time>`).
  Left in place, the step saved again there was never deleted by `max_to_keep`; opened to
  write (a resume), the folder is removed first, while a read-only open leaves it."""
  folder = tmp_path / "checkpoints" / "x"
  state = _small_state()
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 2, False)
  ckpt.save(10, state, {"step": 10})
  ckpt.close()
  (folder / "20.orbax-checkpoint-tmp-1765000000000001").mkdir()
  checkpointing.StageCheckpoints(str(tmp_path), "x", 2, False, read_only=True).close()
  assert sorted(os.listdir(folder)) == ["10", "20.orbax-checkpoint-tmp-1765000000000001"]
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 2, False)
  for step in (20, 30, 40):
    ckpt.save(step, state, {"step": step})
  ckpt.close()
  assert sorted(os.listdir(folder)) == ["30", "40"]


def test_a_restore_compares_only_the_arrays_recorded_with_their_dtype(tmp_path):
  """Arrays restored into another dtype (Orbax casts them) or missing from the record are not
  compared, so such a restore is not refused; where several arrays changed, the first is named
  and the others counted."""
  import json
  import shutil

  import jax
  import jax.numpy as jnp
  import numpy as np

  state = _small_state()
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 9, False)
  ckpt.save(1, state, {"step": 1})
  ckpt.save(2, {**state, "m": state["m"] * 2, "w": state["w"][::-1]}, {"step": 2})
  ckpt.save(3, state, {"step": 3})
  ckpt.close()
  folder = tmp_path / "checkpoints" / "x"
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 9, False, read_only=True)
  target = checkpointing.abstract_like(state)
  half = {**target, "w": jax.ShapeDtypeStruct((12,), jnp.bfloat16, sharding=target["w"].sharding)}
  restored, _ = ckpt.restore(1, half)
  assert restored["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(restored["w"], np.float32), state["w"], rtol=1e-2)
  # Step 3's record without the entry of `m`, and step 2's arrays in step 3's folder: `w`
  # differs, `m` (not recorded) is not compared.
  path = folder / "3" / "meta" / "metadata"
  meta = json.loads(path.read_text())
  del meta[checkpointing.CHECKSUMS]["['m']"]
  path.write_text(json.dumps(meta))
  shutil.rmtree(folder / "3" / "state")
  shutil.copytree(folder / "2" / "state", folder / "3" / "state")
  with pytest.raises(UserError, match=r"\(array \['w'\] does not hold what was saved"):
    ckpt.restore(3, target)
  del meta[checkpointing.CHECKSUMS]["['w']"]
  path.write_text(json.dumps(meta))
  restored, _ = ckpt.restore(3, target)
  assert np.array_equal(restored["m"], state["m"] * 2)
  # Both changed arrays recorded (step 2's arrays in step 1's folder): one named, one counted.
  shutil.rmtree(folder / "1" / "state")
  shutil.copytree(folder / "2" / "state", folder / "1" / "state")
  with pytest.raises(UserError, match=r"\(array \['m'\] and 1 more does not hold what was saved"):
    ckpt.restore(1, target)
  ckpt.close()


def test_a_record_read_back_and_saved_again_holds_the_new_arrays_checksums(tmp_path):
  """A meta that carries a restored record's checksums (a run that saves what it restored,
  updated), this code's or older code's, is saved with the checksums of the arrays saved with
  it: that checkpoint restores."""
  import numpy as np

  state = _small_state()
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 9, False)
  ckpt.save(1, state, {"step": 1})
  _, meta = ckpt.restore(1, checkpointing.abstract_like(state))
  assert checkpointing.CHECKSUMS in meta
  moved = {**state, "w": state["w"] + 1}
  ckpt.save(2, moved, {**meta, "step": 2})
  restored, meta = ckpt.restore(2, checkpointing.abstract_like(state))
  assert meta["step"] == 2 and np.array_equal(restored["w"], moved["w"])
  # A record of older code (its weighted sums, of the state before) carried along: this
  # code's checksums, of the arrays saved, are the ones verified.
  older = checkpointing.checksums(state, checkpointing._OLD_CHECKSUMS)
  ckpt.save(3, moved, {checkpointing._OLD_CHECKSUMS: older, "step": 3})
  restored, meta = ckpt.restore(3, checkpointing.abstract_like(state))
  assert meta["step"] == 3 and np.array_equal(restored["w"], moved["w"])
  ckpt.close()


def test_damaged_files_of_a_step_are_named_with_the_advice_to_remove_it(tmp_path):
  """Real damage, each in its own step: a cut, an empty or a missing JSON record, array files
  cut short, gone or with a flipped byte (two steps). Each is 'unreadable' with the advice to
  remove that step and resume from the one before it, its reason without TensorStore's
  printed specs."""
  import glob

  import jax.numpy as jnp

  state = {"w": _small_state()["w"]}
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 9, False)
  for step in range(1, 9):  # Step 8's other values: TensorStore words its damage otherwise.
    ckpt.save(step, state if step < 8 else {"w": jnp.arange(12.0)}, {"step": step})
  ckpt.close()
  folder = tmp_path / "checkpoints" / "x"

  def data(step):
    found = glob.glob(str(folder / str(step) / "state" / "**" / "d" / "*"), recursive=True)
    assert found
    return found

  (folder / "2" / "meta" / "metadata").write_text('{"step": 2, "arr')
  (folder / "3" / "meta" / "metadata").write_text("")
  (folder / "4" / "meta" / "metadata").unlink()
  for path in data(5):
    os.truncate(path, 10)
  for path in data(6):
    os.remove(path)
  for path in data(7) + data(8):
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0xFF]))
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 9, False, read_only=True)
  target = checkpointing.abstract_like(state)
  for step in range(2, 9):
    advice = rf"is unreadable \(.+\); remove .*x/{step} to resume from checkpoint {step - 1},"
    with pytest.raises(UserError, match=advice) as raised:
      ckpt.restore(step, target)
    assert "tensorstore_spec" not in str(raised.value)  # The reason, not TensorStore's specs.
    if step < 5:
      with pytest.raises(UserError, match=advice):
        ckpt.restore_meta(step)
  # A restore drops asyncio's reports of Orbax's other failed reads from then on, so its
  # error stays one line (tests/test_interrupts.py has the filter's own test).
  logger = logging.getLogger("asyncio")
  saved = list(logger.filters)
  try:
    logger.filters[:] = [f for f in saved if getattr(f, "kind", None) != "read"]
    with pytest.raises(UserError):
      ckpt.restore(5, target)
    assert [f.kind for f in logger.filters if getattr(f, "kind", None) == "read"] == ["read"]
  finally:
    logger.filters[:] = saved
  ckpt.close()


def test_a_link_to_nothing_in_a_step_is_damage_not_a_denial(tmp_path):
  """`os.access` fails on a link to nothing as on a file this user may not read: the step's
  record replaced by one is damage to remove (it was 'permission denied')."""
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 3, False)
  for step in (1, 2):
    ckpt.save(step, _small_state(), {"step": step})
  ckpt.close()
  record = tmp_path / "checkpoints" / "x" / "2" / "meta" / "metadata"
  record.unlink()
  record.symlink_to(tmp_path / "gone")
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 3, False, read_only=True)
  with pytest.raises(
    UserError, match=r"is unreadable \(.+\); remove .*x/2 to resume from checkpoint 1,"
  ):
    ckpt.restore_meta(2)
  ckpt.close()


def test_a_checkpoint_this_user_may_not_read_is_no_damage_to_remove(tmp_path, monkeypatch):
  """A step (or folder) whose permissions deny this process was called unreadable with the
  advice to remove the kept selection, and a folder it could not open was one it "cannot
  create" (for a restore, which creates nothing): now the path denied, and no advice to
  remove what is readable once its permissions are fixed. Root reads everything, so the
  denial is `os.access`'s answer here, beside a real failure (a missing index)."""
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x_best", 2, False)
  ckpt.save(6, _small_state(), {"step": 6})
  ckpt.close()
  folder = tmp_path / "checkpoints" / "x_best"
  state = folder / "6" / "state"
  shutil.rmtree(state)  # What a restore finds in a folder it may not list: nothing.
  state.mkdir()
  access = os.access
  denied = {str(state)}
  monkeypatch.setattr(
    os, "access", lambda path, mode: str(path) not in denied and access(path, mode)
  )
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x_best", 2, False, read_only=True)
  with pytest.raises(UserError) as raised:
    ckpt.restore(6, checkpointing.abstract_like(_small_state()))
  assert str(raised.value) == f"cannot read checkpoint 6 in {folder}: permission denied on {state}"
  denied.clear()  # Allowed: the empty folder is damage, with the advice to remove it.
  with pytest.raises(UserError, match=r"is unreadable \(.*\); remove .*x_best to drop the kept"):
    ckpt.restore(6, checkpointing.abstract_like(_small_state()))
  ckpt.close()

  def refused(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", refused)
  denied.add(str(folder))
  for read_only in (True, False):
    with pytest.raises(UserError) as raised:
      checkpointing.StageCheckpoints(str(tmp_path), "x_best", 2, False, read_only=read_only)
    assert str(raised.value) == (
      f"cannot read checkpoint folder {folder}: permission denied on {folder}"
    )
  denied.clear()
  with pytest.raises(UserError, match=f"^cannot open checkpoint folder {folder}: "):
    checkpointing.StageCheckpoints(str(tmp_path), "x_best", 2, False, read_only=True)
  with pytest.raises(UserError, match="^cannot create checkpoint folder .*new: "):
    checkpointing.StageCheckpoints(str(tmp_path), "new", 2, False)


def test_a_failed_write_names_its_step_and_the_checkpoint_kept(tmp_path):
  """A write that fails (a full disk: TensorStore's errno in its text, or an OSError), when
  started or reported later by the background writer, is one UserError naming that step and
  the last complete checkpoint; another error is not called a write failure."""
  import errno

  state = _small_state()
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 9, False)
  ckpt.save(3, state, {"step": 3})
  manager = ckpt._manager
  real_save, real_wait = manager.save, manager.wait_until_finished
  full = ValueError("RESOURCE_EXHAUSTED: Error writing local file [os_error_code='28']")
  try:
    manager.save = lambda *a, **k: None  # Started; its failure comes with the wait.
    manager.wait_until_finished = lambda: _raise(_raised(full, RuntimeError("save failed")))
    ckpt.save(4, state, {"step": 4})
    nospace = os.strerror(errno.ENOSPC)
    with pytest.raises(UserError, match=rf"cannot write checkpoint 4 to .*x: {nospace}; the "
                       r"last complete checkpoint 3 is kept; free space"):  # fmt: skip
      ckpt.wait()
    manager.wait_until_finished = real_wait
    manager.save = lambda *a, **k: _raise(OSError(errno.EROFS, os.strerror(errno.EROFS)))
    with pytest.raises(UserError, match=rf"cannot write checkpoint 5 .*: {os.strerror(30)};"):
      ckpt.save(5, state, {"step": 5})
    gone = os.strerror(errno.ENOENT)
    manager.save = lambda *a, **k: _raise(FileNotFoundError(errno.ENOENT, gone))
    with pytest.raises(UserError, match=rf"cannot write checkpoint 6 .*: {gone}; the last complete "
                       r"checkpoint 3 is kept; see that nothing else removes files there and "
                       r"re-run to resume$"):  # fmt: skip
      ckpt.save(6, state, {"step": 6})
    manager.save = lambda *a, **k: _raise(KeyError("a bug"))
    with pytest.raises(KeyError):
      ckpt.save(6, state, {"step": 6})
  finally:
    manager.save, manager.wait_until_finished = real_save, real_wait
  ckpt.close()
  first = checkpointing.StageCheckpoints(str(tmp_path), "y", 9, False)  # None kept yet.
  first._manager.save = lambda *a, **k: _raise(OSError(errno.ENOSPC, nospace))
  with pytest.raises(UserError) as info:
    first.save(1, state, {"step": 1})
  assert str(info.value) == (
    f"cannot write checkpoint 1 to {first.directory}: {nospace}; no earlier checkpoint "
    "exists; free space or fix permissions and re-run to resume"
  )
  first.close()


def _one_async_save(workdir):
  """Orbax's asynchronous checkpointer module, a StageCheckpoints in `workdir` with step 1
  saved asynchronously and waited for, and the module's commit function (a test's hook);
  skips where this Orbax commits elsewhere."""
  async_checkpointer = pytest.importorskip("orbax.checkpoint._src.checkpointers.async_checkpointer")
  if not hasattr(async_checkpointer, "_background_wait_for_commit_futures"):
    pytest.skip("this Orbax commits its saves elsewhere (written for Orbax 0.12)")
  ckpt = checkpointing.StageCheckpoints(str(workdir), "x", 9, True)
  ckpt.save(1, _small_state(), {"step": 1})
  ckpt.wait()
  return async_checkpointer, ckpt, async_checkpointer._background_wait_for_commit_futures


def _removed_line(ckpt, step: int) -> str:
  return (
    f"cannot write checkpoint {step}: its folder {ckpt.directory} was removed or moved while "
    "the run used it; re-run to start the stage again (after removing what is left there)"
  )


def test_a_folder_removed_during_an_asynchronous_save_is_one_line_saying_so(tmp_path, monkeypatch):
  """The workdir removed (`rm -rf`) while a save was being written: Orbax's errors then vary
  with the moment (a TensorStore NOT_FOUND, "No ArrayMetadata found", "Directory not empty",
  seen by hand), once as an "unexpected ValueError"; each is one line saying what happened,
  also where the writers, still running, made the folder anew (the folder opened is gone)."""
  async_checkpointer, ckpt, commit = _one_async_save(tmp_path / "w")
  workdir = tmp_path / "w"

  def removed_first(*args, **kwargs):  # In the background thread, before the commit.
    while workdir.exists():  # Until gone: the writers, still running, add files meanwhile.
      shutil.rmtree(workdir, ignore_errors=True)
    return commit(*args, **kwargs)

  monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", removed_first)
  ckpt.save(2, _small_state(), {"step": 2})
  with pytest.raises(UserError) as info:
    ckpt.close()
  assert str(info.value) == _removed_line(ckpt, 2)


def test_a_save_failing_before_its_removal_shows_is_worded_as_the_removal(tmp_path, monkeypatch):
  """A clean-clone CI run caught a writer failing for a file gone (ENOENT) while `rm -rf`
  was still emptying the folder, which itself went a moment later: that is the removal, not
  a write failure. Reproduced here: the save's commit raises ENOENT and the folder goes
  0.3 s later."""
  async_checkpointer, ckpt, commit = _one_async_save(tmp_path / "w")
  workdir = tmp_path / "w"

  def removed_after_failing(*args, **kwargs):
    commit(*args, **kwargs)
    threading.Timer(0.3, shutil.rmtree, (workdir,)).start()
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(ckpt.directory))

  monkeypatch.setattr(
    async_checkpointer, "_background_wait_for_commit_futures", removed_after_failing
  )
  ckpt.save(2, _small_state(), {"step": 2})
  with pytest.raises(UserError) as info:
    ckpt.close()
  assert str(info.value) == _removed_line(ckpt, 2)


def test_a_save_that_finished_in_a_folder_made_anew_is_no_checkpoint(tmp_path, monkeypatch):
  """A loaded test run saw the save under way finish without an error after its folder was
  removed: its writers had made the path anew. The wait that ends the stage says so, as a
  failed save would; a save finished before the folder went is no news."""
  async_checkpointer, ckpt, commit = _one_async_save(tmp_path / "w")

  def made_anew_after(*args, **kwargs):  # The save completes; then its folder is another.
    done = commit(*args, **kwargs)
    os.rename(ckpt.directory, tmp_path / "elsewhere")
    os.makedirs(ckpt.directory)
    return done

  monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", made_anew_after)
  ckpt.save(2, _small_state(), {"step": 2})
  with pytest.raises(UserError, match=r"^cannot write checkpoint 2: its folder .* was removed or "):
    ckpt.close()
  ckpt.close()  # Closed all the same: a second call does nothing.
  monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", commit)
  again = checkpointing.StageCheckpoints(str(tmp_path / "v"), "x", 9, True)
  again.save(1, _small_state(), {"step": 1})
  again.wait()
  shutil.rmtree(tmp_path / "v")
  again.close()  # Nothing under way when it went.


def test_a_folder_removed_between_saves_stops_the_next_one(tmp_path):
  """Orbax, left to itself, makes the folder anew and saves on: the run would go on and its
  workdir would hold only what came after (seen by hand, the SASRec stage ending with exit
  code 0). The next save says the folder was removed, and writes nothing; so does one after
  the folder was made anew at its path, or moved away."""
  said = r"^cannot write checkpoint 2: its folder .*/checkpoints/x was removed or moved while "
  for how in ("removed", "made anew", "moved"):
    workdir = tmp_path / how
    ckpt = checkpointing.StageCheckpoints(str(workdir), "x", 9, False)
    ckpt.save(1, _small_state(), {"step": 1})
    ckpt.wait()
    if how == "moved":
      os.rename(workdir, tmp_path / "elsewhere")
    else:
      shutil.rmtree(workdir)
    if how == "made anew":
      os.makedirs(ckpt.directory)
    with pytest.raises(UserError, match=said):
      ckpt.save(2, _small_state(), {"step": 2})
    if how == "made anew":  # Nothing written into the new folder.
      assert os.listdir(ckpt.directory) == []
    else:
      assert not workdir.exists(), how
    ckpt.close()


def test_a_folder_this_process_could_not_hold_is_never_called_removed(tmp_path, monkeypatch):
  """A process that could not open the folder (not yet seen on another host's network file
  system, say) must not stop a healthy multi-process run: it saves as Orbax does."""
  monkeypatch.setattr(checkpointing, "_hold", lambda directory: None)
  ckpt = checkpointing.StageCheckpoints(str(tmp_path / "w"), "x", 9, False)
  ckpt.save(1, _small_state(), {"step": 1})
  ckpt.wait()
  shutil.rmtree(tmp_path / "w")
  ckpt.save(2, _small_state(), {"step": 2})
  ckpt.close()
  assert os.listdir(ckpt.directory) == ["2"]


def test_a_save_failing_under_another_error_is_one_warning(tmp_path, capsys):
  """The run stops on an error while a save is under way, and that save fails too: the
  error raised is the one that stopped the run, and a warning line says the save failed
  (Orbax's own logged tracebacks of it are dropped, `console.quiet_libraries`)."""
  import errno

  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 9, False)
  manager = ckpt._manager
  real_save, real_wait = manager.save, manager.wait_until_finished
  full = ValueError("RESOURCE_EXHAUSTED: Error writing local file [os_error_code='28']")
  try:
    manager.save = lambda *a, **k: None  # Started; its failure comes with the wait.
    manager.wait_until_finished = lambda: _raise(full)
    with pytest.raises(KeyError, match="the error that stopped it"):
      with ckpt.guard():
        ckpt.save(4, _small_state(), {"step": 4})
        raise KeyError("the error that stopped it")
  finally:
    manager.save, manager.wait_until_finished = real_save, real_wait
  assert capsys.readouterr().err == (
    f"warning: the save of checkpoint 4 under way failed too: {os.strerror(errno.ENOSPC)}\n"
  )
  try:  # The error that stops the run is that save's own: its wait adds no line.
    manager.wait_until_finished = lambda: _raise(full)
    with pytest.raises(UserError, match="cannot write checkpoint 4"):
      with ckpt.guard():
        ckpt.wait()
  finally:
    manager.wait_until_finished = real_wait
  assert capsys.readouterr().err == ""
  ckpt.close()


def _raise(exc: BaseException):
  raise exc


def test_settings_compare_as_their_json_record_and_name_every_difference(tmp_path):
  """A run's settings (tuples, integer keys) equal the same settings read back from its
  checkpoint's JSON record; a setting added later compares its older default as JSON holds
  it; every setting that differs, also one only the checkpoint or only the config has, is
  named; `setting_diffs` names those of its keys both hold, in the order given."""
  from ilora_jax.checkpointing import check_same_settings, jsonable, setting_diffs

  settings = {"dims": (4, 8), "by_id": {3: "a"}, "lr": 0.1}
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 2, False)
  ckpt.save(1, _small_state(), {"settings": jsonable(settings)})
  ckpt.close()
  ckpt = checkpointing.StageCheckpoints(str(tmp_path), "x", 2, False, read_only=True)
  saved = ckpt.restore_meta(1)["settings"]
  ckpt.close()
  assert saved == {"dims": [4, 8], "by_id": {"3": "a"}, "lr": 0.1}
  check_same_settings(saved, jsonable(settings), "d")
  current = jsonable({**settings, "shape": (2, 2)})  # Recorded only by newer code.
  check_same_settings(saved, current, "d", added={"shape": (2, 2)})
  with pytest.raises(UserError, match=r"shape: checkpoint \[2, 3\] vs config \[2, 2\]\)"):
    check_same_settings(saved, current, "d", added={"shape": (2, 3)})
  with pytest.raises(UserError) as info:
    check_same_settings({**saved, "gone": 1, "lr": 0.2}, {**current, "new": 2}, "d")
  assert str(info.value) == (
    "the checkpoint in d was made with other settings (gone: checkpoint 1 vs config None; "
    "lr: checkpoint 0.2 vs config 0.1; new: checkpoint None vs config 2; shape: checkpoint None "
    "vs config [2, 2]); use another --workdir or restore the settings"
  )
  # A group of settings is named by its settings that differ, to any depth; a group with its
  # own comparison (`same`) is named whole.
  lora = {"rank": 8, "dropout": 0.1, "alpha": 16.0, "gate": {"kind": "mlp", "hidden": 4}}
  other = {**lora, "dropout": 0.3, "gate": {"kind": "mlp", "hidden": 8}, "new": 1}
  with pytest.raises(UserError) as info:
    check_same_settings({"lora": lora, "lr": 0.1}, {"lora": other, "lr": 0.1}, "d")
  assert str(info.value) == (
    "the checkpoint in d was made with other settings (lora.dropout: checkpoint 0.1 vs config "
    "0.3; lora.gate.hidden: checkpoint 4 vs config 8; lora.new: checkpoint None vs config 1); "
    "use another --workdir or restore the settings"
  )
  with pytest.raises(UserError, match=r"\(lora: checkpoint \{'rank': 8, .* vs config \{"):
    check_same_settings({"lora": lora}, {"lora": other}, "d", same={"lora": lambda a, b: False})
  check_same_settings({"lora": lora}, {"lora": other}, "d", same={"lora": lambda a, b: True})
  mine, theirs = {"a": 1, "b": 2, "c": 3}, {"a": 2, "c": 4, "d": 5}
  assert setting_diffs(mine, theirs, ["d", "c", "b", "a"]) == ["c 3 vs config 4", "a 1 vs config 2"]


def test_a_fingerprint_tells_apart_what_is_not_the_same_weights():
  """`fingerprint` is of the arrays bit for bit with their paths, dtypes and shapes: two
  elements swapped, the same bits as another dtype, the same elements in another shape or
  the arrays under each other's or other names are other weights; equal arrays (copies) are not."""
  import jax.numpy as jnp
  import numpy as np

  a = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
  b = np.full((3, 4), 7.0, np.float32)
  base = checkpointing.fingerprint({"a": jnp.asarray(a), "b": jnp.asarray(b)})
  assert checkpointing.fingerprint({"a": jnp.asarray(a.copy()), "b": jnp.asarray(b)}) == base
  swapped = a.copy()
  swapped[0, 1], swapped[2, 3] = a[2, 3], a[0, 1]
  others = [
    {"a": swapped, "b": b},
    {"a": a.view(np.int32), "b": b},
    {"a": a.reshape(4, 3), "b": b},
    {"a": b, "b": a},
    {"a": a, "c": b},
  ]
  for other in others:
    assert checkpointing.fingerprint({k: jnp.asarray(v) for k, v in other.items()}) != base
