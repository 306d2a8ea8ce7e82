"""Grid (b): router kinds (the original's resnet1d, linear, mlp) and a uniform gate.

python -m ilora_jax.experiments --grid=configs/experiments/routers.py --workdir=W
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(arg=""):
  c = common.grid(
    arg,
    "Grid (b): router kinds and a uniform gate",
    "iLoRA with 4 experts of rank 2; only the gate differs: the original's 1-D ResNet router, "
    "a linear router, an MLP router, and a uniform gate (gating removed).",
  )
  c.variants = (
    "resnet1d: lora.num_experts=4 lora.gate=router router.kind=resnet1d",
    "linear: lora.num_experts=4 lora.gate=router router.kind=linear",
    "mlp: lora.num_experts=4 lora.gate=router router.kind=mlp",
    "uniform: lora.num_experts=4 lora.gate=uniform",
  )
  c.reference = "uniform"
  return c
