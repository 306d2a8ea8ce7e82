"""`ilora_jax.plan`'s activation estimate against its docstring's formula, computed by hand."""

import pytest

from ilora_jax import plan
from ilora_jax.llama import LlamaConfig

# Llama-2-7B's shape in bf16: hidden 4096, 32 heads of 128 (no GQA), MLP 11008, 32 layers.
_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                  num_heads=32, num_kv_heads=32, head_dim=128, dtype="bfloat16")  # fmt: skip
# A small float32 one with grouped KV heads: hidden 64, 4 heads and 2 KV heads of 16, MLP 128.
_SMALL = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32")  # fmt: skip


def _by_hand(remat, b, T, L, d, h, kv, f, vocab, nbytes, tensor, masks, slots):
  """The module docstring: per layer b T (34 d + 5 h T) bytes / 2 over the tensor axis with
  no remat; 'full' each layer's input plus one layer's working set; 'dots' half of no remat;
  'projections' (3 d + 2 kv + 2 f) values and the masks' bytes per token and layer over the
  tensor axis, plus one layer; plus 3 float32 copies of the target slots' logits."""
  layer = b * T * (34 * d + 5 * h * T) * nbytes // 2 // tensor
  layers = {
    "none": L * layer,
    "full": L * b * T * d * nbytes + layer,
    "dots": L * layer // 2,
    "dots_no_batch": L * layer // 2,
    "projections": L * b * T * ((3 * d + 2 * kv + 2 * f) * nbytes + masks) // tensor + layer,
  }[remat]
  k = min(T, slots)
  return layers + 3 * b * k * vocab * 4 // tensor


_REMATS = ["none", "full", "dots", "dots_no_batch", "projections"]


@pytest.mark.parametrize("remat", _REMATS)
def test_activation_bytes_of_a_7b_shape_follow_the_docstring(remat):
  """Micro-batch 8 x 512 on one device, 16 target slots, no masks."""
  got = plan.activation_bytes(_7B, 8, 512, remat, 1, 0, 16)
  want = _by_hand(remat, 8, 512, 32, 4096, 32, 32 * 128, 11008, 32000, 2, 1, 0, 16)
  assert got == want
  # Spot values written out: one layer's working set without remat is
  # 8 * 512 * (34 * 4096 + 5 * 32 * 512) * 2 / 2 = 905,969,664 bytes; the logits
  # 3 * 8 * 16 * 32000 * 4 = 49,152,000 bytes.
  layer, logits = 905_969_664, 49_152_000
  assert {
    "none": 32 * layer + logits,
    "full": 32 * 8 * 512 * 4096 * 2 + layer + logits,
    "dots": 16 * layer + logits,
    "dots_no_batch": 16 * layer + logits,
    "projections": 32 * 8 * 512 * (3 * 4096 + 2 * 4096 + 2 * 11008) * 2 + layer + logits,
  }[remat] == got


@pytest.mark.parametrize("remat", _REMATS)
def test_activation_bytes_of_a_small_shape_over_two_tensor_shards(remat):
  """Micro-batch 3 x 10 in float32, the activations split two ways, the adapters' dropout
  masks of all seven projections (6 d + f bytes a token and layer; 'projections' keeps
  them), and every one of the 10 positions a target (the cap of 12 is above it)."""
  masks = 6 * 64 + 128
  targets = ("q", "k", "v", "o", "gate", "up", "down")
  assert plan.mask_bytes_per_token(_SMALL, targets, 0.1) == masks
  assert plan.mask_bytes_per_token(_SMALL, targets, 0.0) == 0
  got = plan.activation_bytes(_SMALL, 3, 10, remat, 2, masks, 12)
  assert got == _by_hand(remat, 3, 10, 2, 64, 4, 2 * 16, 128, 256, 4, 2, masks, 12)
  # With no cap every position reaches the head, as with a cap of 10.
  assert plan.activation_bytes(_SMALL, 3, 10, remat, 2, masks) == got
  assert plan.activation_bytes(_SMALL, 3, 10, remat, 2, masks, 10) == got


def test_only_the_target_slots_logits_count():
  """3 float32 copies of b x k x vocab logits, k the target slots (fewer than the tokens)."""
  few = plan.activation_bytes(_SMALL, 3, 10, "none", 1, 0, 2)
  all_ = plan.activation_bytes(_SMALL, 3, 10, "none", 1, 0, None)
  assert all_ - few == 3 * 3 * (10 - 2) * 256 * 4


def test_the_tensor_axis_splits_activations_only_where_it_divides_every_head_count():
  """32 heads, 4 KV heads and an MLP of 11008: tensor 4 divides all three, tensor 8 leaves
  the KV heads whole (so every device holds every activation), 2 divides all."""
  gqa = _7B.replace(num_kv_heads=4)
  assert plan.activation_tensor_shards(gqa, 8) == 1
  assert plan.activation_tensor_shards(gqa, 4) == 4
  assert plan.activation_tensor_shards(gqa, 2) == 2
  assert plan.activation_tensor_shards(gqa, 1) == 1
  # An MLP width tensor does not divide: 11008 = 2^8 x 43.
  assert plan.activation_tensor_shards(_7B, 512) == 1
  assert plan.activation_tensor_shards(_7B.replace(num_heads=512, num_kv_heads=512), 256) == 256
