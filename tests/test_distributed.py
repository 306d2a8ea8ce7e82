"""`ilora_jax.distributed` in process: which configs start a cluster, what reaches
`jax.distributed.initialize`, the watchdog's line, the cross-process config and data checks
(the collective replaced by a stand-in) and the wait for the coordinator's port (a local
socket). The multi-process runs themselves are in test_cli, test_interrupts, test_ilora_mesh."""

import errno
import os
import socket
import threading
import time

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from ml_collections import config_dict

from ilora_jax import distributed
from ilora_jax.errors import EXIT_USER_ERROR, UserError


def _config(**distributed_settings):
  """A config with configs/base.py's distributed defaults, `distributed_settings` applied."""
  dc = dict(auto=False, coordinator="", num_processes=1, process_id=0, cpu_collectives="gloo",
            timeout_s=300)  # fmt: skip
  dc.update(distributed_settings)
  return config_dict.ConfigDict({"distributed": dc, "train": {"learning_rate": 1e-3}})


def test_a_cluster_is_wanted_with_a_coordinator_or_auto_only():
  assert distributed.wanted(_config()) is False
  assert distributed.wanted(_config(coordinator="h0:1234", num_processes=2)) is True
  assert distributed.wanted(_config(auto=True)) is True
  assert distributed.wanted(_config(auto=True, coordinator="h0:1234")) is True


class _Timer:
  """threading.Timer's stand-in: records the watchdog and whether it was started, cancelled."""

  made: list = []

  def __init__(self, interval, function, args=()):
    self.interval, self.function, self.args = interval, function, args
    self.daemon = self.started = self.cancelled = False
    _Timer.made.append(self)

  def start(self):
    self.started = True

  def cancel(self):
    self.cancelled = True


@pytest.fixture
def cluster(monkeypatch):
  """The calls `initialize` makes, in order, with JAX's side replaced by recorders."""
  calls = []
  _Timer.made = []
  # A join marks the process as one of a cluster, whose error exits then end it at once
  # (`errors._exit`): the worker running these tests must not stay marked.
  monkeypatch.setattr(distributed, "JOINED", False)
  monkeypatch.setattr(threading, "Timer", _Timer)
  monkeypatch.setattr(jax.config, "update", lambda *a: calls.append(("config", *a)))
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(("join", kw)))
  monkeypatch.setattr(distributed, "_wait_for_coordinator", lambda *a: calls.append(("wait", *a)))
  monkeypatch.setattr(distributed, "_check_port_free", lambda *a: calls.append(("port", *a)))
  return calls


_NO_NOTIFIER = ("config", "jax_enable_preemption_service", False)


def test_a_single_process_run_joins_nothing(cluster):
  distributed.initialize(_config())
  assert cluster == [] and _Timer.made == []


def test_process_0_joins_with_its_settings_and_a_watchdog(cluster):
  """Process 0 is the coordinator's server: nothing to wait for. JAX's own timeout is 30 s
  past the watchdog's (commit 155cbaa), which is cancelled once the cluster has formed."""
  config = _config(coordinator="127.0.0.1:1234", num_processes=2, process_id=0, timeout_s=7)
  distributed.initialize(config)
  assert cluster == [
    ("config", "jax_cpu_collectives_implementation", "gloo"),
    ("port", "127.0.0.1:1234"),
    _NO_NOTIFIER,
    ("join", dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0,
                  initialization_timeout=7 + 30)),
  ]  # fmt: skip
  (watchdog,) = _Timer.made
  assert watchdog.interval == 7.0 and watchdog.daemon and watchdog.started
  assert watchdog.cancelled
  assert watchdog.function == distributed._not_joined
  assert watchdog.args == ("127.0.0.1:1234", config.distributed)


def test_other_processes_wait_for_the_coordinators_port_first(cluster):
  config = _config(coordinator="h0:99", num_processes=3, process_id=2, timeout_s=5,
                   cpu_collectives="")  # fmt: skip
  distributed.initialize(config)
  assert cluster == [
    ("wait", "h0:99", 5.0),
    _NO_NOTIFIER,
    ("join", dict(coordinator_address="h0:99", num_processes=3, process_id=2,
                  initialization_timeout=35)),
  ]  # fmt: skip


def test_auto_lets_jax_find_the_cluster(cluster):
  distributed.initialize(_config(auto=True, cpu_collectives="mpi"))
  assert cluster == [
    ("config", "jax_cpu_collectives_implementation", "mpi"),
    _NO_NOTIFIER,
    ("join", {"initialization_timeout": 300 + 30}),
  ]
  assert _Timer.made[0].args[0] == "the environment (TPU, Slurm or Open MPI)"


@pytest.mark.parametrize("num_processes, process_id", [(2, 2), (2, -1), (0, 0), (3, 5)])
def test_a_process_id_outside_the_cluster_is_refused(cluster, num_processes, process_id):
  config = _config(coordinator="h0:1", num_processes=num_processes, process_id=process_id)
  with pytest.raises(UserError) as info:
    distributed.initialize(config)
  assert "num_processes must be >= 1 and process_id in [0, num_processes)" in str(info.value)
  assert f"got num_processes={num_processes}, process_id={process_id}" in str(info.value)
  assert cluster == []


def test_an_invalid_distributed_setting_is_refused_before_joining(cluster):
  with pytest.raises(UserError, match="timeout_s=0 must be at least 1 second"):
    distributed.initialize(_config(coordinator="h0:1", num_processes=2, timeout_s=0))
  assert cluster == []


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_a_failed_join_is_one_line_and_the_watchdog_stops(cluster, monkeypatch, error):
  def fail(**kwargs):
    raise error("Barrier timed out\n  native frames follow")

  monkeypatch.setattr(jax.distributed, "initialize", fail)
  with pytest.raises(UserError) as info:
    distributed.initialize(_config(coordinator="h0:1", num_processes=2))
  assert str(info.value) == "cannot join the cluster via h0:1: Barrier timed out"
  assert info.value.__cause__ is None and info.value.__suppress_context__
  assert _Timer.made[0].cancelled
  with pytest.raises(UserError) as info:  # JAX's words alone named no way out (the audit).
    distributed.initialize(_config(auto=True))
  assert str(info.value) == (
    "cannot join the cluster via the environment (TPU, Slurm or Open MPI): Barrier timed out; "
    "elsewhere give distributed.coordinator, num_processes and process_id instead of "
    "distributed.auto"
  )


def test_another_failure_to_join_is_not_passed_off_as_the_users(cluster, monkeypatch):
  def fail(**kwargs):
    raise TypeError("a bug")

  monkeypatch.setattr(jax.distributed, "initialize", fail)
  with pytest.raises(TypeError, match="a bug"):
    distributed.initialize(_config(coordinator="h0:1", num_processes=2))
  assert _Timer.made[0].cancelled


class _Exit(Exception):
  pass


@pytest.mark.parametrize(
  "settings, where, start",
  [
    (dict(coordinator="h0:12", num_processes=3, timeout_s=2.5), "h0:12",
     "start all 3 processes with the same settings (process_id 0 to 2)"),
    (dict(auto=True, timeout_s=300), "the environment (TPU, Slurm or Open MPI)",
     "start every host's process"),
  ],
)  # fmt: skip
def test_the_watchdog_ends_the_process_with_one_line(monkeypatch, capsys, settings, where, start):
  def exit_(code):
    raise _Exit(code)

  monkeypatch.setattr(os, "_exit", exit_)
  dc = _config(**settings).distributed
  with pytest.raises(_Exit) as info:
    distributed._not_joined(where, dc)
  assert info.value.args == (EXIT_USER_ERROR,) and EXIT_USER_ERROR == 2
  timeout = "2.5" if dc.timeout_s == 2.5 else "300"  # Written as given, no trailing ".0".
  assert capsys.readouterr().err == (
    f"error: the cluster via {where} did not form within config.distributed.timeout_s="
    f"{timeout} s: {start} or raise the timeout\n"
  )


def _processes(monkeypatch, arrays_of_others):
  """This process as process 0 of 1 + len(arrays_of_others), the others' gathered arrays given;
  returns the list of the arrays this process contributed."""
  mine = []

  def allgather(x):
    x = np.asarray(x)
    mine.append(x)
    return np.stack([x, *arrays_of_others])

  monkeypatch.setattr(jax, "process_count", lambda: 1 + len(arrays_of_others))
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  return mine


def _gathered(digest: bytes):
  """What a process contributes for `digest`: its first 8 bytes as two uint32."""
  return np.frombuffer(digest[:8], np.uint32)


def test_a_single_process_computes_and_gathers_nothing(monkeypatch):
  def never(*args):
    raise AssertionError("called")

  monkeypatch.setattr(jax, "process_count", lambda: 1)
  monkeypatch.setattr(multihost_utils, "process_allgather", never)
  distributed.check_same_data(never, "/data")
  distributed.check_same_config(_config(coordinator="h0:1", num_processes=1), "w")


def _config_digest(monkeypatch, config, workdir="w"):
  """The array `check_same_config` contributes for `config` and `workdir` (gathered twice: no
  mismatch)."""
  mine = []

  def allgather(x):
    mine.append(np.asarray(x))
    return np.stack([x, x])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  distributed.check_same_config(config, workdir)
  (array,) = mine
  return array


def test_processes_started_with_another_config_or_workdir_are_named(monkeypatch):
  """Only distributed.process_id may differ; another learning rate, coordinator or workdir
  (each process would save its own checkpoints: a deadlock at the first) is refused, each
  differing process named, in order."""
  base = dict(coordinator="h0:1", num_processes=4)
  same = [_config_digest(monkeypatch, _config(**base, process_id=i)) for i in range(4)]
  assert all((a == same[0]).all() for a in same)
  # 8 bytes for each of the config's parts, the rest of it and the workdir.
  assert same[0].dtype == np.uint32 and same[0].shape == (2 * (len(distributed._PARTS) + 2),)
  other_lr = _config(**base, process_id=2)
  other_lr.train.learning_rate = 2e-3
  other_coordinator = _config(**dict(base, coordinator="h1:1"), process_id=3)
  other = [_config_digest(monkeypatch, c) for c in (other_lr, other_coordinator)]
  other.append(_config_digest(monkeypatch, _config(**base, process_id=1), "w2"))
  assert not any((o == same[0]).all() for o in other)
  _processes(monkeypatch, [same[1], same[2], same[3]])
  distributed.check_same_config(_config(**base), "w")  # All alike but their ids: no error.
  _processes(monkeypatch, [other[2], other[0], other[1]])
  with pytest.raises(UserError) as info:
    distributed.check_same_config(_config(**base), "w")
  assert str(info.value) == (
    "process(es) 1, 2, 3 were started with another config or --workdir than process 0's "
    "(other train, distributed, --workdir): start every process with the same command (only "
    "--config.distributed.process_id differs)"
  )
  # Every process compares with process 0, not with its neighbour or the last one.
  _processes(monkeypatch, [other[0], other[0]])
  with pytest.raises(UserError, match=r"^process\(es\) 1, 2 were"):
    distributed.check_same_config(_config(**base), "w")


def test_processes_that_read_other_data_are_named_by_the_first_8_bytes(monkeypatch):
  own = bytes(range(32))
  mine = _processes(monkeypatch, [_gathered(own), _gathered(own[:7] + b"\xff" + own[8:])])
  with pytest.raises(UserError) as info:
    distributed.check_same_data(lambda: own, "/data/ml-1m")
  assert str(info.value) == (
    "process(es) 2 read other data than process 0's from /data/ml-1m: give every host the "
    "same files"
  )
  assert (mine[0] == _gathered(own)).all()
  # Bytes past the eighth are not compared (the digest's first 8 are gathered).
  _processes(monkeypatch, [_gathered(own[:8] + b"\xff" * 24)])
  distributed.check_same_data(lambda: own, "/data/ml-1m")
  # The first 4 bytes alike, the next 4 not: a difference.
  _processes(monkeypatch, [_gathered(own[:4] + b"\xff" * 28)])
  with pytest.raises(UserError, match=r"^process\(es\) 1 read other data"):
    distributed.check_same_data(lambda: own, "/data/ml-1m")


def _refused_port() -> int:
  """A local port that nobody listens on (bound, then closed)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")])
def test_process_0_refuses_a_coordinator_port_another_program_holds(family, host):
  """gRPC's failed bind ended process 0 with a segmentation fault; a port free again (its
  listener closed) is taken."""
  try:
    holder = socket.socket(family)
    holder.bind((host, 0))
  except OSError:
    pytest.skip(f"no {family.name} on this host")
  holder.listen()
  port = holder.getsockname()[1]
  with pytest.raises(UserError) as info:
    distributed._check_port_free(f"localhost:{port}")
  assert str(info.value) == (
    f"process 0 cannot serve the coordinator localhost:{port} on this host: port {port}: "
    f"{os.strerror(errno.EADDRINUSE)} (another program holds it, or a process started before "
    "this one as process_id=0?); give every process another port in "
    "config.distributed.coordinator, and each its own process_id"
  )
  holder.close()
  distributed._check_port_free(f"localhost:{port}")


def test_a_listening_coordinator_is_reached_at_once():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    start = time.monotonic()
    distributed._wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 5.0)
    assert time.monotonic() - start < 1.0


def test_a_coordinator_that_starts_late_is_waited_for():
  """The port refuses connections for 0.8 s (bound, not listening), then listens: the wait
  retries until it does, well within its timeout."""
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    timer = threading.Timer(0.8, server.listen)
    timer.start()
    start = time.monotonic()
    try:
      distributed._wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 10.0)
    finally:
      timer.cancel()
    assert 0.8 <= time.monotonic() - start < 3.0


def test_an_unreachable_coordinator_is_a_user_error_after_the_timeout():
  port = _refused_port()
  start = time.monotonic()
  with pytest.raises(UserError) as info:
    distributed._wait_for_coordinator(f"127.0.0.1:{port}", 2.0)
  elapsed = time.monotonic() - start
  assert 2.0 <= elapsed < 3.5  # The timeout, and a retry's pause at most.
  assert str(info.value) == (  # The timeout as given, no trailing ".0".
    f"cannot reach the coordinator 127.0.0.1:{port} within config.distributed.timeout_s=2 s "
    "(Connection refused); start process 0 or check the address"
  )
  assert info.value.__cause__ is None and info.value.__suppress_context__


def test_an_ipv6_coordinator_in_brackets_is_reached():
  """host:port split at the last colon, the brackets of an IPv6 host taken off."""
  if not socket.has_ipv6:
    pytest.skip("no IPv6")
  with socket.socket(socket.AF_INET6) as server:
    try:
      server.bind(("::1", 0))
    except OSError:
      pytest.skip("no IPv6 loopback")
    server.listen()
    start = time.monotonic()
    distributed._wait_for_coordinator(f"[::1]:{server.getsockname()[1]}", 5.0)
    assert time.monotonic() - start < 1.0


def test_a_coordinator_that_never_answers_is_given_up_on_after_the_timeout(monkeypatch):
  """A host that drops the connection attempts (simulated: each attempt times out at once)
  is retried until the timeout; every attempt has a timeout of its own, so none can hang."""
  attempts = []

  def create_connection(address, timeout=None):
    attempts.append((address, timeout))
    raise TimeoutError("timed out")

  monkeypatch.setattr(socket, "create_connection", create_connection)
  with pytest.raises(UserError) as info:
    distributed._wait_for_coordinator("10.0.0.1:1234", 0.6)
  assert str(info.value) == (
    "cannot reach the coordinator 10.0.0.1:1234 within config.distributed.timeout_s=0.6 s "
    "(timed out); start process 0 or check the address"
  )
  assert len(attempts) >= 2  # Retried before the timeout.
  assert all(a == ("10.0.0.1", 1234) and 0 < t <= 10 for a, t in attempts)
