"""Routers: shapes, softmax rows, parameter counts and parity with an independent torch ResNet."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilora_jax import router
from ilora_jax.errors import UserError

E, HIDDEN = 4, 64


@functools.cache
def _init(kind, hidden=32):
  """One (jitted) init per router kind for the whole module: random init compiles slowly."""
  module = router.make_router(kind, E, hidden=hidden)
  init = jax.jit(lambda key, user: module.init(key, user, train=False))
  return module, init(jax.random.key(0), _user(8))


def _user(batch=6, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, HIDDEN)), jnp.float32)


def _n_params(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _resnet_count_by_hand(experts, shortcut):
  """Parameters of the 1-D ResNet router, counted layer by layer (convs bias-free)."""
  conv = lambda c_in, c_out, k: c_in * c_out * k
  bn = lambda c: 2 * c  # scale and bias; running statistics are not parameters
  total = conv(1, 16, 3) + bn(16)
  c_in = 16
  for c_out in (16, 32, 64):
    for _ in range(3):
      total += conv(c_in, c_out, 3) + bn(c_out) + conv(c_out, c_out, 3) + bn(c_out)
      if c_in != c_out and shortcut == "conv":
        total += conv(c_in, c_out, 1) + bn(c_out)
      c_in = c_out
  return total + 64 * experts + experts


@pytest.mark.parametrize("kind", router.KINDS)
def test_gate_is_a_softmax_row_per_instance(kind):
  module, variables = _init(kind)
  user = _user()
  gate = module.apply(variables, user, train=False)
  chex.assert_shape(gate, (6, E))
  chex.assert_tree_all_finite(gate)
  assert np.all(np.asarray(gate) > 0)
  np.testing.assert_allclose(np.asarray(gate).sum(-1), 1.0, rtol=1e-5)
  if "batch_stats" in variables:
    gate, _ = module.apply(variables, user, train=True, mutable=["batch_stats"])
  else:
    gate = module.apply(variables, user, train=True)
  chex.assert_shape(gate, (6, E))
  np.testing.assert_allclose(np.asarray(gate).sum(-1), 1.0, rtol=1e-5)
  assert np.abs(np.asarray(gate)[0] - np.asarray(gate)[1]).max() > 0  # depends on the input


@pytest.mark.parametrize("shortcut,expected", [("conv", 93_524), ("pad", 90_772)])
def test_resnet1d_parameter_count(shortcut, expected):
  module = router.make_router("resnet1d", E, shortcut=shortcut)
  variables = jax.eval_shape(lambda k: module.init(k, _user(2), train=False), jax.random.key(0))
  count = _n_params(variables["params"])
  assert count == expected == _resnet_count_by_hand(E, shortcut)
  assert 85_000 < count < 100_000  # "about 91k" in the original
  assert set(variables) == {"params", "batch_stats"}


def _torch_router(experts, shortcut="conv"):
  """The same architecture written independently in torch (NCL layout). Where a block changes
  the shape, shortcut 'conv' is a 1x1 conv + BN; 'pad' is the original ResNet1d's
  parameter-free option A: subsample by the stride, then planes // 4 zero channels on each
  side (F.pad(x[..., ::2], (0, 0, planes // 4, planes // 4)))."""
  import torch
  from torch import nn

  class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
      super().__init__()
      self.conv1 = nn.Conv1d(c_in, c_out, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm1d(c_out)
      self.conv2 = nn.Conv1d(c_out, c_out, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm1d(c_out)
      self.stride, self.pad, self.shortcut = stride, None, None
      if stride != 1 or c_in != c_out:
        if shortcut == "conv":
          self.shortcut = nn.Sequential(
            nn.Conv1d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm1d(c_out)
          )
        else:
          self.pad = c_out // 4

    def forward(self, x):
      out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
      if self.shortcut is not None:
        x = self.shortcut(x)
      elif self.pad is not None:
        x = nn.functional.pad(x[:, :, :: self.stride], (0, 0, self.pad, self.pad))
      return torch.relu(out + x)

  class Router(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem_conv = nn.Conv1d(1, 16, 3, 1, 1, bias=False)
      self.stem_bn = nn.BatchNorm1d(16)
      blocks, c_in = {}, 16
      for s, c_out in enumerate((16, 32, 64)):
        for b in range(3):
          blocks[f"stage{s}_block{b}"] = Block(c_in, c_out, 2 if s > 0 and b == 0 else 1)
          c_in = c_out
      self.blocks = nn.ModuleDict(blocks)
      self.head = nn.Linear(64, experts)

    def forward(self, user):
      x = torch.relu(self.stem_bn(self.stem_conv(user[:, None, :])))
      for block in self.blocks.values():
        x = block(x)
      return torch.softmax(self.head(x.mean(-1)), dim=-1)

  return Router()


def _to_flax(model):
  """Copies the torch router's weights and BatchNorm statistics into flax variables."""
  t = lambda v: jnp.asarray(v.detach().numpy())
  params, stats = {}, {}

  def bn(module):
    return (
      {"scale": t(module.weight), "bias": t(module.bias)},
      {"mean": t(module.running_mean), "var": t(module.running_var)},
    )

  def conv(module):
    return {"kernel": t(module.weight.permute(2, 1, 0))}  # [out, in, k] -> [k, in, out]

  params["stem_conv"] = conv(model.stem_conv)
  params["stem_bn"], stats["stem_bn"] = bn(model.stem_bn)
  for name, block in model.blocks.items():
    p, s = {"conv1": conv(block.conv1), "conv2": conv(block.conv2)}, {}
    p["bn1"], s["bn1"] = bn(block.bn1)
    p["bn2"], s["bn2"] = bn(block.bn2)
    if block.shortcut is not None:
      p["shortcut_conv"] = conv(block.shortcut[0])
      p["shortcut_bn"], s["shortcut_bn"] = bn(block.shortcut[1])
    params[name], stats[name] = p, s
  params["head"] = {"kernel": t(model.head.weight.T), "bias": t(model.head.bias)}
  return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("shortcut,count", [("conv", 93_524), ("pad", 90_772)])
def test_resnet1d_matches_torch_in_eval_and_training_mode(shortcut, count):
  """Both shortcuts against torch: 'pad' is configs/base.py's default (the original's)."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  model = _torch_router(E, shortcut)
  assert sum(p.numel() for p in model.parameters()) == count
  with torch.no_grad():  # non-trivial BatchNorm affine params and running statistics
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm1d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.3, 0.3)
        m.running_var.uniform_(0.5, 2.0)
  variables = _to_flax(model)
  module = router.make_router("resnet1d", E, shortcut=shortcut)
  shapes = jax.eval_shape(lambda k: module.init(k, _user(2), train=False), jax.random.key(0))
  chex.assert_trees_all_equal_shapes(shapes, variables)

  user = np.random.default_rng(3).standard_normal((8, HIDDEN)).astype(np.float32)
  model.eval()
  with torch.no_grad():
    expected = model(torch.from_numpy(user)).numpy()
  gate = module.apply(variables, jnp.asarray(user), train=False)
  np.testing.assert_allclose(np.asarray(gate), expected, rtol=1e-4, atol=1e-5)

  model.train()
  with torch.no_grad():
    expected = model(torch.from_numpy(user)).numpy()
  gate, updates = module.apply(variables, jnp.asarray(user), train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(gate), expected, rtol=1e-4, atol=1e-5)
  new = _to_flax(model)["batch_stats"]
  chex.assert_trees_all_close(
    jax.tree.map(lambda d: d["mean"], updates["batch_stats"], is_leaf=lambda d: "mean" in d),
    jax.tree.map(lambda d: d["mean"], new, is_leaf=lambda d: "mean" in d),
    rtol=1e-4,
    atol=1e-5,
  )
  # The running variance as torch updates it, with the unbiased batch variance (flax's own
  # BatchNorm takes the biased one: a factor (n - 1) / n on the new term, 0.8% at n = 128,
  # which the tolerance of 2e-3 here let through).
  chex.assert_trees_all_close(
    jax.tree.map(lambda d: d["var"], updates["batch_stats"], is_leaf=lambda d: "var" in d),
    jax.tree.map(lambda d: d["var"], new, is_leaf=lambda d: "var" in d),
    rtol=1e-5,
    atol=1e-6,
  )


def test_batch_stats_update_in_training_and_are_used_in_eval():
  module, variables = _init("resnet1d")
  user = _user(8)
  stats = variables["batch_stats"]
  _, updates = module.apply(variables, user, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(
    lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), stats, updates["batch_stats"]
  )
  assert all(jax.tree.leaves(changed))
  gate, same = module.apply(variables, user, train=False, mutable=["batch_stats"])
  chex.assert_trees_all_equal(same["batch_stats"], stats)
  # Eval reads the stored statistics: other statistics give another gate.
  other = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  assert np.abs(np.asarray(module.apply(other, user, train=False)) - np.asarray(gate)).max() > 0
  # Training normalises with the batch's own statistics, not the stored ones.
  train_a, _ = module.apply(variables, user, train=True, mutable=["batch_stats"])
  train_b, _ = module.apply(other, user, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(train_a), np.asarray(train_b), rtol=1e-6)


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_linear_and_mlp_routers_match_numpy():
  user = np.asarray(_user(5))
  linear = router.make_router("linear", E)
  p = linear.init(jax.random.key(0), jnp.asarray(user))["params"]
  expected = _softmax(user @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"]))
  np.testing.assert_allclose(np.asarray(linear.apply({"params": p}, user)), expected, rtol=1e-5)
  assert _n_params(p) == HIDDEN * E + E

  mlp = router.make_router("mlp", E, hidden=16)
  p = mlp.init(jax.random.key(1), jnp.asarray(user))["params"]
  h = user @ np.asarray(p["hidden"]["kernel"]) + np.asarray(p["hidden"]["bias"])
  erf = np.vectorize(math.erf)
  h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))  # exact GELU, as torch.nn.GELU()
  expected = _softmax(h @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"]))
  np.testing.assert_allclose(np.asarray(mlp.apply({"params": p}, user)), expected, rtol=1e-5)
  assert _n_params(p) == HIDDEN * 16 + 16 + 16 * E + E


def test_dense_init_follows_torch_bounds():
  p = router.make_router("linear", 256).init(jax.random.key(0), _user(2))["params"]["head"]
  bound = 1.0 / math.sqrt(HIDDEN)
  for leaf in (p["kernel"], p["bias"]):
    assert 0.9 * bound < np.abs(np.asarray(leaf)).max() <= bound


def test_projector_init_follows_torch_linear():
  """The projector's layers start as the original's torch nn.Linear layers do: weights and
  biases uniform within 1 / sqrt(fan_in) (before, Flax's LeCun-normal kernels and zero
  biases: a first projection about half the size of the original's)."""
  torch = pytest.importorskip("torch")
  from ilora_jax.projector import Projector

  sas, d = 64, 256
  p = Projector(d).init(jax.random.key(0), jnp.zeros((1, sas)))["params"]
  torch.manual_seed(0)
  ref = {"fc1": torch.nn.Linear(sas, d), "fc2": torch.nn.Linear(d, d)}
  for name, layer in ref.items():
    ours = {"kernel": np.asarray(p[name]["kernel"]), "bias": np.asarray(p[name]["bias"])}
    theirs = {"kernel": layer.weight.detach().numpy().T, "bias": layer.bias.detach().numpy()}
    for key in ours:
      assert ours[key].shape == theirs[key].shape, (name, key)
      bound = float(np.abs(theirs[key]).max())
      assert np.abs(ours[key]).max() <= bound * 1.01, (name, key)
      assert np.abs(ours[key]).max() > 0.95 * bound, (name, key)
      np.testing.assert_allclose(ours[key].std(), theirs[key].std(), rtol=0.1)


def test_projector_matches_torch_linear_gelu_linear():
  """The projector's forward against the original's torch nn.Sequential(Linear(64, d), GELU(),
  Linear(d, d)) (REFERENCE.md item 2) with the same weights: torch's GELU is the exact (erf)
  one; the tanh approximation moves these outputs by ~5e-4, far above the tolerance."""
  torch = pytest.importorskip("torch")
  from ilora_jax.projector import Projector

  sas, d = 64, 96
  projector = Projector(d)
  p = projector.init(jax.random.key(0), jnp.zeros((1, sas)))["params"]
  ref = torch.nn.Sequential(torch.nn.Linear(sas, d), torch.nn.GELU(), torch.nn.Linear(d, d))
  with torch.no_grad():
    for layer, name in ((ref[0], "fc1"), (ref[2], "fc2")):
      layer.weight.copy_(torch.from_numpy(np.array(p[name]["kernel"]).T.copy()))
      layer.bias.copy_(torch.from_numpy(np.array(p[name]["bias"])))
  # Inputs [2, 5, 64] (any leading axes), spread so that fc1's outputs cover [-4, 4].
  x = (4 * np.random.default_rng(5).standard_normal((2, 5, sas))).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x)).numpy()
  got = np.asarray(projector.apply({"params": p}, jnp.asarray(x)))
  assert got.shape == (2, 5, d) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6)


def test_make_router_rejects_unknown_kinds():
  with pytest.raises(UserError, match="unknown kind"):
    router.make_router("moe", E)
  with pytest.raises(UserError, match="shortcut"):
    router.make_router("resnet1d", E, shortcut="dense")
  with pytest.raises(UserError, match="num_experts"):
    router.make_router("linear", 0)


def test_gate_stats_match_numpy():
  gate = np.asarray([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
  stats = jax.jit(router.gate_stats)(jnp.asarray(gate, jnp.float32))
  rows = [0.0, math.log(4), -sum(p * math.log(p) for p in (0.1, 0.2, 0.3, 0.4))]
  np.testing.assert_allclose(float(stats["entropy"]), np.mean(rows), rtol=1e-6)
  np.testing.assert_allclose(
    float(stats["normalized_entropy"]), np.mean(rows) / math.log(4), rtol=1e-6
  )
  np.testing.assert_allclose(float(stats["max_weight"]), (1.0 + 0.25 + 0.4) / 3, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stats["expert_mean"]), gate.mean(0), rtol=1e-6)


def test_mlp_init_follows_torch_bounds_of_each_layer():
  """Each Dense starts as torch's nn.Linear of its own fan-in: the head's of `hidden` (the
  MLP's width), not of the user vector's size."""
  p = router.make_router("mlp", 256, hidden=16).init(jax.random.key(0), _user(2))["params"]
  for name, fan_in in (("hidden", HIDDEN), ("head", 16)):
    bound = 1.0 / math.sqrt(fan_in)
    for leaf in (p[name]["kernel"], p[name]["bias"]):
      assert 0.85 * bound < np.abs(np.asarray(leaf)).max() <= bound, name


def test_resnet1d_defaults_to_the_conv_shortcut_and_sizes_are_checked():
  """'conv' when no shortcut is named (the module docstring); a non-positive MLP width is
  refused as a user error."""
  module = router.make_router("resnet1d", E)
  variables = jax.eval_shape(lambda k: module.init(k, _user(2), train=False), jax.random.key(0))
  assert _n_params(variables["params"]) == _resnet_count_by_hand(E, "conv")
  assert "shortcut_conv" in variables["params"]["stage1_block0"]
  for hidden in (0, -3):
    with pytest.raises(UserError, match="hidden must be > 0"):
      router.make_router("mlp", E, hidden=hidden)


def test_gate_stats_of_a_single_expert():
  """With E = 1 every gate is [1.0]: entropy 0, normalised entropy 1 (as documented: there is
  no other choice), max weight 1."""
  stats = router.gate_stats(jnp.ones((3, 1), jnp.float32))
  assert float(stats["entropy"]) == 0.0 and float(stats["normalized_entropy"]) == 1.0
  assert float(stats["max_weight"]) == 1.0
  np.testing.assert_array_equal(np.asarray(stats["expert_mean"]), [1.0])


def test_the_router_reads_the_sasrec_user_vector_of_the_last_real_item():
  """`train_ilora.gate_weights` feeds the router SASRec's hidden state at each row's last real
  item (position len_seq - 1, REFERENCE.md items 1 and 6), gradient-stopped; in training it
  returns the router's updated BatchNorm statistics, in eval the stored ones; the 'uniform'
  ablation is 1 / E whatever the user."""
  from types import SimpleNamespace

  from ilora_jax import sasrec, train_ilora

  n_items = 20
  cfg = sasrec.SASRecConfig(n_items=n_items, hidden=HIDDEN, max_len=6)
  model = sasrec.SASRec(cfg)
  rng = np.random.default_rng(4)
  len_seq = np.asarray([1, 3, 6, 4], np.int32)
  seq = np.full((4, 6), n_items, np.int32)
  for r, n in enumerate(len_seq):
    seq[r, :n] = rng.permutation(n_items)[:n]
  sas = model.init(jax.random.key(1), jnp.asarray(seq), jnp.asarray(len_seq))["params"]
  states = np.asarray(model.apply({"params": sas}, jnp.asarray(seq), method="hidden_states"))
  user = states[np.arange(4), len_seq - 1]  # [4, hidden], picked by hand
  # A different user vector per row: the check below can tell rows and positions apart.
  assert np.abs(states[1, 1] - states[1, 2]).max() > 1e-3

  module, variables = _init("resnet1d")
  parts = SimpleNamespace(sasrec=model, router=module, lora_cfg=SimpleNamespace(num_experts=E))
  frozen = {"sasrec": sas}
  trainable = {"router": variables["params"]}
  stats = variables["batch_stats"]
  args = (trainable, stats, frozen, jnp.asarray(seq), jnp.asarray(len_seq))

  @jax.jit  # One program: op by op, the ResNet's many small ops are slow.
  def gates(user):
    out = {}
    for train in (False, True):
      out[f"gate_weights {train}"] = train_ilora.gate_weights(parts, *args, train, "router")
    out["uniform"] = train_ilora.gate_weights(parts, *args, False, "uniform")
    out["eval"] = module.apply(variables, user, train=False), stats
    gate, updates = module.apply(variables, user, train=True, mutable=["batch_stats"])
    out["train"] = gate, updates["batch_stats"]
    return out

  out = gates(jnp.asarray(user))
  for train, want in ((False, "eval"), (True, "train")):
    got = out[f"gate_weights {train}"]
    np.testing.assert_allclose(got[0], out[want][0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got[1], out[want][1], rtol=1e-5, atol=1e-6)
  new = jax.tree.leaves(out["gate_weights True"][1])[0]
  assert np.abs(np.asarray(new) - np.asarray(jax.tree.leaves(stats)[0])).max() > 0
  uniform = out["uniform"][0]
  np.testing.assert_allclose(np.asarray(uniform), np.full((4, E), 1.0 / E))


def test_resnet1d_init_follows_torch_defaults():
  """As torch's nn.Conv1d / nn.BatchNorm1d start: every conv kernel uniform within
  1 / sqrt(in_channels * kernel_size), BatchNorm scale 1 and bias 0, running mean 0 and
  variance 1."""
  _, variables = _init("resnet1d")
  from flax import traverse_util

  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(variables)), sep="/")
  convs = [k for k in flat if k.endswith("kernel") and "head" not in k]
  assert len(convs) == 1 + 9 * 2 + 2  # stem, two per block, two shortcut convs
  for name in convs:
    k, c_in, _ = flat[name].shape
    bound = 1.0 / math.sqrt(c_in * k)
    assert 0.75 * bound < np.abs(flat[name]).max() <= bound, name
  norms = [k for k in flat if "bn" in k.rsplit("/", 2)[1]]  # stem_bn, bn1, bn2, shortcut_bn
  assert len(norms) == 4 * len(convs)  # scale, bias, mean, var of the BatchNorm after each
  for name in norms:
    want = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}[name.rsplit("/", 1)[1]]
    np.testing.assert_array_equal(flat[name], want, err_msg=name)
