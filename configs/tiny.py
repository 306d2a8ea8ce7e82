"""Tiny synthetic run for tests: seconds on a CPU.

python -m ilora_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402


def get_config():
  c = base.get_config()
  c.data.name = "synthetic"
  c.data.n_items = 60  # Must equal data.synthetic.num_items.
  c.data.synthetic.num_users = 200
  c.sasrec.hidden = 16
  c.sasrec.train.epochs = 2
  c.sasrec.train.batch_size = 32
  c.sasrec.train.lr = 5e-3
  c.llm.name = "tiny"
  c.train.log_every_steps = 5
  c.checkpoint.every_steps = 10
  c.checkpoint.async_save = False
  c.eval.batch_size = 32
  c.progress = False
  return c
