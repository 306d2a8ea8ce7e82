"""Projector: SASRec item embeddings -> LLM input embeddings (Linear, GELU, Linear)."""

from __future__ import annotations

import flax.linen as nn

from ilora_jax.router import torch_dense


class Projector(nn.Module):
  """[..., sasrec_hidden] -> [..., d_model], initialised as the original's torch layers
  (uniform weights and biases within 1 / sqrt(fan_in))."""

  d_model: int

  @nn.compact
  def __call__(self, x):
    x = torch_dense(self.d_model, x.shape[-1], "fc1")(x)  # [..., d_model]
    x = nn.gelu(x, approximate=False)
    return torch_dense(self.d_model, self.d_model, "fc2")(x)  # [..., d_model]
