"""`ilora_jax.plan`'s estimates against its docstring's formulas and byte counts worked by
hand from the model's shapes, and `ilora_jax.sharding`'s mesh, rules and batch placement
(on 4 CPU devices in a child process)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_cli, xla_flags
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from ilora_jax import configuration, llm, plan, router, sharding
from ilora_jax.errors import UserError
from ilora_jax.llama import LlamaConfig

# Llama-2-7B's shape in bf16: hidden 4096, 32 heads of 128 (no GQA), MLP 11008, 32 layers.
_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                  num_heads=32, num_kv_heads=32, head_dim=128, dtype="bfloat16")  # fmt: skip
# A small float32 one with grouped KV heads: hidden 64, 4 heads and 2 KV heads of 16, MLP 128.
_SMALL = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32")  # fmt: skip


def _by_hand(remat, b, T, L, d, h, kv, f, vocab, nbytes, tensor, masks, slots, adapters=0):
  """The module docstring: per layer b T (34 d + 5 h T) bytes / 2 over the tensor axis with
  no remat; 'full' each layer's input plus one layer's working set; 'dots' the seven
  projections' outputs (3 d + 2 kv + 2 f values: q's width is d in both shapes here) and the
  adapters' outputs per token and layer over the tensor axis, plus one layer; 'projections'
  (3 d + 2 kv + 2 f) values and the masks' bytes per token and layer over the tensor axis,
  plus one layer; plus 3 float32 copies of the target slots' logits."""
  layer = b * T * (34 * d + 5 * h * T) * nbytes // 2 // tensor
  outputs = L * b * T * (3 * d + 2 * kv + 2 * f + adapters) * nbytes // tensor + layer
  layers = {
    "none": L * layer,
    "full": L * b * T * d * nbytes + layer,
    "dots": outputs,
    "dots_no_batch": outputs,
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
    "dots": 32 * 8 * 512 * (3 * 4096 + 2 * 4096 + 2 * 11008) * 2 + layer + logits,
    "dots_no_batch": 32 * 8 * 512 * (3 * 4096 + 2 * 4096 + 2 * 11008) * 2 + layer + logits,
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
  adapters = 3 * 64 + 2 * 32 + 2 * 128  # q, o, down; k, v; gate, up.
  assert plan.adapter_output_values(_SMALL, targets) == adapters
  assert plan.adapter_output_values(_SMALL, ("q", "v")) == 64 + 32
  got = plan.activation_bytes(_SMALL, 3, 10, remat, 2, masks, 12, adapters)
  assert got == _by_hand(remat, 3, 10, 2, 64, 4, 2 * 16, 128, 256, 4, 2, masks, 12, adapters)
  # With no cap every position reaches the head, as with a cap of 10.
  assert plan.activation_bytes(_SMALL, 3, 10, remat, 2, masks, None, adapters) == got
  assert plan.activation_bytes(_SMALL, 3, 10, remat, 2, masks, 10, adapters) == got


def test_dots_keeps_more_than_projections_as_measured():
  """The 7B shape, batch 8 x 512, all seven projections wrapped with dropout: 'dots' keeps
  every matmul output, the adapters' too, 'projections' fewer values and the dropout masks.
  The plan had 'dots' below 'projections' (26.6 vs 28.7 GiB in all); XLA's plans were 34.0
  and 28.7 GiB, and an H100 reported 34.1 GiB under 'dots' (bench/README.md)."""
  targets = ("q", "k", "v", "o", "gate", "up", "down")
  masks, adapters = (
    plan.mask_bytes_per_token(_7B, targets, 0.1),
    plan.adapter_output_values(_7B, targets),
  )
  dots = plan.activation_bytes(_7B, 8, 512, "dots", 1, masks, 48, adapters)
  projections = plan.activation_bytes(_7B, 8, 512, "projections", 1, masks, 48, adapters)
  gib = 2**30
  assert 5 * gib < dots - projections < 7 * gib  # XLA's plans: 5.3 GiB apart.


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


# ----------------------------------------------------------------------------- shard sizes


def test_shard_shape_is_the_largest_shard_worked_by_hand():
  """9 rows over 2 devices: shards of 5 and 4, the largest 5; a spec shorter than the shape
  leaves the trailing dimensions whole; a dimension over two mesh axes splits by the product
  of their sizes (2 x 3 = 6, not 2 + 3)."""
  sizes = {"data": 2, "fsdp": 3, "tensor": 3}
  assert plan.shard_shape((9, 4), P("fsdp"), {"fsdp": 2}) == (5, 4)
  assert plan.shard_shape((24, 6), P(("data", "fsdp"), "tensor"), sizes) == (4, 2)
  assert plan.shard_shape((7, 6, 5), P(None, "tensor"), sizes) == (7, 2, 5)
  assert plan.shard_shape((7,), P(), sizes) == (7,)


def test_per_device_bytes_take_each_arrays_own_item_size():
  """A bf16 [8, 6] over fsdp 2: 4 x 6 x 2 bytes; an int8 [5] replicated: 5 bytes; a float32
  [24, 6] over (data, fsdp) = 4 and tensor 3: 6 x 2 x 4 bytes."""
  tree = {
    "a": jax.ShapeDtypeStruct((8, 6), jnp.bfloat16),
    "b": jax.ShapeDtypeStruct((5,), jnp.int8),
    "c": jax.ShapeDtypeStruct((24, 6), jnp.float32),
  }
  specs = {"a": P("fsdp"), "b": P(), "c": P(("data", "fsdp"), "tensor")}
  sizes = {"data": 2, "fsdp": 2, "tensor": 3}
  assert plan.per_device_bytes(tree, specs, sizes) == 4 * 6 * 2 + 5 + 6 * 2 * 4
  assert plan.total_bytes(tree) == 8 * 6 * 2 + 5 + 24 * 6 * 4
  with pytest.raises(ValueError, match="3 arrays but 2 specs"):
    plan.per_device_bytes(tree, {"a": P(), "b": P()}, sizes)


# ----------------------------------------------------------------------------- whole plans

# configs/tiny.py's model: vocabulary 49152 + 5 special tokens rounded up to 128 = 49280 rows,
# hidden 64, MLP 128, 2 layers of 4 query heads and 2 KV heads of 16, tied embeddings, float32.
_VOCAB = 49280
_NORMS = 2 * 2 * 64 + 64  # Two RMSNorm scales a layer and the final one: split over fsdp only.
_LAYER = 64 * 4 * 16 * 2 + 64 * 2 * 16 * 2 + 3 * 64 * 128  # q, o; k, v; gate, up, down.
_PARAMS = _VOCAB * 64 + 2 * _LAYER + _NORMS  # 3,227,968.
# Adapters of rank 4 on all seven projections, [in, 4] and [4, out] each: a layer's q 64 -> 64,
# k and v 64 -> 32, o 64 -> 64, gate and up 64 -> 128, down 128 -> 64.
_LORA = 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))  # 8192.
_PROJECTOR = 16 * 64 + 64 + 64 * 64 + 64  # fc1 (SASRec's 16 -> 64), fc2 (64 -> 64).
_LINEAR_ROUTER = 16 * 2 + 2  # Dense(16 -> 2 experts).


def _tiny(*overrides: str):
  return configuration.load(os.path.join(ROOT, "configs/tiny.py"), list(overrides))


def _sasrec_params(config) -> int:
  from ilora_jax.sasrec import init_params
  from ilora_jax.train_sasrec import model_config

  shapes = jax.eval_shape(lambda: init_params(model_config(config, 60), jax.random.PRNGKey(0)))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


def test_plan_of_the_tiny_model_on_a_1x4x2_mesh_worked_by_hand():
  """8 devices as data 1 x fsdp 4 x tensor 2, micro-batch 8 (2 rows a data shard). Every
  weight splits 8 ways (vocab, heads, KV heads and MLP over tensor, embed over fsdp) but the
  norm scales (embed: 4 ways). Each adapter matrix splits over its one sharded axis: A over
  its input (embed: 4, mlp: 2), B over its output (heads, KV heads, mlp: 2, embed: 4); the
  router, projector and SASRec are replicated. Adam keeps 2 moments of each trainable array,
  sharded as it is, plus a few scalar counters. Activations: 'projections' with the masks
  of the 0.1 dropout, split over tensor 2 (it divides 4 heads, 2 KV heads and 128)."""
  config = _tiny("router.kind=linear", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",
                 "ilora.train.batch_size=8")  # fmt: skip
  got = plan.plan(config, 8)
  assert got["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert (got["micro_batch"], got["seq_len"], got["remat"]) == (8, 512, "projections")
  assert got["params_total"] == _PARAMS == 3_227_968
  frozen = 4 * ((_PARAMS - _NORMS) // 8 + _NORMS // 4)
  assert got["frozen_llm_bytes"] == frozen
  sasrec = 4 * _sasrec_params(config)
  assert got["frozen_sasrec_bytes"] == sasrec
  assert got["trainable_total"] == _LORA + _PROJECTOR + _LINEAR_ROUTER == 13_474
  # 4 bytes x 2 layers x rank 4 x a layer's adapter rows/columns on one device: q 64/4 +
  # 64/2, k and v 64/4 + 32/2, o 64/4 + 64/4, gate and up 64/4 + 128/2, down 128/2 + 64/4.
  lora = 4 * 2 * 4 * (16 + 32 + 2 * (16 + 16) + 16 + 16 + 2 * (16 + 64) + 64 + 16)
  trainable = lora + 4 * (_PROJECTOR + _LINEAR_ROUTER)
  assert got["trainable_bytes"] == trainable == 33_416
  assert 0 < got["optimizer_bytes"] - 2 * trainable < 64
  masks = 6 * 64 + 128
  acts = _by_hand("projections", 2, 512, 2, 64, 4, 2 * 16, 128, _VOCAB, 4, 2, masks, 48)
  assert got["activations_estimate_bytes"] == acts
  assert got["total_bytes"] == frozen + sasrec + trainable + got["optimizer_bytes"] + acts


def test_plan_on_one_device_counts_router_statistics_and_stage_overrides():
  """One device: every array whole. float32 weights under bf16 compute take 4 bytes each
  (`llm.param_dtype`), the activations 2; `train.batch_size` overrides the stage's micro-
  batch; no dropout, no masks. The default resnet1d router holds BatchNorm statistics
  beside its parameters: the run keeps them (replicated) with the trainable state."""
  config = _tiny("router.kind=resnet1d", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1",
                 "llm.dtype=bfloat16", "llm.param_dtype=float32", "train.batch_size=16",
                 "ilora.train.batch_size=4", "lora.dropout=0.0", "plan.seq_len=100",
                 "ilora.max_target_tokens=200")  # fmt: skip
  got = plan.plan(config, 1)
  assert got["frozen_llm_bytes"] == 4 * _PARAMS
  variables = jax.eval_shape(
    lambda: router.make_router("resnet1d", 2, shortcut="pad").init(
      jax.random.PRNGKey(0), jnp.zeros((2, 16)), train=False
    )
  )
  count = {k: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v)) for k, v in variables.items()}
  assert count["batch_stats"] > 0
  assert got["trainable_total"] == _LORA + _PROJECTOR + count["params"]
  assert got["trainable_bytes"] == 4 * (got["trainable_total"] + count["batch_stats"])
  assert got["micro_batch"] == 16
  acts = _by_hand("projections", 16, 100, 2, 64, 4, 2 * 16, 128, _VOCAB, 2, 1, 0, 200)
  assert got["activations_estimate_bytes"] == acts


def test_plan_of_llama2_7b_on_8_fsdp_devices():
  """bf16 Llama-2-7B: 6,738,415,616 parameters, its 32000-row embedding and head grown to
  32128 rows (32000 + 5 rounded up to 128); 2 bytes each, split 8 ways (every dimension fsdp
  or tensor shards is a multiple of 8)."""
  config = configuration.load(os.path.join(ROOT, "configs/movielens.py"),
                              ["llm.name=llama2-7b", "mesh.data=1", "mesh.fsdp=-1"])  # fmt: skip
  got = plan.plan(config, 8)
  params = 6_738_415_616 + 2 * 128 * 4096
  assert got["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert got["params_total"] == params
  assert got["frozen_llm_bytes"] == 2 * params // 8


def test_the_vocabulary_grows_by_five_special_tokens_rounded_up_to_128(tmp_path):
  """A Hugging Face folder whose tokenizer has 32124 entries: 32129 rows with the 5 special
  tokens, rounded up to 32256 (32124 + 4 would still fit in 32128)."""
  hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32124,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256}  # fmt: skip
  (tmp_path / "config.json").write_text(json.dumps(hf))
  assert plan.model_config(_tiny(f"llm.name={tmp_path}")).vocab_size == 32256
  assert plan.model_config(_tiny()).vocab_size == _VOCAB


def test_plan_refuses_a_batch_the_data_shards_do_not_divide_and_no_tokens():
  """6 rows over fsdp 4 (data 1): no whole rows per shard; plan.seq_len 0."""
  with pytest.raises(UserError, match="ilora.train.batch_size=6 is not divisible by the 4 data "):
    plan.plan(_tiny("mesh.data=1", "mesh.fsdp=4", "ilora.train.batch_size=6"), 4)
  with pytest.raises(UserError, match="seq_len=0 must be positive"):
    plan.plan(_tiny("mesh.data=1", "plan.seq_len=0"), 1)


# Llama-2-7B as the run builds it: its vocabulary of 32000 grown to 32128 rows.
_7B_RUN = _7B.replace(vocab_size=32128)
_FSDP_6 = llm.UnsplitAxis("fsdp", 6, (4096,), ())
_TENSOR_6 = llm.UnsplitAxis("tensor", 6, (32, 11008, 32128), ())


@pytest.mark.parametrize(
  "sizes,want",
  [
    # fsdp shards only the hidden size, 4096 (2^12): 6 divides none of it, 8 all of it.
    ((1, 6, 1), [_FSDP_6]),
    ((1, 3, 2), [llm.UnsplitAxis("fsdp", 3, (4096,), ())]),
    # tensor shards the 32 heads and KV heads, the MLP's 11008 (2^8 x 43) and the vocabulary's
    # 32128 (2^7 x 251): 6 divides none; 64 the MLP and the vocabulary, not the heads.
    ((1, 1, 6), [_TENSOR_6]),
    ((1, 1, 64), [llm.UnsplitAxis("tensor", 64, (32,), (11008, 32128))]),
    ((1, 6, 6), [_FSDP_6, _TENSOR_6]),
    ((1, 8, 8), []),
    ((1, 1, 32), []),
    ((6, 1, 1), []),  # data shards no weights: nothing it was meant to split.
  ],
)
def test_unsplit_axes_of_llama2_7b_worked_by_hand(sizes, want):
  """The axes `partition_specs` leaves dimensions whole on, with the sizes it leaves whole
  and splits; the specs agree: an axis that splits nothing appears in none of them."""
  mesh = dict(zip(sharding.MESH_AXES, sizes))
  assert llm.unsplit_axes(_7B_RUN, mesh) == want
  specs = jax.tree.leaves(llm.partition_specs(_7B_RUN, mesh), is_leaf=lambda x: isinstance(x, P))
  used = {
    a for spec in specs for axes in spec for a in ((axes,) if isinstance(axes, str) else axes or ())
  }
  for unsplit in want:
    assert (unsplit.axis in used) == bool(unsplit.split)


_7B_CLI = ("--config=configs/movielens.py", "--config.llm.name=llama2-7b", "--config.mesh.data=1")


def _warnings(proc) -> list[str]:
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  return [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]


def test_plan_warns_when_a_mesh_axis_divides_no_weight_dimension():
  """fsdp=6 on Llama-2-7B shards nothing (4096 is 2^12): the frozen LLM takes its 1-device
  bytes on each device, as the JSON says, and one line says why; tensor=6 likewise."""
  for axis, args, dims in (
    ("fsdp", ["--config.mesh.fsdp=6", "--config.ilora.train.batch_size=6"], "4096"),
    ("tensor", ["--config.mesh.fsdp=1", "--config.mesh.tensor=6"], "32, 11008 and 32128"),
  ):
    proc = run_cli(*_7B_CLI, "--config.plan.devices=6", *args, module="ilora_jax.plan")
    assert _warnings(proc) == [
      f"warning: mesh axis {axis} (size 6 at 6 devices) divides none of the llama2-7b weight "
      f"dimensions it shards ({dims}): they stay whole on every device; pick a size that "
      "divides them, e.g. 4 or 8"
    ]
    if axis == "fsdp":
      got = json.loads(proc.stdout.strip().splitlines()[-1])
      assert got["frozen_llm_bytes"] == 2 * got["params_total"]


def test_plan_warns_once_per_axis_and_past_the_models_positions():
  """Counts 6, 12, 8 and 24 with fsdp filling them: one line names the three fsdp sizes that
  fail (8 divides 4096); a plan.seq_len past 4096 positions is one line more. The JSON is the
  one a plan without warnings prints."""
  args = [*_7B_CLI, "--config.plan.devices=6,12,8,24", "--config.mesh.fsdp=-1",
          "--config.ilora.train.batch_size=24"]  # fmt: skip
  proc = run_cli(*args, "--config.plan.seq_len=1000000", module="ilora_jax.plan")
  assert _warnings(proc) == [
    "warning: config.plan.seq_len=1000000 reaches position 1000000, past llama2-7b's "
    "max_position_embeddings=4096: planned as given, but the model was not trained at those "
    "positions",
    "warning: mesh axis fsdp (size 6 at 6 devices, 12 at 12 devices and 24 at 24 devices) "
    "divides none of the llama2-7b weight dimensions it shards (4096): they stay whole on every "
    "device; pick a size that divides them, e.g. 4 or 8",
  ]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [r["mesh"]["fsdp"] for r in got] == [6, 12, 8, 24]
  assert [r["seq_len"] for r in got] == [1000000] * 4


def test_plan_on_a_dividing_mesh_warns_nothing():
  """fsdp=8 splits every 4096; 4096 positions are Llama-2-7B's own."""
  proc = run_cli(*_7B_CLI, "--config.plan.devices=8", "--config.mesh.fsdp=8",
                 "--config.plan.seq_len=4096", module="ilora_jax.plan")  # fmt: skip
  assert _warnings(proc) == []
  assert "warning" not in proc.stderr


def test_a_run_and_the_benchmark_warn_of_a_mesh_axis_that_shards_nothing(tmp_path):
  """fsdp=3 on the tiny model (hidden 64) keeps every weight whole on each of the 3 devices: an
  iLoRA run and the benchmark say so once, as the plan does."""
  line = ("warning: mesh axis fsdp (size 3 at 3 devices) divides none of the tiny weight "
          "dimensions it shards (64): they stay whole on every device; pick a size that divides "
          "them, e.g. 2 or 4")  # fmt: skip
  mesh = ["--config=configs/tiny.py", "--config.mesh.data=1", "--config.mesh.fsdp=3"]
  env = {"XLA_FLAGS": xla_flags(3)}
  proc = run_cli(*mesh, f"--workdir={tmp_path}", "--config.stage=pipeline",
                 "--config.train.batch_size=3", "--config.sasrec.train.steps=1",
                 "--config.ilora.train.steps=1", "--config.ilora.eval_rows=3",
                 "--config.ilora.eval_base=False", "--config.progress=False", env=env)  # fmt: skip
  assert _warnings(proc) == [line]
  proc = run_cli(*mesh, "--config.bench.batch_size=3", "--config.bench.seq_len=64",
                 "--config.bench.steps=1", "--config.bench.warmup=0", "--config.bench.eval=False",
                 module="ilora_jax.bench", env=env)  # fmt: skip
  assert _warnings(proc) == [line]


# ----------------------------------------------------------------------------- the mesh


@pytest.mark.parametrize(
  "sizes,devices,want",
  [
    ((1, -1, 1), 8, (1, 8, 1)),
    ((2, -1, 1), 8, (2, 4, 1)),
    ((3, -1, 2), 12, (3, 2, 2)),
    ((-1, 2, 2), 8, (2, 2, 2)),
    ((1, 1, -1), 4, (1, 1, 4)),
    ((2, 2, 2), 8, (2, 2, 2)),
  ],
)
def test_mesh_shape_fills_the_devices_left(sizes, devices, want):
  assert sharding.mesh_shape(*sizes, devices) == want


@pytest.mark.parametrize(
  "sizes,devices,fragment",
  [
    ((-1, -1, 1), 8, "at most one of data, fsdp, tensor may be -1"),
    ((0, -1, 1), 8, "must be positive or -1"),
    ((0, 1, 1), 8, "must be positive or -1"),
    ((-2, -1, 1), 8, "must be positive or -1"),
    ((-1, 4, 1), 6, "does not divide the 6 devices"),
    ((3, -1, 1), 8, "does not divide the 8 devices"),
    ((2, 2, 2), 4, "needs 8 devices, but 4 are available"),
    ((1, 1, 1), 2, "needs 1 device, but 2 are available"),
    ((1, 2, 1), 1, "needs 2 devices, but 1 is available"),
  ],
)
def test_mesh_shape_refuses_meshes_that_cannot_work(sizes, devices, fragment):
  with pytest.raises(UserError, match=fragment):
    sharding.mesh_shape(*sizes, devices)


def test_rules_are_hashable_pairs_of_the_configs_axes():
  """configs/base.py's lists (batch -> [data, fsdp]) become tuples flax can hash."""
  rules = dict(sharding.rules(_tiny()))
  assert rules["batch"] == ("data", "fsdp")
  assert (rules["embed"], rules["mlp"], rules["vocab"], rules["length"]) == (
    "fsdp", "tensor", "tensor", None)  # fmt: skip
  hash(sharding.rules(_tiny()))


def test_the_batch_splits_over_data_and_fsdp_only():
  """12 rows on data 2 x fsdp 3 x tensor 2: 2 rows a shard, the other dimensions whole."""
  mesh = AbstractMesh((2, 3, 2), sharding.MESH_AXES)
  assert sharding.batch_size_per_shard(mesh, 12) == 2
  with pytest.raises(UserError, match="batch size 9 is not divisible by the 6 data shards"):
    sharding.batch_size_per_shard(mesh, 9)
  placed = sharding.batch_sharding(mesh)
  assert tuple(placed.spec) == (("data", "fsdp"),)
  assert placed.shard_shape((12, 5, 4)) == (2, 5, 4)


def test_host_slice_is_this_processs_rows(monkeypatch):
  monkeypatch.setattr(sharding.jax, "process_count", lambda: 4)
  monkeypatch.setattr(sharding.jax, "process_index", lambda: 2)
  assert sharding.host_slice(8) == slice(4, 6)
  with pytest.raises(UserError, match="batch size 6 is not divisible by 4 processes"):
    sharding.host_slice(6)


def test_compiling_for_nests_and_unwinds():
  default = jax.default_backend()
  with sharding.compiling_for("gpu"):
    with sharding.compiling_for("tpu"):
      assert sharding.backend() == "tpu"
    assert sharding.backend() == "gpu"
  assert sharding.backend() == default


# Runs with 4 CPU devices: the mesh's device layout, the batch's shards and a plan.
_FOUR_DEVICES = r"""
import contextlib, io, json, runpy, sys
import numpy as np
from ml_collections import ConfigDict
from ilora_jax import sharding
out = {}
mesh = sharding.make_mesh(ConfigDict({"data": 2, "fsdp": -1, "tensor": 1}))
out["mesh"] = [dict(mesh.shape), np.vectorize(lambda d: d.id)(mesh.devices).tolist()]
x = np.arange(32).reshape(8, 4)
def shards(a):
  return sorted((s.device.id, list(s.data.shape), np.asarray(s.data).tolist())
                for s in a.addressable_shards)
out["global"] = shards(sharding.global_batch(mesh, {"x": x})["x"])
out["rows"] = shards(sharding.replicated_rows(mesh, x))
# `python -m ilora_jax.plan` for all of this machine's devices: its config flags read
# sys.argv when they are defined.
sys.argv = ["plan", "--config=configs/tiny.py", "--config.plan.devices=0", "--config.mesh.data=-1"]
text = io.StringIO()
with contextlib.redirect_stdout(text):
  runpy.run_module("ilora_jax.plan", run_name="__main__")
out["plan"] = json.loads(text.getvalue().strip().splitlines()[-1])
print(json.dumps(out))
"""

_PLAN = [sys.executable, "-m", "ilora_jax.plan", "--config=configs/tiny.py"]


@pytest.fixture(scope="module")
def children():
  """The child processes, started together: the script above and `python -m ilora_jax.plan`
  with a negative count (a -1 would fill it to a mesh of -8 devices) and with counts of which
  the last cannot be planned."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
  env.pop("ILORA_JAX_DEBUG", None)
  commands = {
    "devices": [sys.executable, "-c", _FOUR_DEVICES],
    "negative": [*_PLAN, "--config.plan.devices=-8", "--config.mesh.fsdp=-1"],
    "last_fails": [*_PLAN, "--config.plan.devices=1,8,7", "--config.mesh.data=-1",
                   "--config.ilora.train.batch_size=8"],
  }  # fmt: skip
  pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
  procs = {k: subprocess.Popen(c, cwd=ROOT, env=env, **pipes) for k, c in commands.items()}
  outs = {k: p.communicate(timeout=300) for k, p in procs.items()}
  return {k: (p.returncode, *outs[k]) for k, p in procs.items()}


def _json(child) -> object:
  code, out, err = child
  assert code == 0, err
  return json.loads(out.strip().splitlines()[-1])


def test_make_mesh_lays_the_devices_out_in_order(children):
  shape, ids = _json(children["devices"])["mesh"]
  assert shape == {"data": 2, "fsdp": 2, "tensor": 1}
  assert ids == [[[0], [1]], [[2], [3]]]


def test_batch_rows_land_on_the_devices_of_their_data_shard(children):
  """8 rows over data 2 x fsdp 2: device k holds rows 2k and 2k + 1, whole."""
  x = np.arange(32).reshape(8, 4)
  want = [(k, [2, 4], x[2 * k : 2 * k + 2].tolist()) for k in range(4)]
  got = _json(children["devices"])
  assert [tuple(s) for s in got["global"]] == want
  assert [tuple(s) for s in got["rows"]] == want


def test_plan_cli_counts(children):
  """plan.devices=0 plans for this machine's devices; one count prints one JSON object;
  a negative count, or a count that cannot be planned, is one `error:` line (exit 2) with
  nothing printed before it (every count is planned before anything is printed)."""
  got = _json(children["devices"])["plan"]
  assert isinstance(got, dict) and got["devices"] == 4
  assert got["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  for name, fragment in [
    (
      "negative",
      "error: config.plan.devices must be device counts like 8 or 1,8,64 (0: this "
      "host's devices), got '-8'",
    ),
    (  # Which of the counts (a single count's error is as before: "negative" above).
      "last_fails",
      "error: config.plan.devices entry 7: ilora.train.batch_size=8 is not divisible by the 7 "
      "data shards",
    ),
  ]:
    code, out, err = children[name]
    assert (code, out) == (2, ""), (name, err)
    assert err.startswith(fragment) and err.count("\n") == 1, err
