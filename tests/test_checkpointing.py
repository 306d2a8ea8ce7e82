"""How checkpoint write and read failures are put into words: the exception chain walked once
(cycles included), the file-system reason found wherever it sits in the chain."""

import errno
import os

from ilora_jax import checkpointing


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
