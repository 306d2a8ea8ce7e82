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
  c.data.min_len = 1  # Every synthetic row (histories of 1 item up), as before min_len applied.
  c.sasrec.hidden = 16
  c.sasrec.train.epochs = 2
  c.sasrec.train.batch_size = 32
  c.sasrec.train.lr = 5e-3
  c.llm.dtype = c.llm.param_dtype = "float32"  # CPU: float32 is faster than emulated bf16.
  c.llm.name = "tiny"  # Random 2-layer Llama with a real tokenizer.
  c.ilora.train.batch_size = 4  # Micro-batch.
  c.ilora.train.grad_accum = 2  # Two micro-batches per update.
  c.ilora.train.steps = 6  # A few updates: the point is the plumbing.
  c.ilora.train.lr = 1e-3
  c.ilora.pad_multiple = 64  # Its prompts (224-320 tokens) in 2 lengths, not 4: fewer compiles.
  c.ilora.eval_rows = 8  # Rows of val/test generated.
  c.ilora.eval_batch_size = 4
  c.ilora.max_new_tokens = 8
  c.lora.rank = 4  # Total rank 4: two experts of rank 2.
  c.lora.num_experts = 2
  c.router.kind = "linear"
  c.sasrec.train.log_every_steps = 5
  c.checkpoint.every_steps = 10
  c.checkpoint.async_save = False
  c.eval.batch_size = 32
  c.progress = False
  return c
