"""Routers: the SASRec user vector [batch, hidden] -> dense softmax gate over E experts.

Kinds (REFERENCE.md section 6):
  * 'resnet1d' (the original's "share" router): the user vector read as a 1-channel signal of
    length `hidden`; Conv1d 1 -> 16 (kernel 3, padding 1), BatchNorm, ReLU; three stages of
    three basic residual blocks at 16 / 32 / 64 channels, stride 2 on the first block of
    stages 2 and 3; global average pool; Dense(64 -> E); softmax.
  * 'linear': Dense(hidden -> E); softmax.
  * 'mlp': Dense(hidden -> mlp_hidden), GELU, Dense(-> E); softmax.

Every router is called as `router.apply(variables, user, train=...)`. The ResNet keeps its
BatchNorm statistics in the 'batch_stats' collection: pass them in `variables` and, when
training, apply with `mutable=['batch_stats']` to get the updated statistics back; in eval
(`train=False`) the stored statistics are used and not changed. The other kinds have no
'batch_stats'. No top-k, no noise, no load-balancing loss: the gate is a dense softmax.

Convolutions are bias-free (each is followed by BatchNorm); BatchNorm is torch's
(`TorchBatchNorm`: momentum 0.1, epsilon 1e-5, the running variance unbiased). Kernels use
torch's default init (uniform, bound 1 / sqrt(fan_in)). Flax convolutions are
channels-last: activations are [batch, length, channels] here.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ilora_jax.errors import UserError

Array = jax.Array

KINDS = ("resnet1d", "linear", "mlp")
STAGE_CHANNELS = (16, 32, 64)
BLOCKS_PER_STAGE = 3

# torch's default for nn.Linear / nn.Conv1d weights: kaiming_uniform_(a=sqrt(5)), i.e. uniform
# with bound 1 / sqrt(fan_in) (flax computes fan_in = in_channels * kernel_size for convs).
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
  """torch's default bias init: uniform in [-1 / sqrt(fan_in), 1 / sqrt(fan_in)]."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_dense(features: int, fan_in: int, name: str) -> nn.Dense:
  """A Dense layer initialised as torch's nn.Linear of `fan_in` inputs."""
  return nn.Dense(
    features, kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(fan_in), name=name
  )


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
  pad = (kernel - 1) // 2
  return nn.Conv(
    features,
    (kernel,),
    strides=(stride,),
    padding=((pad, pad),),
    use_bias=False,
    kernel_init=_torch_kernel_init,
    name=name,
  )


class TorchBatchNorm(nn.Module):
  """torch's BatchNorm1d over the last axis (channels-last), in Flax's variable layout
  (`params` scale and bias, `batch_stats` mean and var, as `nn.BatchNorm` names them).

  Training normalises with the batch's biased variance and updates the running variance with
  the unbiased one, as torch does; `nn.BatchNorm` updates it with the biased one, a factor
  (n - 1) / n on the new term (n = rows x length: 128 x 64 at LastFM's batch), which the
  original's evaluation gates never saw.
  """

  train: bool
  momentum: float = 0.9  # Of the running statistics kept per update (torch's 0.1 taken).
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    mean_ra = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    var_ra = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    if self.train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)  # Biased: what the batch is normalised by.
      n = x.size // features
      if not self.is_initializing():
        m = self.momentum
        mean_ra.value = m * mean_ra.value + (1 - m) * mean
        var_ra.value = m * var_ra.value + (1 - m) * var * (n / max(n - 1, 1))
    else:
      mean, var = mean_ra.value, var_ra.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def _batch_norm(train: bool, name: str) -> TorchBatchNorm:
  return TorchBatchNorm(train, name=name)


class BasicBlock1d(nn.Module):
  """conv3-BN-ReLU-conv3-BN plus shortcut, then ReLU.

  Attributes:
    features: output channels.
    stride: stride of the first convolution (and of the shortcut).
    shortcut: 'conv' (1x1 conv + BN when the shape changes, else identity) or 'pad'
      (parameter-free: subsample by the stride and zero-pad the new channels).
  """

  features: int
  stride: int = 1
  shortcut: str = "conv"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """x: [batch, length, in_channels] -> [batch, length / stride, features]."""
    y = _conv(self.features, 3, self.stride, "conv1")(x)
    y = nn.relu(_batch_norm(train, "bn1")(y))
    y = _conv(self.features, 3, 1, "conv2")(y)
    y = _batch_norm(train, "bn2")(y)  # [batch, length / stride, features]
    if self.stride != 1 or x.shape[-1] != self.features:
      if self.shortcut == "conv":
        x = _conv(self.features, 1, self.stride, "shortcut_conv")(x)
        x = _batch_norm(train, "shortcut_bn")(x)
      else:
        x = x[:, :: self.stride, :]
        extra = self.features - x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(y + x)


class ResNet1dRouter(nn.Module):
  """The original's "share" router: a small 1-D ResNet over the user vector.

  Attributes:
    num_experts: E.
    shortcut: 'conv' (default) or 'pad', see `BasicBlock1d`.
  """

  num_experts: int
  shortcut: str = "conv"

  @nn.compact
  def __call__(self, user: Array, train: bool = False) -> Array:
    """user: [batch, hidden] -> gate [batch, E] (float32 softmax)."""
    x = user.astype(jnp.float32)[:, :, None]  # [batch, hidden, 1]: 1 channel of length hidden
    x = _conv(STAGE_CHANNELS[0], 3, 1, "stem_conv")(x)
    x = nn.relu(_batch_norm(train, "stem_bn")(x))  # [batch, hidden, 16]
    for stage, features in enumerate(STAGE_CHANNELS):
      for block in range(BLOCKS_PER_STAGE):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock1d(features, stride, self.shortcut, name=f"stage{stage}_block{block}")(
          x, train
        )
    pooled = jnp.mean(x, axis=1)  # [batch, 64]
    logits = torch_dense(self.num_experts, pooled.shape[-1], "head")(pooled)  # [batch, E]
    return jax.nn.softmax(logits, axis=-1)


class LinearRouter(nn.Module):
  """Dense(hidden -> E) + softmax. `train` is accepted for a uniform interface."""

  num_experts: int

  @nn.compact
  def __call__(self, user: Array, train: bool = False) -> Array:
    """user: [batch, hidden] -> gate [batch, E]."""
    user = user.astype(jnp.float32)
    logits = torch_dense(self.num_experts, user.shape[-1], "head")(user)  # [batch, E]
    return jax.nn.softmax(logits, axis=-1)


class MLPRouter(nn.Module):
  """Dense(hidden -> mlp_hidden), GELU (exact), Dense(-> E), softmax."""

  num_experts: int
  hidden: int = 64

  @nn.compact
  def __call__(self, user: Array, train: bool = False) -> Array:
    """user: [batch, hidden] -> gate [batch, E]."""
    user = user.astype(jnp.float32)
    h = torch_dense(self.hidden, user.shape[-1], "hidden")(user)  # [batch, mlp_hidden]
    h = nn.gelu(h, approximate=False)
    logits = torch_dense(self.num_experts, self.hidden, "head")(h)  # [batch, E]
    return jax.nn.softmax(logits, axis=-1)


def make_router(kind: str, num_experts: int, hidden: int = 64, **kwargs: Any) -> nn.Module:
  """Builds a router.

  Args:
    kind: 'resnet1d', 'linear' or 'mlp'.
    num_experts: E, the width of the gate.
    hidden: hidden width of the 'mlp' router (ignored by the others).
    **kwargs: extra module attributes (e.g. `shortcut='pad'` for 'resnet1d').

  Raises:
    UserError: for an unknown kind or a non-positive size.
  """
  if num_experts <= 0:
    raise UserError(f"router: num_experts must be > 0, got {num_experts}")
  if kind == "resnet1d":
    shortcut = kwargs.get("shortcut", "conv")
    if shortcut not in ("conv", "pad"):
      raise UserError(f"router: unknown resnet1d shortcut {shortcut!r}; choose 'conv' or 'pad'")
    return ResNet1dRouter(num_experts, **kwargs)
  if kind == "linear":
    return LinearRouter(num_experts, **kwargs)
  if kind == "mlp":
    if hidden <= 0:
      raise UserError(f"router: hidden must be > 0, got {hidden}")
    return MLPRouter(num_experts, hidden, **kwargs)
  raise UserError(f"router: unknown kind {kind!r}; choose from {list(KINDS)}")


def gate_stats(gate: Array) -> dict[str, Array]:
  """Logging statistics of a gate [batch, E] (jit-friendly; all values are arrays).

  Returns:
    'entropy': mean over the batch of each row's entropy in nats (log E = uniform, 0 = one-hot);
    'normalized_entropy': that divided by log E (1.0 when E = 1);
    'max_weight': mean over the batch of each row's largest weight;
    'expert_mean': [E] mean weight per expert over the batch.
  """
  gate = gate.astype(jnp.float32)
  e = gate.shape[-1]
  entropy = -jnp.sum(jnp.where(gate > 0, gate * jnp.log(jnp.where(gate > 0, gate, 1.0)), 0.0), -1)
  mean_entropy = jnp.mean(entropy)
  return {
    "entropy": mean_entropy,
    "normalized_entropy": mean_entropy / math.log(e) if e > 1 else jnp.ones((), jnp.float32),
    "max_weight": jnp.mean(jnp.max(gate, axis=-1)),
    "expert_mean": jnp.mean(gate, axis=0),
  }
