"""The embedded default: MovieLens-100K built on the fly, SmolLM2-135M as the LLM.

Runs on a fresh machine with nothing but the packages installed:
python -m ilora_jax.main --config=configs/demo.py --workdir=runs/demo
(until the iLoRA stage lands, the demo trains and evaluates the SASRec stage).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import movielens  # noqa: E402


def get_config():
  c = movielens.get_config()
  c.data.dir = ""  # "" = <workdir>/data/movielens, built there from MovieLens-100K.
  c.data.build = "movielens100k"  # Build the LLaRA split when its files are missing.
  c.llm.name = "smollm2-135m"  # The real Llama-architecture model shipped as GGUF.
  c.sasrec.train.epochs = 10  # A quick but real SASRec.
  c.stage = "sasrec"
  return c
