"""How checkpoint write and read failures are put into words: the exception chain walked once
(cycles included), the file-system reason found wherever it sits in the chain."""

import errno
import os

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
