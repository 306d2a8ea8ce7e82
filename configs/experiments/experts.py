"""Grid (c): 1, 2, 4 and 8 experts at equal total rank r = 8.

python -m ilora_jax.experiments --grid=configs/experiments/experts.py --workdir=W
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(arg=""):
  c = common.grid(
    arg,
    "Grid (c): number of experts at equal total rank",
    "Total rank 8 split over E experts (rank 8 / E each), gated by the router; E = 1 is plain "
    "LoRA.",
  )
  c.variants = (
    "e1: lora.num_experts=1 lora.gate=constant",
    "e2: lora.num_experts=2 lora.gate=router",
    "e4: lora.num_experts=4 lora.gate=router",
    "e8: lora.num_experts=8 lora.gate=router",
  )
  c.reference = "e1"
  return c
