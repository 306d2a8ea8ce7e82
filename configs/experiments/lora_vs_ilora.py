r"""Grid (a): plain LoRA (one adapter, E = 1) against iLoRA (E = 4 experts mixed per user) at
equal total rank r = 8, plus the same four experts with the gating removed (uniform).

  python -m ilora_jax.experiments --grid=configs/experiments/lora_vs_ilora.py --workdir=W
  python -m ilora_jax.experiments --grid=configs/experiments/lora_vs_ilora.py:movielens \
      --grid.extra="data.dir=/path/to/movielens" --workdir=W   # GPU
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(arg=""):
  c = common.grid(
    arg,
    "Grid (a): plain LoRA vs iLoRA at equal total rank",
    "The paper's main claim: one shared LoRA (E = 1, rank 8) against iLoRA (4 experts of "
    "rank 2, gate from the SASRec user vector through the router) and the same experts "
    "averaged with a uniform gate.",
  )
  c.variants = (
    "lora: lora.num_experts=1 lora.gate=constant",
    "ilora: lora.num_experts=4 lora.gate=router",
    "uniform: lora.num_experts=4 lora.gate=uniform",
  )
  return c
