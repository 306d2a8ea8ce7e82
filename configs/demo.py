"""The embedded default: MovieLens-100K built on the fly, SmolLM2-135M as the LLM.

Runs on a fresh machine with nothing but the packages installed: SASRec first (5 epochs),
then 12 iLoRA updates, then the final evaluations of 16 val and 16 test rows (generation and
candidate scoring, with SASRec and the base LLM without adapters beside them), and the
report. On 2 CPU cores that took 6 to 10 minutes (the README audit of 2026-12-07: 5 min 58 s
for its plain-LoRA variant alone on the machine, 9 min 47 s for this one beside other work).
python -m ilora_jax.main --config=configs/demo.py --workdir=runs/demo
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import movielens  # noqa: E402


def get_config():
  c = movielens.get_config()
  c.stage = "pipeline"  # SASRec, then iLoRA on top of it.
  c.data.dir = ""  # "" = <workdir>/data/movielens, built there from MovieLens-100K.
  c.data.build = "movielens100k"  # Build the LLaRA split when its files are missing.
  c.llm.dtype = c.llm.param_dtype = "float32"  # CPU: float32 is faster than emulated bf16.
  c.llm.name = "smollm2-135m"  # The real Llama-architecture model shipped as GGUF.
  c.sasrec.train.epochs = 5  # A quick but real SASRec.
  c.ilora.train.batch_size = 4  # CPU-sized: 4 prompts per update ...
  c.ilora.train.grad_accum = 1
  c.ilora.train.steps = 12  # ... for a dozen updates (the paper-scale run is configs/movielens.py).
  c.ilora.eval_rows = 16  # Val and test rows evaluated at the end.
  c.ilora.eval_batch_size = 8
  c.ilora.max_new_tokens = 32
  return c
