"""Human-readable progress messages on stderr (process 0 only).

Library logs (Orbax, absl) are kept at WARNING so these lines stay readable.
"""

from __future__ import annotations

import sys

import jax


def info(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
  import logging as pylogging

  from absl import logging

  logging.set_verbosity(logging.WARNING)
  for name in ("absl", "orbax", "jax"):
    pylogging.getLogger(name).setLevel(pylogging.WARNING)
