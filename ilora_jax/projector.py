"""Projector: SASRec item embeddings -> LLM input embeddings (Linear, GELU, Linear)."""

from __future__ import annotations

import flax.linen as nn


class Projector(nn.Module):
  """[..., sasrec_hidden] -> [..., d_model]."""

  d_model: int

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.d_model, name="fc1")(x)  # [..., d_model]
    x = nn.gelu(x, approximate=False)
    return nn.Dense(self.d_model, name="fc2")(x)  # [..., d_model]
