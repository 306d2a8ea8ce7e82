"""Grid (d): synthetic users in K behaviour groups whose next-item rules conflict.

Each group walks the catalogue in its own order, so the item after a given item depends on
the user's group. One shared adapter must serve every group at once (negative transfer);
iLoRA's router sees the SASRec user vector and can give each group its own expert mix.
Metrics are reported per group, with the gate weights per group.

  python -m ilora_jax.experiments --grid=configs/experiments/negative_transfer.py --workdir=W
  python -m ilora_jax.experiments --grid=configs/experiments/negative_transfer.py:1 --workdir=W1
      # control: one group, no conflict (K is the argument; 4 by default)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(arg=""):
  arg = arg or "4"
  if not arg.isdigit() or int(arg) < 1:
    raise ValueError(f"the argument is K, the number of user groups (1, 2, ...), not {arg!r}")
  groups = int(arg)
  c = common.grid(
    "tiny",
    f"Grid (d): negative transfer, K = {groups} conflicting user groups",
    f"Synthetic data: {groups} user group(s), each with its own item order (next-item rule). "
    "Plain LoRA (E = 1, rank 8) against iLoRA (4 experts of rank 2, router gate) and the "
    "same experts with a uniform gate.",
  )
  c.overrides = tuple(o for o in c.overrides if not o.startswith("data.synthetic.num_groups="))
  c.overrides += (f"data.synthetic.num_groups={groups}",)
  c.variants = (
    "lora: lora.num_experts=1 lora.gate=constant",
    "ilora: lora.num_experts=4 lora.gate=router",
    "uniform: lora.num_experts=4 lora.gate=uniform",
  )
  return c
