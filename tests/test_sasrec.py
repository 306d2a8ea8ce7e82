"""Flax SASRec: shapes, masking, and parity with the original's checkpoints."""

import dataclasses
import json
import os
import pickle
import re
import shutil
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sasrec_numpy_reference as reference
from conftest import (
  TINY,
  assert_one_line_error,
  metrics_records,
  run_cli,
  shared_path,
  tiny_sasrec_pt,
)

from ilora_jax import data, metrics, sasrec, torch_checkpoint
from ilora_jax.errors import UserError

CFG = sasrec.SASRecConfig(n_items=30, hidden=16, max_len=10)


def _batch():
  seq = np.full((3, 10), 30, np.int32)
  seq[0, :3] = [1, 2, 3]
  seq[1, :10] = np.arange(10, 20)
  seq[2, :1] = [7]
  return jnp.asarray(seq), jnp.asarray([3, 10, 1], jnp.int32)


def test_output_shapes():
  params = sasrec.init_params(CFG, jax.random.PRNGKey(0))
  seq, lens = _batch()
  model = sasrec.SASRec(CFG)
  chex.assert_shape(model.apply({"params": params}, seq, lens), (3, 30))
  chex.assert_shape(model.apply({"params": params}, seq, lens, method="user_vector"), (3, 16))
  chex.assert_shape(model.apply({"params": params}, seq, method="hidden_states"), (3, 10, 16))
  chex.assert_shape(
    model.apply({"params": params}, seq[:, :2], method="item_embedding"), (3, 2, 16)
  )


def test_padding_and_future_items_do_not_change_the_user_vector():
  params = sasrec.init_params(CFG, jax.random.PRNGKey(1))
  model = sasrec.SASRec(CFG)
  seq, lens = _batch()
  base = model.apply({"params": params}, seq, lens, method="user_vector")
  # Item embeddings of the padding row change nothing (padding is masked out) ...
  params2 = jax.tree.map(lambda x: x, params)
  table = params2["item_embeddings"]["embedding"]
  params2["item_embeddings"]["embedding"] = table.at[30].set(5.0)
  chex.assert_trees_all_close(
    model.apply({"params": params2}, seq, lens, method="user_vector"), base, atol=1e-6
  )
  # ... and neither do items after the last real one (causality): fill the padding of row 0.
  seq_future = seq.at[0, 3:].set(jnp.arange(20, 27))
  out = model.apply({"params": params}, seq_future, lens, method="user_vector")
  chex.assert_trees_all_close(out[0], base[0], atol=1e-6)


def test_dropout_only_in_training():
  params = sasrec.init_params(CFG, jax.random.PRNGKey(2))
  model = sasrec.SASRec(CFG)
  seq, lens = _batch()
  a = model.apply(
    {"params": params}, seq, lens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}
  )
  b = model.apply({"params": params}, seq, lens)
  assert not np.allclose(a, b)


def test_runs_of_other_seeds_and_rates_share_one_compiled_train_step():
  """The learning rate and the dropout seed reach the stage's train step as inputs
  (`run_inputs`), not as constants: runs differing only in them (an experiment grid's seeds)
  lower to one program. They still act: Adam's first update is -lr * m / (sqrt(v) + eps)
  with bias-corrected moments of the same gradient, so with the same seed the updates scale
  exactly with the rate, and another seed's dropout masks give another gradient."""
  import ml_collections

  from ilora_jax import sharding, train_sasrec

  mesh = sharding.make_mesh(
    ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1]
  )  # One device: the batch's 3 rows.
  model = sasrec.SASRec(CFG)
  # Host copies: each call places a new state, which the step donates.
  params = jax.tree.map(np.asarray, sasrec.init_params(CFG, jax.random.PRNGKey(0)))
  fresh = lambda: jax.device_put(  # noqa: E731
    train_sasrec.new_state(params, train_sasrec.make_optimizer(1e-3, 0.0)),
    sharding.replicated(mesh),
  )
  step = train_sasrec.jit_train_step(train_sasrec.make_train_step(model, 0.0), fresh(), mesh)
  seq, lens = _batch()
  nxt = jnp.asarray([4, 20, 8], jnp.int32)
  texts, deltas = [], []
  for lr, seed in ((1e-3, 0), (4e-3, 0), (1e-3, 5)):
    run = train_sasrec.run_inputs(lr, seed, mesh)
    texts.append(step.lower(fresh(), run, seq, lens, nxt).as_text())
    new, loss, ok = step(fresh(), run, seq, lens, nxt)
    assert np.isfinite(float(loss)) and bool(ok)
    table = np.asarray(new["params"]["item_embeddings"]["embedding"])
    deltas.append(table - params["item_embeddings"]["embedding"])
  assert texts[0] == texts[1] == texts[2]
  assert np.abs(deltas[0]).max() > 0
  np.testing.assert_allclose(deltas[1], 4 * deltas[0], rtol=1e-3, atol=1e-9)
  assert not np.allclose(deltas[2], deltas[0], rtol=1e-3, atol=1e-9)


def test_a_non_finite_step_changes_nothing_but_the_step_count():
  """A step with a non-finite loss, update or Adam moment is dropped (flag False): the
  parameters and Adam's moments stay bit for bit those before it, and only the step count
  moves. The cases: one infinite weight in the positional table (the loss is NaN); a
  weight decay of 1e38, whose term wd * w overflows the gradient to inf while the loss, of
  the old weights, is finite (the update is then NaN); an infinite second moment (the update
  is 0 and the weights stay finite, but the state is broken). The same batch with none of
  these applies its update."""
  import ml_collections

  from ilora_jax import sharding, train_sasrec

  mesh = sharding.make_mesh(
    ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1]
  )
  model = sasrec.SASRec(CFG)
  params = jax.tree.map(np.array, sasrec.init_params(CFG, jax.random.PRNGKey(0)))
  seq, lens = _batch()
  nxt = jnp.asarray([4, 20, 8], jnp.int32)
  run = train_sasrec.run_inputs(1e-3, 0, mesh)
  steps = {}
  for case, decay, finite_loss, applied in (
    ("clean", 0.0, True, True),
    ("inf_weight", 0.0, False, False),
    ("huge_decay", 1e38, True, False),
    ("inf_moment", 0.0, True, False),
  ):
    p = jax.tree.map(np.copy, params)
    if case == "inf_weight":
      p["positional_embeddings"]["embedding"][0, 0] = np.inf
    if case == "huge_decay":
      p["item_embeddings"]["embedding"][:] = 10.0  # 1e38 * 10 overflows float32.
    state = train_sasrec.new_state(p, train_sasrec.make_optimizer(1e-3, decay))
    before = jax.tree.map(np.array, state)
    if case == "inf_moment":
      adam = before["opt_state"][1][0]  # chain(add_decayed_weights, adam): adam's state.
      adam.nu["s_fc"]["bias"][0] = np.inf
    placed = jax.device_put(before, sharding.replicated(mesh))
    if decay not in steps:
      steps[decay] = train_sasrec.jit_train_step(
        train_sasrec.make_train_step(model, decay), placed, mesh
      )
    new, loss, ok = steps[decay](placed, run, seq, lens, nxt)
    new = jax.tree.map(np.asarray, new)
    assert bool(ok) == applied and np.isfinite(float(loss)) == finite_loss, case
    assert int(new["step"]) == 1
    same = np.array_equal(new["params"]["item_embeddings"]["embedding"],
                          before["params"]["item_embeddings"]["embedding"])  # fmt: skip
    assert same != applied, case
    if not applied:
      chex.assert_trees_all_equal(new["params"], before["params"])
      chex.assert_trees_all_equal(new["opt_state"], before["opt_state"])


def test_three_optimizer_steps_match_torch_adam_with_coupled_weight_decay():
  """The SASRec optimizer is the original's torch Adam(lr, weight_decay=wd) (REFERENCE.md):
  wd * param is added to the gradient before Adam's moments (coupled L2, not AdamW). Three
  updates of make_optimizer on the SASRec parameter tree against torch.optim.Adam (float64)
  on the same tensors and gradients. The decay (0.5) and gradients (about as large as wd *
  param) are sized so that the decay term moves every update: at the config's 1e-4 Adam's
  normalised steps would hardly show it."""
  torch = pytest.importorskip("torch")
  from ilora_jax import train_sasrec

  rng = np.random.default_rng(11)
  shapes = jax.tree.map(np.shape, sasrec.init_params(CFG, jax.random.PRNGKey(0)))
  params = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes)
  grads = [
    jax.tree.map(lambda s: (0.5 * rng.standard_normal(s)).astype(np.float32), shapes)
    for _ in range(3)
  ]
  lr, wd = 1e-3, 0.5
  tx = train_sasrec.make_optimizer(lr, wd)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  leaves, treedef = jax.tree.flatten(params)
  tensors = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in leaves]
  adam = torch.optim.Adam(tensors, lr=lr, weight_decay=wd)
  moved = jax.tree.map(np.zeros_like, params)  # The updates' sum, kept apart from the
  # weights (about 1), whose float32 rounding would swamp a change of 1e-3 at 1e-4.
  for t, g in enumerate(grads):
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
    moved = jax.tree.map(lambda m, u: m + np.asarray(u, np.float64), moved, updates)
    for tensor, gl in zip(tensors, jax.tree.leaves(g)):
      tensor.grad = torch.tensor(gl, dtype=torch.float64)
    adam.step()
    want = jax.tree.unflatten(treedef, [x.detach().numpy() for x in tensors])
    for got_l, want_l, start in zip(jax.tree.leaves(moved), jax.tree.leaves(want), leaves):
      np.testing.assert_allclose(got_l, want_l - start, rtol=1e-4, atol=1e-9, err_msg=f"{t}")


def _random_params(cfg, seed: int):
  """Initialised parameters plus noise, so that LayerNorms and biases are not the identity
  and every term of the forward matters."""
  params = sasrec.init_params(cfg, jax.random.PRNGKey(seed))
  return jax.tree.map(
    lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), params
  )


def _torch_names(params) -> dict[str, np.ndarray]:
  """The Flax tree under the original's state_dict names and layouts (float64), for the
  numpy forwards."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  flat = {
    "item_embeddings.weight": p["item_embeddings"]["embedding"],
    "positional_embeddings.weight": p["positional_embeddings"]["embedding"],
    "s_fc.weight": p["s_fc"]["kernel"].T,
    "s_fc.bias": p["s_fc"]["bias"],
  }
  for ln in ("ln_1", "ln_2", "ln_3"):
    flat[f"{ln}.weight"], flat[f"{ln}.bias"] = p[ln]["scale"], p[ln]["bias"]
  for k in ("linear_q", "linear_k", "linear_v"):
    flat[f"mh_attn.{k}.weight"] = p["mh_attn"][k]["kernel"].T
    flat[f"mh_attn.{k}.bias"] = p["mh_attn"][k]["bias"]
  for k in ("w_1", "w_2"):
    flat[f"feed_forward.{k}.weight"] = p["feed_forward"][k]["kernel"].T[:, :, None]
    flat[f"feed_forward.{k}.bias"] = p["feed_forward"][k]["bias"]
  flat["feed_forward.layer_norm.weight"] = p["feed_forward"]["layer_norm"]["scale"]
  flat["feed_forward.layer_norm.bias"] = p["feed_forward"]["layer_norm"]["bias"]
  return flat


def test_matches_independent_numpy_formula_on_random_params():
  params = _random_params(CFG, 3)
  seq, lens = _batch()
  ours = sasrec.SASRec(CFG).apply({"params": params}, seq, lens)
  theirs = reference.item_scores(_torch_names(params), np.asarray(seq), np.asarray(lens), 30)
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


def test_multi_head_attention_matches_the_original_formula():
  """config.sasrec.num_heads > 1 (the checkpoints have one head; a model trained here may
  have more): each head attends over its slice of the hidden axis, scaled by 1/sqrt(hidden)
  as the original does (not 1/sqrt(hidden / heads)), and the heads' outputs are concatenated
  in order."""
  seq, lens = _batch()
  cfg = sasrec.SASRecConfig(n_items=30, hidden=16, max_len=10, num_heads=4)
  params = _random_params(cfg, 5)
  params["mh_attn"] = jax.tree.map(lambda x: 3 * x, params["mh_attn"])  # Peakier attention.
  ours = sasrec.SASRec(cfg).apply({"params": params}, seq, lens, method="user_vector")
  theirs = reference.user_vectors(_torch_names(params), seq, lens, 30, heads=4)
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


def test_dropout_acts_where_the_original_drops():
  """In training the original drops at three places, each at config.sasrec.dropout: the
  summed item and position embeddings (before the padding mask), the attention weights and
  the feed-forward output before its residual; at evaluation nowhere. Each dropout of a
  training forward is replaced in turn by a multiplication by 2 (what a mask keeping every
  entry at rate 0.5 does), and the user vectors must be the numpy forward's with that site
  scaled."""
  import flax.linen as nn

  cfg = sasrec.SASRecConfig(n_items=30, hidden=16, max_len=10, dropout=0.25)
  params = _random_params(cfg, 7)
  flat = _torch_names(params)
  seq, lens = _batch()
  model = sasrec.SASRec(cfg)

  def forward(site: int | None, deterministic: bool):
    calls = []

    def interceptor(next_fun, args, kwargs, context):
      if not isinstance(context.module, nn.Dropout) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      det = args[1] if len(args) > 1 else kwargs.get("deterministic")
      det = context.module.deterministic if det is None else det
      if det or context.module.rate == 0:
        return args[0]
      calls.append(context.module.rate)
      return args[0] * (2.0 if len(calls) - 1 == site else 1.0)

    with nn.intercept_methods(interceptor):
      out = model.apply({"params": params}, seq, lens, deterministic, method="user_vector",
                        rngs={"dropout": jax.random.PRNGKey(0)})  # fmt: skip
    return np.asarray(out), calls

  clean = reference.user_vectors(flat, seq, lens, 30)
  out, calls = forward(None, deterministic=True)
  assert calls == []  # No dropout at evaluation.
  np.testing.assert_allclose(out, clean, rtol=1e-4, atol=1e-4)
  for site, name in enumerate(("emb", "attn", "ff")):
    out, calls = forward(site, deterministic=False)
    assert calls == [0.25, 0.25, 0.25], (name, calls)
    want = reference.user_vectors(flat, seq, lens, 30, dropout={name: 2.0})
    assert np.abs(want - clean).max() > 1e-2, name  # The site matters here.
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4, err_msg=name)


def _log_softmax_loss(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per-row cross-entropy of `labels` under softmax(`scores`), in float64."""
  top = scores.max(-1, keepdims=True)
  log_z = top[:, 0] + np.log(np.exp(scores - top).sum(-1))
  return log_z - scores[np.arange(len(labels)), labels]


def test_evaluator_scores_every_row_once_as_the_formulas_say():
  """The SASRec stage's val/test numbers: 5 rows in batches of 2 (the last batch padded by
  wrapping around), 20 candidates each, the model at evaluation (the config's dropout 0.1
  inactive). Each row's target is picked among its candidates by the numpy reference's scores
  to rank 0, 1, 3, 4 and 12; expected: hr@k = share of ranks < k, ndcg@5 = mean of
  1/log2(rank + 2) over the hits, mrr = mean 1/(rank + 1), loss = mean cross-entropy of
  `next` over all items."""
  from ilora_jax import train_sasrec

  rng = np.random.default_rng(3)
  rows = 5
  seq = np.full((rows, 10), 30, np.int32)
  lens = np.array([3, 10, 1, 6, 4], np.int32)
  for r, n in enumerate(lens):
    seq[r, :n] = rng.choice(30, n, replace=False)
  cands = np.stack([rng.choice(30, 20, replace=False) for _ in range(rows)]).astype(np.int32)
  params = _random_params(CFG, 11)
  scores = reference.item_scores(_torch_names(params), seq, lens, 30)  # [rows, 30]
  picked = np.take_along_axis(scores, cands, 1)
  assert all(len(set(np.round(row, 6))) == 20 for row in picked)  # No ties.
  ranks = np.array([0, 1, 3, 4, 12])
  target = np.argsort(-picked, axis=1)[np.arange(rows), ranks].astype(np.int32)
  nxt = cands[np.arange(rows), target]
  split = data.Split("val", seq, lens, nxt)
  evaluator = train_sasrec.Evaluator(sasrec.SASRec(CFG), split, cands, target, 2, None, False)
  got = evaluator(params)

  want = {
    "hr@1": 1 / 5,
    "hr@5": 4 / 5,
    "ndcg@5": (1 + 1 / np.log2(3) + 1 / np.log2(5) + 1 / np.log2(6)) / 5,
    "mrr": (1 + 1 / 2 + 1 / 4 + 1 / 5 + 1 / 13) / 5,
    "loss": _log_softmax_loss(scores, nxt).mean(),
  }
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_train_step_loss_is_the_mean_cross_entropy_of_the_next_item():
  """The train step's loss (logged as the train loss, and what Adam's coupled weight decay is
  weighed against) is the batch's mean cross-entropy of `next` under the scores over all
  items, at the user vector: with dropout 0 it is the numpy reference's, computed by hand."""
  from ilora_jax import train_sasrec

  cfg = sasrec.SASRecConfig(n_items=30, hidden=16, max_len=10, dropout=0.0)
  params = _random_params(cfg, 13)
  seq, lens = _batch()
  nxt = jnp.asarray([4, 20, 8], jnp.int32)
  state = train_sasrec.new_state(params, train_sasrec.make_optimizer(1e-3, 0.0))
  run = {"lr": np.float32(1e-3), "key": jax.random.PRNGKey(0)}
  step = jax.jit(train_sasrec.make_train_step(sasrec.SASRec(cfg), 0.0))
  _, loss, ok = step(state, run, seq, lens, nxt)
  scores = reference.item_scores(_torch_names(params), np.asarray(seq), np.asarray(lens), 30)
  assert bool(ok)
  assert float(loss) == pytest.approx(_log_softmax_loss(scores, np.asarray(nxt)).mean(), rel=1e-5)


def test_each_train_step_draws_its_own_dropout():
  """Dropout keys are the run's key folded with the step: the same state and batch give the
  same loss at one step and another loss (other masks) at the next step count."""
  from ilora_jax import train_sasrec

  cfg = sasrec.SASRecConfig(n_items=30, hidden=16, max_len=10, dropout=0.5)
  params = _random_params(cfg, 17)
  seq, lens = _batch()
  nxt = jnp.asarray([4, 20, 8], jnp.int32)
  run = {"lr": np.float32(1e-3), "key": jax.random.PRNGKey(0)}
  step = jax.jit(train_sasrec.make_train_step(sasrec.SASRec(cfg), 0.0))
  losses = []
  for at in (0, 0, 1):
    state = train_sasrec.new_state(params, train_sasrec.make_optimizer(1e-3, 0.0))
    state["step"] = jnp.asarray(at, jnp.int32)
    losses.append(float(step(state, run, seq, lens, nxt)[1]))
  assert losses[0] == losses[1] != losses[2]


@pytest.mark.parametrize(
  "name,n_items,folder",
  [("lastfm", 4606, "lastfm"), ("movielens", 1682, "movielens"), ("steam", 3581, "steam")],
)
def test_converted_checkpoint_reproduces_the_original_forward(name, n_items, folder):
  path = shared_path("checkpoints", "sasrec", f"{name}.pt")
  val = data.load_split(shared_path("data", folder, "Val_data.df"), "val", n_items, 10, 3)
  raw = {
    k: v.astype(np.float64)
    for k, v in torch_checkpoint.flat_parameters(torch_checkpoint.load_module(path)).items()
  }
  expected = reference.item_scores(raw, val.seq, val.len_seq, n_items)
  cfg = sasrec.SASRecConfig(n_items=n_items)
  params = sasrec.params_from_torch(path, cfg)
  ours = np.asarray(sasrec.SASRec(cfg).apply({"params": params}, val.seq, val.len_seq))
  assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


def test_converted_lastfm_scores_the_recorded_validation_hr1():
  """REFERENCE.md: the original's lastfm.pt scores HR@1 0.270 on val (mean over draws)."""
  path = shared_path("checkpoints", "sasrec", "lastfm.pt")
  val = data.load_split(shared_path("data", "lastfm", "Val_data.df"), "val", 4606, 10, 3)
  cfg = sasrec.SASRecConfig(n_items=4606)
  params = sasrec.params_from_torch(path, cfg)
  scores = np.asarray(sasrec.SASRec(cfg).apply({"params": params}, val.seq, val.len_seq))
  hr1 = []
  for seed in range(20):
    cands, target = data.sample_candidates(val, 4606, 20, seed)
    ranks = metrics.target_ranks(np.take_along_axis(scores, cands, 1), target)
    hr1.append(metrics.ranking_metrics(ranks)["hr@1"])
  # 20 draws: standard error about 0.025 / sqrt(20) plus row noise; 0.04 is generous.
  assert abs(np.mean(hr1) - 0.270) < 0.04, np.mean(hr1)


def test_checkpoint_for_other_item_count_is_rejected():
  path = shared_path("checkpoints", "sasrec", "movielens.pt")
  with pytest.raises(UserError, match="trained on 1682 items"):
    sasrec.params_from_torch(path, sasrec.SASRecConfig(n_items=4606))


def test_checkpoint_trained_with_other_heads_is_rejected():
  path = shared_path("checkpoints", "sasrec", "lastfm.pt")  # Its attention records 1 head.
  with pytest.raises(UserError, match=r"trained with 1 attention head\(s\): set .*num_heads=1"):
    sasrec.params_from_torch(path, sasrec.SASRecConfig(n_items=4606, num_heads=2))


def test_checkpoint_with_a_nan_weight_is_refused(tmp_path):
  """The real LastFM checkpoint with one NaN written into its item embeddings (the storage
  of 4607 x 64 float32) is refused by name, not evaluated into NaN scores."""
  real = shared_path("checkpoints", "sasrec", "lastfm.pt")
  broken = tmp_path / "nan.pt"
  with zipfile.ZipFile(real) as src, zipfile.ZipFile(broken, "w") as dst:
    for info in src.infolist():
      payload = src.read(info)
      if info.file_size == 4607 * 64 * 4:
        values = np.frombuffer(payload, np.float32).copy()
        values[64 * 7 + 3] = np.nan
        payload = values.tobytes()
      dst.writestr(info, payload)
  sasrec.params_from_torch(real, sasrec.SASRecConfig(n_items=4606))  # The original loads.
  with pytest.raises(UserError, match=r"item_embeddings.weight holds 1 NaN or infinite value"):
    sasrec.params_from_torch(str(broken), sasrec.SASRecConfig(n_items=4606))


class _RunsCode:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    import os

    return (os.system, (f"touch {self.target}",))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"x": _RunsCode(marker)}, protocol=2))
  with pytest.raises(UserError, match="refusing to load"):
    torch_checkpoint.load_module(str(path))
  assert not marker.exists()


def test_truncated_and_non_zip_checkpoints(tmp_path):
  real = open(shared_path("checkpoints", "sasrec", "movielens.pt"), "rb").read()
  cut = tmp_path / "cut.pt"
  cut.write_bytes(real[: len(real) // 2])
  with pytest.raises(UserError, match="corrupt or truncated"):
    torch_checkpoint.load_module(str(cut))
  junk = tmp_path / "junk.pt"
  junk.write_bytes(b"not a zip" * 10)
  with pytest.raises(UserError, match="corrupt or truncated"):
    torch_checkpoint.load_module(str(junk))


def test_reads_checkpoint_written_by_torch(tmp_path):
  """A module saved by real torch.save reads back to the same numbers (torch is test-only)."""
  torch = pytest.importorskip("torch")
  net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
  path = tmp_path / "net.pt"
  torch.save(net, path)
  flat = torch_checkpoint.flat_parameters(torch_checkpoint.load_module(str(path)))
  for name, value in net.state_dict().items():
    np.testing.assert_array_equal(flat[name], value.numpy())
  # Its state_dict alone is refused, saying what it is and why a module is needed.
  torch.save(net.state_dict(), tmp_path / "state.pt")
  said = "holds an OrderedDict (a state_dict?), expected a pickled module: the original saves"
  with pytest.raises(UserError, match=re.escape(said)):
    torch_checkpoint.load_module(str(tmp_path / "state.pt"))


def _sasrec(workdir, init_from: str, stop_after: int):
  """The tiny config's SASRec stage in `workdir` from `init_from`, stopped after a few steps."""
  return run_cli(TINY, f"--workdir={workdir}", "--config.stage=sasrec",
                 f"--config.sasrec.init_from={init_from}",
                 f"--config.train.stop_after_steps={stop_after}")  # fmt: skip


@pytest.fixture(scope="module")
def started(tmp_path_factory):
  """(workdir, pts): the tiny config's SASRec stage started from pts['x'] and stopped at step
  2 of 130; pts also holds 'y' (other weights) and 'moved' (x's file copied elsewhere)."""
  import shutil

  base = tmp_path_factory.mktemp("started")
  (base / "elsewhere").mkdir()
  pts = {"x": tiny_sasrec_pt(base / "x.pt", 0), "y": tiny_sasrec_pt(base / "y.pt", 1)}
  pts["moved"] = str(shutil.copy(pts["x"], base / "elsewhere" / "x_copy.pt"))
  workdir = base / "w"
  proc = _sasrec(workdir, pts["x"], 2)
  assert proc.returncode == 0, proc.stderr
  return str(workdir), pts


def _copy(workdir, to) -> str:
  import shutil

  shutil.copytree(workdir, to)
  return str(to)


def _config(*overrides: str):
  from ilora_jax import configuration

  return configuration.load("configs/tiny.py", list(overrides))


def test_a_resume_from_another_init_from_other_rows_or_candidates_is_refused(started, tmp_path):
  """A SASRec run records what it started from (a fingerprint of the .pt's weights, '' from
  scratch), a digest of its training rows and its candidate settings: a resume with another
  init_from (other weights, or none), another synthetic seed (same data name and row count)
  or other candidates is refused by name before config.json is rewritten; the same weights
  from a moved file resume."""
  from ilora_jax import train_sasrec

  workdir, pts = started
  workdir = _copy(workdir, tmp_path / "w")
  with open(f"{workdir}/config.json") as f:
    written = f.read()
  proc = _sasrec(workdir, pts["y"], 4)
  line = assert_one_line_error(proc, "init_from: checkpoint ", pts["x"], pts["y"])
  assert "resumed" not in proc.stderr, line
  for override, fragment in (
    ("sasrec.init_from=", f"init_from: checkpoint '{pts['x']} (weights "),
    ("data.synthetic.seed=9", "train_data: checkpoint "),
    ("data.candidate_seed=5", "data.candidate_seed: checkpoint 2024 vs config 5"),
    ("data.num_candidates=10", "data.num_candidates: checkpoint 20 vs config 10"),
  ):
    overrides = ["stage=sasrec", f"sasrec.init_from={pts['x']}", override]
    with pytest.raises(UserError, match=re.escape(fragment)):
      train_sasrec.run(_config(*overrides), workdir)
  with open(f"{workdir}/config.json") as f:
    assert f.read() == written
  proc = _sasrec(workdir, pts["moved"], 4)
  assert proc.returncode == 0, proc.stderr
  assert "SASRec: resumed from step 2 of 130" in proc.stderr
  with open(f"{workdir}/config.json") as f:
    assert json.load(f)["sasrec"]["init_from"] == pts["moved"]


def test_a_resume_on_other_val_rows_is_refused(started, tmp_path, monkeypatch):
  """Val rows edited in the data folder between two parts of a run: the val curve mixed 122
  and 117 rows without a word (an audit). The digest of the val rows is compared too."""
  import dataclasses

  from ilora_jax import train_sasrec
  from ilora_jax.data import Split

  workdir = _copy(started[0], tmp_path / "w")
  load = train_sasrec.load_from_config

  def fewer_val_rows(config, workdir):
    dataset = load(config, workdir)
    v = dataset.val
    return dataclasses.replace(dataset, val=Split(v.name, v.seq[1:], v.len_seq[1:], v.next[1:]))

  monkeypatch.setattr(train_sasrec, "load_from_config", fewer_val_rows)
  overrides = ["stage=sasrec", f"sasrec.init_from={started[1]['x']}", "train.stop_after_steps=3"]
  with pytest.raises(
    UserError, match=r"other settings \(val_data: checkpoint '\w+' vs config '\w+'\)"
  ):
    train_sasrec.run(_config(*overrides), workdir)


def test_evaluate_refuses_other_training_rows_and_another_init_from(started, tmp_path):
  """An evaluation of a SASRec trained on other rows (another synthetic seed: the same data
  name and row count) or from another .pt than the config's init_from is refused; the same
  weights from a moved file, no init_from (the workdir's SASRec) and other candidates (an
  evaluation's choice) are scored. Another max_len names its key, config.data.max_len."""
  from ilora_jax import train_sasrec

  workdir, pts = started
  proc = run_cli(TINY, f"--workdir={workdir}", "--config.stage=evaluate",
                 "--config.eval.stage=sasrec", "--config.data.synthetic.seed=9")  # fmt: skip
  assert_one_line_error(proc, "trained on other data: its training data differs")
  evaluate = ["stage=evaluate", "eval.stage=sasrec"]
  trained_from = re.escape(f"trained from sasrec.init_from={pts['x']} (")
  with pytest.raises(UserError, match=trained_from) as e:
    train_sasrec.evaluate(_config(*evaluate, f"sasrec.init_from={pts['y']}"), workdir)
  assert f"not from this config's sasrec.init_from={pts['y']} (weights " in str(e.value)
  with pytest.raises(UserError, match=r"\(max_len 10 vs config 20\); set config.data.max_len as"):
    train_sasrec.evaluate(_config(*evaluate, "data.max_len=20"), workdir)
  scored = _copy(workdir, tmp_path / "w")  # An evaluation appends to metrics.jsonl.
  results = [
    train_sasrec.evaluate(_config(*evaluate, *extra), scored)
    for extra in ([f"sasrec.init_from={pts['moved']}"], [], ["data.candidate_seed=5"])
  ]
  assert results[0] == results[1] != results[2]  # The last ranks other candidates.


def test_evaluate_names_an_unfinished_run(started, tmp_path, capsys):
  """A SASRec stopped at step 2 of 130 was evaluated without a word that it is unfinished
  (the iLoRA stage's evaluation says so)."""
  from ilora_jax import train_sasrec

  workdir = _copy(started[0], tmp_path / "w")
  train_sasrec.evaluate(_config("stage=evaluate", "eval.stage=sasrec"), workdir)
  assert (
    "SASRec: evaluating the latest checkpoint, step 2 (an unfinished run: trained 2 of 130 steps)"
    in capsys.readouterr().err
  )


def test_evaluate_of_a_test_split_the_data_lacks_is_an_error(started, monkeypatch):
  """eval.split=test on data without a test file recorded a skip and exited 0 (the iLoRA
  stage refused the same request): asked for by name, it is refused, and nothing is written."""
  from ilora_jax import train_sasrec

  workdir = started[0]
  load = train_sasrec.load_from_config

  def without_test(config, workdir):
    reason = "test file not found: /d/Test_data.df"
    return dataclasses.replace(load(config, workdir), test=None, test_missing_reason=reason)

  monkeypatch.setattr(train_sasrec, "load_from_config", without_test)
  log = os.path.join(workdir, "metrics.jsonl")
  before = os.path.exists(log) and open(log).read()
  message = "^split 'test' is not available: test file not found: /d/Test_data.df$"
  with pytest.raises(UserError, match=message):
    train_sasrec.evaluate(
      _config("stage=evaluate", "eval.stage=sasrec", "eval.split=test"), workdir
    )
  assert (os.path.exists(log) and open(log).read()) == before


def _as_if_saved_by_older_code(workdir) -> str:
  """`workdir` with its SASRec checkpoints' settings cut to those older code recorded."""
  import glob

  paths = glob.glob(f"{workdir}/checkpoints/sasrec/*/meta/metadata")
  assert paths
  for path in paths:
    with open(path) as f:
      meta = json.load(f)
    for key in ("init_from", "train_data", "data.num_candidates", "data.candidate_seed",
                "val_data"):  # fmt: skip
      del meta["settings"][key]
    with open(path, "w") as f:
      json.dump(meta, f)
  return workdir


def test_checkpoints_of_older_code_resume_and_evaluate_warning_that_init_from_is_unused(
  started, tmp_path, capsys
):
  """A checkpoint that records no start, rows or candidates resumes and evaluates as before
  (with another init_from: its own SASRec), saying that init_from is not used; the resumed
  run's checkpoints still claim no start."""
  from ilora_jax import checkpointing, train_sasrec

  workdir = _as_if_saved_by_older_code(_copy(started[0], tmp_path / "w"))
  other = f"sasrec.init_from={started[1]['y']}"
  train_sasrec.run(_config("stage=sasrec", other, "train.stop_after_steps=3"), workdir)
  err = capsys.readouterr().err
  assert f"warning: config.sasrec.init_from={started[1]['y']} is not used" in err
  assert "which this run resumes" in err and "SASRec: resumed from step 2 of 130" in err
  ckpt = checkpointing.StageCheckpoints(workdir, "sasrec", read_only=True)
  assert ckpt.latest_step() == 3 and "init_from" not in ckpt.restore_meta(3)["settings"]
  ckpt.close()
  train_sasrec.evaluate(_config("stage=evaluate", "eval.stage=sasrec", other), workdir)
  assert "is not used" in capsys.readouterr().err


def test_a_pipelines_sasrec_leaves_config_json_to_its_started_ilora_stage(started, tmp_path):
  """A pipeline resumed with settings its iLoRA stage then refused had config.json rewritten
  by the SASRec stage before that refusal (recommend then read the refused steps: "trained 25
  of 40"). With an iLoRA checkpoint in the workdir, that stage's check writes it; without one,
  SASRec still does."""
  from ilora_jax import checkpointing, train_sasrec

  workdir = _copy(started[0], tmp_path / "w")
  x = started[1]["x"]
  with open(f"{workdir}/config.json") as f:
    written = f.read()
  ilora = checkpointing.StageCheckpoints(workdir, "ilora", 1, False)
  ilora.save(1, {"w": np.zeros(3, np.float32)}, {"step": 1})
  ilora.close()
  overrides = ["stage=pipeline", f"sasrec.init_from={x}", "train.stop_after_steps=3"]
  train_sasrec.run(_config(*overrides, "ilora.train.steps=40"), workdir)
  with open(f"{workdir}/config.json") as f:
    assert f.read() == written
  shutil.rmtree(f"{workdir}/checkpoints/ilora")
  train_sasrec.run(_config(*overrides, "train.stop_after_steps=4", "ilora.train.steps=40"),
                   workdir)  # fmt: skip
  with open(f"{workdir}/config.json") as f:
    assert json.load(f)["ilora"]["train"]["steps"] == 40


def test_a_pipeline_resumed_past_its_finished_sasrec_keeps_its_final_records(
  started, tmp_path, capsys
):
  """A pipeline resumed in its iLoRA stage evaluated its finished SASRec again and wrote those
  final records anew, after the iLoRA records. They stand now, in their place, and the stage
  returns their val metrics without evaluating."""
  from ilora_jax import checkpointing, train_sasrec

  workdir = _copy(started[0], tmp_path / "w")
  x = started[1]["x"]
  train_sasrec.run(_config("stage=sasrec", f"sasrec.init_from={x}"), workdir)
  finals = [r for r in metrics_records(workdir) if r.get("final")]
  assert [r["split"] for r in finals] == ["val", "test"]
  ilora = checkpointing.StageCheckpoints(workdir, "ilora", 1, False)
  ilora.save(1, {"w": np.zeros(3, np.float32)}, {"step": 1})
  ilora.close()
  with open(f"{workdir}/metrics.jsonl", "a") as f:
    f.write(json.dumps({"run": "ilora", "stage": "ilora", "split": "train", "step": 1}) + "\n")
  before = metrics_records(workdir)
  capsys.readouterr()
  val = train_sasrec.run(_config("stage=pipeline", f"sasrec.init_from={x}"), workdir)
  out, err = capsys.readouterr()
  assert metrics_records(workdir) == before
  assert "sasrec val step" not in out and "final evaluations stand in metrics.jsonl" in err, err
  record_keys = ("run", "stage", "split", "step", "final")
  assert val == {k: v for k, v in finals[0].items() if k not in record_keys} and "mrr" in val


def test_a_pipeline_on_an_init_from_it_does_not_train_keeps_its_final_records(
  started, tmp_path, capsys
):
  """A pipeline whose SASRec trains no step (sasrec.train.epochs=0 and an init_from) saves
  no SASRec checkpoint: resumed in its iLoRA stage, it evaluated the .pt again and wrote
  those records after the iLoRA ones. They stand now, as a trained SASRec's do."""
  from ilora_jax import checkpointing, train_sasrec

  x = started[1]["x"]
  config = _config("stage=pipeline", "sasrec.train.epochs=0", f"sasrec.init_from={x}")
  train_sasrec.run(config, str(tmp_path))
  ilora = checkpointing.StageCheckpoints(str(tmp_path), "ilora", 1, False)
  ilora.save(1, {"w": np.zeros(3, np.float32)}, {"step": 1})
  ilora.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"run": "ilora", "stage": "ilora", "split": "train", "step": 1}) + "\n")
  before = metrics_records(str(tmp_path))
  assert [(r["run"], r["split"]) for r in before] == [
    ("sasrec", "val"),
    ("sasrec", "test"),
    ("ilora", "train"),
  ]
  capsys.readouterr()
  assert train_sasrec.run(config, str(tmp_path))["mrr"] == before[0]["mrr"]
  assert metrics_records(str(tmp_path)) == before
  assert "sasrec val step" not in capsys.readouterr().out


def test_an_evaluation_that_trains_no_step_warns_and_a_rerun_replaces_its_records(tmp_path, capsys):
  """stage=sasrec with train.epochs=0 and no init_from scores untrained weights: it says so.
  Such a run saves no checkpoint, and a re-run appended its records to the first's (two
  final val records, both in the report); it writes its own now, as a run from scratch."""
  from ilora_jax import train_sasrec

  config = _config("stage=sasrec", "train.epochs=0")
  for _ in range(2):
    train_sasrec.run(config, str(tmp_path))
    assert "evaluations score untrained weights" in capsys.readouterr().err
  records = metrics_records(str(tmp_path))
  assert [(r["split"], r["step"], r.get("final")) for r in records] == [
    ("val", 0, True),
    ("test", 0, True),
  ]
  train_sasrec.run(_config("stage=sasrec", "train.steps=2"), str(tmp_path / "trained"))
  assert "untrained" not in capsys.readouterr().err
  # The last step's val evaluation is the final one (it was run and recorded twice).
  val = [r for r in metrics_records(str(tmp_path / "trained")) if r["split"] == "val"]
  assert [(r["step"], r.get("final")) for r in val] == [(2, True)]


def test_evaluating_sasrec_in_a_workdir_of_ilora_alone_points_to_eval_stage(tmp_path):
  """An iLoRA run on an original .pt has no SASRec checkpoint: stage=evaluate with
  eval.stage=sasrec (the default before auto) told it to train SASRec first; it names
  eval.stage=ilora now."""
  from ilora_jax import checkpointing, train_sasrec

  config = _config("stage=evaluate", "eval.split=val")
  with pytest.raises(UserError, match="run --config.stage=sasrec first"):
    train_sasrec.evaluate(config, str(tmp_path))
  # The selected weights alone (checkpoints/ilora_best, its latest folder removed) count too.
  for stage, workdir in (("ilora_best", tmp_path / "best"), ("ilora", tmp_path)):
    ilora = checkpointing.StageCheckpoints(str(workdir), stage, 1, False)
    ilora.save(1, {"w": np.zeros(3, np.float32)}, {"step": 1})
    ilora.close()
    with pytest.raises(UserError, match=re.escape("but an ilora one: evaluate it with "
                                                  "--config.eval.stage=ilora")):  # fmt: skip
      train_sasrec.evaluate(config, str(workdir))


def test_only_process_0_prints_the_final_metrics(tmp_path, capsys, monkeypatch):
  """`evaluate_params` prints its `sasrec <split> step ...` lines on process 0 only."""
  from ilora_jax import data, sharding, train_sasrec
  from ilora_jax.metrics import MetricsLog

  config = _config()
  dataset = data.load_from_config(config, str(tmp_path))
  cfg = train_sasrec.model_config(config, dataset.n_items)
  params = sasrec.init_params(cfg, jax.random.PRNGKey(0))
  mesh, log = sharding.make_mesh(config.mesh), MetricsLog(str(tmp_path), enabled=False)
  printed = []
  for process in (1, 0):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    train_sasrec.evaluate_params(config, dataset, sasrec.SASRec(cfg), mesh, params, 7, log,
                                 run="evaluate", splits=("val",))  # fmt: skip
    printed.append(capsys.readouterr().out)
  assert printed[0] == "" and printed[1].startswith("sasrec val step 7: hr@1=")
