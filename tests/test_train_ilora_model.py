"""Unit tests of train_ilora.py's model-side functions on a tiny model: the gate and its router
statistics, the placeholders' embeddings, the target tokens' loss, the train step (micro-batch
averaging, the optimizer's update, dropout keys, non-finite steps, logged gate statistics),
the trainable state's initialisation and the gate table.

Expected values are written from the docstrings and REFERENCE.md in numpy (the router's dense
layer and batch norm, the projector, the softmax cross-entropy of the model's full logits,
SGD with momentum), never taken from the function under test; the end-to-end behaviour of the
stage is in test_ilora_stage.py."""

import dataclasses
import math
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from ilora_jax import llama, lora, sharding, train_ilora
from ilora_jax.data import Split
from ilora_jax.projector import Projector
from ilora_jax.sasrec import SASRec, SASRecConfig

N_ITEMS, SAS_HIDDEN, MAX_LEN, E = 9, 8, 4, 2
LLAMA = llama.LlamaConfig(
  vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
  num_kv_heads=2, head_dim=4, max_position_embeddings=32,
)  # fmt: skip
MOMENTUM, EPS = 0.5, 1e-5


class _BatchNormRouter(nn.Module):
  """Dense(hidden -> E), BatchNorm, softmax: a router with statistics, written in numpy below."""

  num_experts: int

  @nn.compact
  def __call__(self, user, train: bool = False):
    x = nn.Dense(self.num_experts, name="head")(user.astype(jnp.float32))
    x = nn.BatchNorm(not train, momentum=MOMENTUM, epsilon=EPS, name="bn")(x)
    return jax.nn.softmax(x, axis=-1)


class _Linear(nn.Module):
  """Dense(hidden -> E), softmax: a router without statistics."""

  num_experts: int

  @nn.compact
  def __call__(self, user, train: bool = False):
    return jax.nn.softmax(nn.Dense(self.num_experts, name="head")(user), axis=-1)


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  return np.exp(x) / np.exp(x).sum(-1, keepdims=True)


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _router_np(params, stats, user, train):
  """(gate, new statistics) of `_BatchNormRouter` in float64: batch statistics (biased
  variance) and a running average with `MOMENTUM` in training, the running ones otherwise."""
  p, s = _np(params), _np(stats)
  x = np.asarray(user, np.float64) @ p["head"]["kernel"] + p["head"]["bias"]
  if train:
    mean, var = x.mean(0), x.var(0)
    new = {"bn": {"mean": MOMENTUM * s["bn"]["mean"] + (1 - MOMENTUM) * mean,
                  "var": MOMENTUM * s["bn"]["var"] + (1 - MOMENTUM) * var}}  # fmt: skip
  else:
    mean, var, new = s["bn"]["mean"], s["bn"]["var"], s
  y = (x - mean) / np.sqrt(var + EPS) * p["bn"]["scale"] + p["bn"]["bias"]
  return _softmax(y), new


def _parts(router_module, dropout=0.0, slots=3, unroll=False):
  cfg = lora.LoRAConfig(rank=4, num_experts=E, dropout=dropout)
  model = types.SimpleNamespace(
    config=LLAMA, module=llama.Llama(LLAMA, lora.adapter_factory(cfg))
  )  # What the step functions read of an `llm.LLM`.
  return train_ilora.Parts(
    model=model, sasrec=SASRec(SASRecConfig(N_ITEMS, SAS_HIDDEN, MAX_LEN)),
    router=router_module, projector=Projector(LLAMA.hidden_size), builder=None, lora_cfg=cfg,
    n_items=N_ITEMS, max_target_tokens=slots, newline_ids=(), unroll_train=unroll,
  )  # fmt: skip


def _filled(abstract, rng, scale):
  return jax.tree.map(
    lambda v: jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype), nn.meta.unbox(abstract)
  )


def _seqs(rng, rows):
  """Histories of 1..MAX_LEN items, padded at the end with N_ITEMS."""
  len_seq = rng.integers(1, MAX_LEN + 1, rows).astype(np.int32)
  seq = np.full((rows, MAX_LEN), N_ITEMS, np.int32)
  for r in range(rows):
    seq[r, : len_seq[r]] = rng.choice(N_ITEMS, len_seq[r], replace=False)
  return seq, len_seq


def _batch(rng, rows=3, t=24):
  """A micro-batch: random tokens, row 2 right-padded by 2; item ids (N_ITEMS elsewhere) at
  three positions of rows 0 and 1; targets: row 0 at 5.. (more than the 3 slots, and enough
  that an unstable sort would pick others than the first), row 1 at the last two and 0
  (position 0 predicts nothing), row 2 none."""
  seq, len_seq = _seqs(rng, rows)
  ids = rng.integers(0, LLAMA.vocab_size, (rows, t)).astype(np.int32)
  attention = np.ones((rows, t), np.int32)
  attention[2, -2:] = 0
  item_ids = np.full((rows, t), N_ITEMS, np.int32)
  item_ids[0, [1, 2]] = [3, 0]
  item_ids[1, [3]] = [8]
  loss_mask = np.zeros((rows, t), np.int32)
  loss_mask[0, 5:] = 1
  loss_mask[1, [0, t - 2, t - 1]] = 1
  return dict(input_ids=ids, attention=attention, item_ids=item_ids, loss_mask=loss_mask,
              seq=seq, len_seq=len_seq)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
  rng = np.random.default_rng(0)
  parts = _parts(_BatchNormRouter(E))
  sas = nn.meta.unbox(
    jax.eval_shape(
      lambda k: parts.sasrec.init(k, jnp.zeros((1, MAX_LEN), jnp.int32), jnp.ones(1, jnp.int32)),
      jax.random.key(0),
    )["params"]
  )
  sas = _filled(sas, rng, 0.5)
  base = _filled(llama.abstract_params(LLAMA), rng, 0.3)
  adapter = train_ilora._adapter_only(
    _filled(llama.abstract_params(LLAMA, parts.model.module.adapter, E), rng, 0.3)
  )  # Non-zero B: the gate changes the outputs.
  router_params, proj, stats = train_ilora.init_router_projector(
    parts.router, parts.projector, SAS_HIDDEN, jax.random.key(1), jax.random.key(2)
  )
  router_params = _filled(router_params, rng, 0.7)
  stats = {"bn": {"mean": jnp.asarray(rng.standard_normal(E), jnp.float32),
                  "var": jnp.asarray(rng.uniform(0.5, 2.0, E), jnp.float32)}}  # fmt: skip
  trainable = {"lora": adapter, "router": router_params, "projector": proj}
  frozen = {"sasrec": sas, "llm": base}
  return types.SimpleNamespace(parts=parts, trainable=trainable, stats=stats, frozen=frozen)


def _users(tiny, seq, len_seq):
  return np.asarray(
    tiny.parts.sasrec.apply({"params": tiny.frozen["sasrec"]}, seq, len_seq, method="user_vector"),
    np.float64,
  )


def _projected(tiny, item_ids):
  """The projector in numpy: Linear, exact GELU, Linear of SASRec's item table rows."""
  p = _np(tiny.trainable["projector"])
  table = np.asarray(tiny.frozen["sasrec"]["item_embeddings"]["embedding"], np.float64)
  x = _gelu(table[item_ids] @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  return x @ p["fc2"]["kernel"] + p["fc2"]["bias"]


# ----------------------------------------------------------------------------- gate and inputs


def test_gate_weights_by_router_mode_and_fixed_kinds(tiny):
  seq, len_seq = _seqs(np.random.default_rng(1), 5)
  users = _users(tiny, seq, len_seq)

  def gate(parts, kind, train, stats):
    fn = jax.jit(lambda t, s, f, q, n: train_ilora.gate_weights(parts, t, s, f, q, n, train, kind))
    g, new = fn(tiny.trainable, stats, tiny.frozen, seq, len_seq)
    chex.assert_shape(g, (5, E))
    return np.asarray(g), _np(new)

  # Training: the batch's statistics, and the running ones move.
  got, new = gate(tiny.parts, "router", True, tiny.stats)
  want, want_stats = _router_np(tiny.trainable["router"], tiny.stats, users, True)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(new, want_stats, rtol=1e-5, atol=1e-6)
  # Evaluation: the running statistics, kept.
  got, new = gate(tiny.parts, "router", False, tiny.stats)
  want, _ = _router_np(tiny.trainable["router"], tiny.stats, users, False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_equal(new, _np(tiny.stats))
  # A router without statistics, in training too.
  linear = dataclasses.replace(tiny.parts, router=_Linear(E))
  head = {"head": tiny.trainable["router"]["head"]}
  trainable = dict(tiny.trainable, router=head)
  for train in (True, False):
    fn = jax.jit(
      lambda t, f, train=train: train_ilora.gate_weights(
        linear, t, {}, f, seq, len_seq, train, "router"
      )
    )
    got, new = fn(trainable, tiny.frozen)
    assert new == {}
    want = _softmax(users @ _np(head)["head"]["kernel"] + _np(head)["head"]["bias"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
  # Fixed gates: 1 / E each, or ones; the statistics untouched.
  for kind, value in (("uniform", 1 / E), ("constant", 1.0)):
    got, new = gate(tiny.parts, kind, True, tiny.stats)
    np.testing.assert_array_equal(got, np.full((5, E), value, np.float32))
    chex.assert_trees_all_equal(new, _np(tiny.stats))


def test_replacement_is_the_projected_item_embedding_where_an_item_is_named(tiny):
  item_ids = np.array([[N_ITEMS, 0, 4, N_ITEMS], [8, N_ITEMS, N_ITEMS, 8]], np.int32)
  mask, embeds = jax.jit(
    lambda t, f, i: train_ilora.replacement(tiny.parts, t, f, i)
  )(tiny.trainable, tiny.frozen, item_ids)  # fmt: skip
  chex.assert_shape(embeds, (2, 4, LLAMA.hidden_size))
  chex.assert_type(mask, bool)
  mask = np.asarray(mask)
  np.testing.assert_array_equal(mask, item_ids != N_ITEMS)
  want = _projected(tiny, item_ids[mask])  # Elsewhere the embeddings are not read.
  np.testing.assert_allclose(np.asarray(embeds)[mask], want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the loss


def _want_nll(tiny, batch, gate, key, slots):
  """(row, -log p) of the first `slots` target tokens of each row: log softmax (numpy, float64)
  of the model's full logits at the position before each target token, the gate and the
  projected embeddings given, dropout on with `key` (None: off)."""
  mask = batch["item_ids"] != N_ITEMS
  embeds = np.zeros(mask.shape + (LLAMA.hidden_size,), np.float32)
  embeds[mask] = _projected(tiny, batch["item_ids"][mask])
  params = train_ilora._merge(tiny.frozen["llm"], tiny.trainable["lora"])
  logits = tiny.parts.model.module.apply(
    {"params": params}, batch["input_ids"], batch["attention"], gate_weights=jnp.asarray(gate),
    deterministic=key is None, replace_mask=mask, replace_embeds=embeds,
    rngs=None if key is None else {"dropout": key},
  )  # fmt: skip
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  rows, nll = [], []
  for r in range(logits.shape[0]):
    where = [t for t in range(1, logits.shape[1]) if batch["loss_mask"][r, t]][:slots]
    rows += [r] * len(where)
    nll += [-logp[r, t - 1, batch["input_ids"][r, t]] for t in where]
  return np.array(rows), np.array(nll)


@pytest.fixture(scope="module")
def loss_case(tiny):
  batch = _batch(np.random.default_rng(2))
  users = _users(tiny, batch["seq"], batch["len_seq"])
  gate, _ = _router_np(tiny.trainable["router"], tiny.stats, users, False)
  return batch, gate


def test_target_nll_is_the_first_slots_target_tokens_cross_entropy(tiny, loss_case):
  batch, gate = loss_case
  for unroll in (False, True):  # Unrolled layers: the same params and results.
    parts = dataclasses.replace(tiny.parts, unroll_train=unroll)
    nll, valid, new_stats, got_gate = jax.jit(
      lambda t, s, f, b, parts=parts: train_ilora.target_nll(
        parts, "router", t, s, f, b, jax.random.key(0), False
      )
    )(tiny.trainable, tiny.stats, tiny.frozen, batch)
    chex.assert_shape([nll, valid], (3, 3))
    chex.assert_type(valid, bool)
    rows, want = _want_nll(tiny, batch, gate, None, 3)
    # Row 0: its first 3 of 5 targets; row 1: 2 (position 0 is no target); row 2: none.
    np.testing.assert_array_equal(
      np.asarray(valid), [[True, True, True], [True, True, False], [False, False, False]]
    )
    np.testing.assert_allclose(np.asarray(nll)[np.asarray(valid)], want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_gate), gate, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_equal(_np(new_stats), _np(tiny.stats))


def test_loss_is_the_mean_over_target_tokens_and_dropout_follows_train_and_key(tiny, loss_case):
  batch, gate = loss_case
  parts = _parts(tiny.parts.router, dropout=0.5)
  loss = jax.jit(
    lambda t, s, f, b, key, train: train_ilora.loss_fn(parts, "router", t, s, f, b, key, train),
    static_argnums=5,
  )
  args = (tiny.trainable, tiny.stats, tiny.frozen, batch)
  eval_loss, (stats, got_gate) = loss(*args, jax.random.key(0), False)
  _, want = _want_nll(tiny, batch, gate, None, 3)
  assert len(want) == 5
  np.testing.assert_allclose(float(eval_loss), want.mean(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_gate), gate, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_equal(_np(stats), _np(tiny.stats))
  # Training: dropout with the given key, and the router in training mode.
  key = jax.random.key(5)
  train_loss, (stats, got_gate) = loss(*args, key, True)
  users = _users(tiny, batch["seq"], batch["len_seq"])
  train_gate, train_stats = _router_np(tiny.trainable["router"], tiny.stats, users, True)
  # (Batch statistics of 3 rows in float32: the gate within 1e-3.)
  np.testing.assert_allclose(np.asarray(got_gate), train_gate, atol=1e-3)
  chex.assert_trees_all_close(_np(stats), train_stats, rtol=1e-4, atol=1e-5)
  dropped = types.SimpleNamespace(**vars(tiny))
  dropped.parts = parts
  _, want = _want_nll(dropped, batch, np.asarray(got_gate), key, 3)
  np.testing.assert_allclose(float(train_loss), want.mean(), rtol=1e-5)
  assert abs(float(train_loss) - float(eval_loss)) > 1e-3
  other, _ = loss(*args, jax.random.key(6), True)
  assert abs(float(other) - float(train_loss)) > 1e-4
  # One target token: its own loss; none at all: a loss of 0, not NaN.
  one = np.zeros_like(batch["loss_mask"])
  one[1, -1] = 1
  one_loss = loss(*args[:3], dict(batch, loss_mask=one), key, False)[0]
  np.testing.assert_allclose(float(one_loss), _want_nll(tiny, dict(batch, loss_mask=one), gate,
                                                        None, 3)[1][0], rtol=1e-5)  # fmt: skip
  none = dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))
  assert float(loss(tiny.trainable, tiny.stats, tiny.frozen, none, key, False)[0]) == 0.0


# ----------------------------------------------------------------------------- the train step

LR, SGD_MOMENTUM, DECAY, START = 0.05, 0.5, 0.1, 3


def _make_tx(run):
  """Coupled L2 (it reads the params) and SGD with momentum (state carried between steps);
  non-finite updates skipped and counted."""
  sgd = optax.chain(optax.add_decayed_weights(DECAY), optax.sgd(run["lr"], SGD_MOMENTUM))
  return optax.apply_if_finite(sgd, 10)


@pytest.fixture(scope="module")
def stepping(tiny):
  parts = _parts(tiny.parts.router, dropout=0.5)
  rng = np.random.default_rng(3)
  micro = [_batch(rng), _batch(rng)]
  batch = jax.tree.map(lambda *x: np.stack(x), *micro)  # [accum 2, micro 3, ...]
  frozen = dict(tiny.frozen, run={"lr": np.float32(LR), "key": jax.random.PRNGKey(7)})
  state = {
    "trainable": tiny.trainable,
    "stats": tiny.stats,
    "opt_state": _make_tx({"lr": LR}).init(tiny.trainable),
    "step": jnp.int32(START),
  }
  step = jax.jit(train_ilora.make_train_step(parts, _make_tx, "router"))

  @jax.jit
  def micro_grad(trainable, stats, batch, key):
    fn = lambda t, s: train_ilora.loss_fn(parts, "router", t, s, frozen, batch, key, True)  # noqa: E731
    (loss, (stats, _)), grads = jax.value_and_grad(fn, has_aux=True)(trainable, stats)
    return loss, stats, grads

  return types.SimpleNamespace(parts=parts, micro=micro, batch=batch, frozen=frozen,
                               state=state, step=step, micro_grad=micro_grad)  # fmt: skip


def _reference(tiny, s, state):
  """Loss, mean gradient and statistics of a step from `state`: each micro-batch alone, with
  the key `fold_in(fold_in(run key, step), index)`, the statistics carried from one micro-batch
  to the next."""
  step_key = jax.random.fold_in(s.frozen["run"]["key"], state["step"])
  stats, losses, grads = state["stats"], [], []
  for a, mb in enumerate(s.micro):
    loss, stats, g = s.micro_grad(state["trainable"], stats, mb, jax.random.fold_in(step_key, a))
    losses.append(float(loss))
    grads.append(_np(g))
  return np.mean(losses), jax.tree.map(lambda a, b: (a + b) / 2, *grads), stats


def test_train_step_averages_micro_batches_and_applies_the_optimizer(tiny, stepping):
  s = stepping
  after, metrics = s.step(s.state, s.frozen, s.batch)
  loss, grad, stats = _reference(tiny, s, s.state)
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
  norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grad)))
  np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-4)
  # The statistics: micro-batch 0's update, then micro-batch 1's (numpy batch norm).
  users = [_users(tiny, mb["seq"], mb["len_seq"]) for mb in s.micro]
  g0, st = _router_np(tiny.trainable["router"], tiny.stats, users[0], True)
  g1, st = _router_np(tiny.trainable["router"], st, users[1], True)
  chex.assert_trees_all_close(_np(after["stats"]), st, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(_np(stats), st, rtol=1e-5, atol=1e-6)
  # Logged gates: the mean gate and mean entropy of every row of the step.
  gates = np.concatenate([g0, g1])
  np.testing.assert_allclose(np.asarray(metrics["gate_mean"]), gates.mean(0), rtol=1e-4)
  entropy = np.mean(-np.sum(gates * np.log(gates), -1))
  np.testing.assert_allclose(float(metrics["gate_entropy"]), entropy, rtol=1e-4)
  assert int(metrics["skipped"]) == 0 and int(after["step"]) == START + 1
  # SGD on g + decay * p: p1 = p0 - lr * d0, then p1 - lr * (d1 + momentum * d0).
  p0 = _np(tiny.trainable)
  d0 = jax.tree.map(lambda p, g: g + DECAY * p, p0, grad)
  p1 = jax.tree.map(lambda p, d: p - LR * d, p0, d0)
  chex.assert_trees_all_close(_np(after["trainable"]), p1, rtol=1e-4, atol=1e-6)
  again, _ = s.step(after, s.frozen, s.batch)
  _, grad2, _ = _reference(tiny, s, after)
  d1 = jax.tree.map(lambda p, g: g + DECAY * p, p1, grad2)
  want = jax.tree.map(lambda p, d, d0: p - LR * (d + SGD_MOMENTUM * d0), p1, d1, d0)
  chex.assert_trees_all_close(_np(again["trainable"]), want, rtol=1e-4, atol=1e-6)
  # Every group moved (placeholders: the projector too; non-zero B: A and the router). Leaves
  # of E values left out: the router's dense bias has no gradient through the batch norm.
  for group in ("lora", "router", "projector"):
    pairs = zip(jax.tree.leaves(after["trainable"][group]), jax.tree.leaves(p0[group]))
    assert all(not np.allclose(np.asarray(a), b) for a, b in pairs if a.size > E), group


def test_a_non_finite_step_changes_nothing_and_is_counted(tiny, stepping):
  """A NaN projector: the loss is NaN, the weights and router statistics stay, one skip."""
  s = stepping
  state = dict(s.state, trainable=dict(tiny.trainable))
  state["trainable"]["projector"] = jax.tree.map(lambda x: x * np.nan, tiny.trainable["projector"])
  after, metrics = s.step(state, s.frozen, s.batch)
  assert not np.isfinite(float(metrics["loss"]))
  chex.assert_trees_all_equal(_np(after["stats"]), _np(tiny.stats))
  for group in ("lora", "router"):
    chex.assert_trees_all_equal(_np(after["trainable"][group]), _np(tiny.trainable[group]))
  assert int(metrics["skipped"]) == 1 and int(after["opt_state"].total_notfinite) == 1


def test_a_finite_loss_with_a_non_finite_gradient_is_a_bad_step(tiny, stepping):
  """An infinite projector weight on prompts without item placeholders: the loss does not read
  the projector (finite) but its gradient is NaN (0 x inf). The update is skipped, the router
  statistics stay, and the step says it was not finite (what the loop counts)."""
  s = stepping
  batch = dict(s.batch, item_ids=np.full_like(s.batch["item_ids"], N_ITEMS))
  state = dict(s.state, trainable=dict(tiny.trainable))
  state["trainable"]["projector"] = jax.tree.map(lambda x: x * np.inf, tiny.trainable["projector"])
  after, metrics = s.step(state, s.frozen, batch)
  assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
  assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1
  chex.assert_trees_all_equal(_np(after["stats"]), _np(tiny.stats))
  for group in ("lora", "router"):
    chex.assert_trees_all_equal(_np(after["trainable"][group]), _np(tiny.trainable[group]))
  _, clean = s.step(dict(s.state, trainable=tiny.trainable), s.frozen, batch)
  assert bool(clean["finite"]) and int(clean["skipped"]) == 0


def test_one_hot_gates_have_zero_entropy(tiny, stepping):
  """A router saturated to exact 0 and 1: each row's entropy is 0 (0 log 0 = 0), not NaN."""
  s = stepping
  router = jax.tree.map(lambda x: x, tiny.trainable["router"])
  router["bn"] = {"scale": jnp.full(E, 1e4, jnp.float32), "bias": jnp.zeros(E, jnp.float32)}
  state = dict(s.state, trainable=dict(tiny.trainable, router=router))
  _, metrics = s.step(state, s.frozen, s.batch)
  rows = 2 * 3  # accum x micro
  assert np.isin(np.asarray(metrics["gate_mean"]) * rows, np.arange(rows + 1)).all()  # One-hot
  assert 0.0 <= float(metrics["gate_entropy"]) < 1e-6 and np.isfinite(float(metrics["loss"]))


# ----------------------------------------------------------------------------- initialisation


def test_init_trainable_places_zero_b_random_a_router_projector_and_statistics(tiny):
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  parts = tiny.parts
  trainable, stats = train_ilora.init_trainable(parts, mesh, (), 4)
  assert set(trainable) == {"lora", "router", "projector"}
  adapter = traverse_util.flatten_dict(trainable["lora"])
  want = traverse_util.flatten_dict(
    nn.meta.unbox(llama.abstract_params(LLAMA, parts.model.module.adapter, E))
  )
  assert set(adapter) == {k for k in want if "adapter" in k}  # The adapters only.
  for k, v in adapter.items():
    chex.assert_shape(v, want[k].shape)
    fan_in = v.shape[-2]
    if k[-1] == "lora_b":
      np.testing.assert_array_equal(np.asarray(v), 0.0)
    else:  # torch's nn.Linear init: uniform within 1 / sqrt(fan_in).
      assert 0 < np.abs(np.asarray(v)).max() <= 1 / math.sqrt(fan_in)
  chex.assert_trees_all_equal_shapes(trainable["router"], tiny.trainable["router"])
  chex.assert_trees_all_equal_shapes(trainable["projector"], tiny.trainable["projector"])
  chex.assert_trees_all_equal(_np(stats), {"bn": {"mean": np.zeros(E), "var": np.ones(E)}})
  for leaf in jax.tree.leaves([trainable, stats]):
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
  # The seed decides every group; each group its own draw.
  same, _ = train_ilora.init_trainable(parts, mesh, (), 4)
  other, _ = train_ilora.init_trainable(parts, mesh, (), 5)
  chex.assert_trees_all_equal(same, trainable)
  for group in trainable:
    pairs = zip(jax.tree.leaves(trainable[group]), jax.tree.leaves(other[group]))
    assert any(not np.array_equal(a, b) for a, b in pairs), group


def test_init_router_projector_shapes_and_statistics(tiny):
  router, proj, stats = train_ilora.init_router_projector(
    _Linear(E), tiny.parts.projector, SAS_HIDDEN, jax.random.key(0), jax.random.key(1)
  )
  chex.assert_shape(router["head"]["kernel"], (SAS_HIDDEN, E))
  chex.assert_shape(proj["fc1"]["kernel"], (SAS_HIDDEN, LLAMA.hidden_size))
  chex.assert_shape(proj["fc2"]["kernel"], (LLAMA.hidden_size, LLAMA.hidden_size))
  assert stats == {}


# ----------------------------------------------------------------------------- gate table


def test_save_gate_table_writes_every_rows_eval_gate_and_user(tiny, tmp_path):
  seq, len_seq = _seqs(np.random.default_rng(4), 5)
  group = np.array([2, 0, 1, 0, 2])
  split = Split("val", seq, len_seq, np.zeros(5, np.int32), group)
  train_ilora.save_gate_table(
    tiny.parts, tiny.trainable, tiny.stats, tiny.frozen, split, "router", str(tmp_path), batch=2
  )
  out = np.load(tmp_path / "report" / "gates.npz")
  users = _users(tiny, seq, len_seq)
  want, _ = _router_np(tiny.trainable["router"], tiny.stats, users, False)
  chex.assert_shape([out["gates"]], (5, E))
  np.testing.assert_allclose(out["gates"], want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out["users"], users, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["groups"], group)
  train_ilora.save_gate_table(
    tiny.parts, tiny.trainable, tiny.stats, tiny.frozen, Split("v", seq, len_seq, len_seq),
    "uniform", str(tmp_path),
  )  # fmt: skip
  out = np.load(tmp_path / "report" / "gates.npz")
  assert set(out.files) == {"gates", "users"}
  np.testing.assert_array_equal(out["gates"], np.full((5, E), 1 / E, np.float32))
