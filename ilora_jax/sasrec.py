"""SASRec in Flax: the frozen sequential recommender that feeds iLoRA.

Architecture (../shared/REFERENCE.md): item + learned positional embeddings,
one causal single-head attention block whose queries are LayerNorm-ed and whose
keys/values are the raw sequence, a residual on the normalised queries, a
point-wise feed-forward block, LayerNorms, and a separate dense head `s_fc`
scoring all items from the user vector (the hidden state at the last real item).
Parameter names follow the original so checkpoints map one to one.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ilora_jax.errors import UserError
from ilora_jax.torch_checkpoint import flat_parameters, load_module

_MASK_VALUE = -(2.0**32) + 1  # The original's padding score.


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  n_items: int  # Item ids 0..n_items-1; row n_items of the item table is padding.
  hidden: int = 64
  max_len: int = 10
  num_heads: int = 1
  dropout: float = 0.1
  layer_norm_eps: float = 1e-5


def _layer_norm(cfg: SASRecConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


class _Attention(nn.Module):
  """Causal multi-head attention with the original's key and query padding masks."""

  cfg: SASRecConfig

  @nn.compact
  def __call__(self, queries, keys, deterministic: bool):
    """queries: LayerNorm-ed sequence, keys: raw sequence (zero rows = padding)."""
    cfg = self.cfg
    b, t, d = queries.shape
    h = cfg.num_heads
    q = nn.Dense(d, name="linear_q")(queries).reshape(b, t, h, d // h)  # [batch, time, heads, dh]
    k = nn.Dense(d, name="linear_k")(keys).reshape(b, t, h, d // h)
    v = nn.Dense(d, name="linear_v")(keys).reshape(b, t, h, d // h)
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(d)  # [batch, heads, query, key]
    # Keys whose raw row sums to zero are padding; future keys are masked too.
    key_real = jnp.sign(jnp.abs(keys.sum(-1))) != 0  # [batch, key]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # [query, key]
    scores = jnp.where(key_real[:, None, None, :], scores, _MASK_VALUE)
    scores = jnp.where(causal[None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    # Rows of padded queries are zeroed. The original tests "normalised query sums to
    # zero", which is rounding noise for LayerNorm(gamma=1, beta=0) (every row sums to ~0)
    # and never true for trained ones; the padding mask is what it means, and both give
    # the same hidden states at real positions of trained checkpoints.
    probs = probs * key_real[:, None, :, None].astype(probs.dtype)
    probs = nn.Dropout(cfg.dropout)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v).reshape(b, t, d)  # [batch, time, hidden]
    return out + queries


class _FeedForward(nn.Module):
  cfg: SASRecConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d = self.cfg.hidden
    y = nn.Dense(d, name="w_2")(nn.relu(nn.Dense(d, name="w_1")(x)))
    y = nn.Dropout(self.cfg.dropout)(y, deterministic=deterministic)
    return _layer_norm(self.cfg, "layer_norm")(y + x)


class SASRec(nn.Module):
  """SASRec. `__call__` returns per-position hidden states; see `user_vector`/`scores`."""

  cfg: SASRecConfig

  def setup(self):
    cfg = self.cfg
    self.item_embeddings = nn.Embed(
      cfg.n_items + 1, cfg.hidden, embedding_init=nn.initializers.normal(0.01)
    )
    self.positional_embeddings = nn.Embed(
      cfg.max_len, cfg.hidden, embedding_init=nn.initializers.normal(0.01)
    )
    self.emb_dropout = nn.Dropout(cfg.dropout)
    self.ln_1 = _layer_norm(cfg, "ln_1")
    self.ln_2 = _layer_norm(cfg, "ln_2")
    self.ln_3 = _layer_norm(cfg, "ln_3")
    self.mh_attn = _Attention(cfg)
    self.feed_forward = _FeedForward(cfg)
    self.s_fc = nn.Dense(cfg.n_items)

  def hidden_states(self, seq, deterministic: bool = True):
    """seq [batch, max_len] int -> hidden states [batch, max_len, hidden]."""
    x = self.item_embeddings(seq) + self.positional_embeddings(jnp.arange(seq.shape[1]))[None]
    x = self.emb_dropout(x, deterministic=deterministic)
    not_pad = (seq != self.cfg.n_items)[..., None].astype(x.dtype)  # [batch, time, 1]
    x = x * not_pad
    attn = self.mh_attn(self.ln_1(x), x, deterministic)
    ff = self.feed_forward(self.ln_2(attn), deterministic)
    return self.ln_3(ff * not_pad)

  def user_vector(self, seq, len_seq, deterministic: bool = True):
    """The hidden state at the last real item: [batch, hidden]."""
    h = self.hidden_states(seq, deterministic)
    last = jnp.clip(len_seq - 1, 0, seq.shape[1] - 1)
    return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]

  def item_embedding(self, items):
    """Plain table lookup (what the projector reads): [...] -> [..., hidden]."""
    return self.item_embeddings(items)

  def __call__(self, seq, len_seq, deterministic: bool = True):
    """Scores over all items: [batch, n_items]."""
    return self.s_fc(self.user_vector(seq, len_seq, deterministic))


def init_params(cfg: SASRecConfig, rng: jax.Array):
  seq = jnp.full((1, cfg.max_len), cfg.n_items, jnp.int32)
  return SASRec(cfg).init(rng, seq, jnp.ones((1,), jnp.int32))["params"]


def params_from_torch(path: str, cfg: SASRecConfig):
  """Maps an original SASRec checkpoint (whole pickled module) into the Flax tree.

  Raises:
    UserError: when the checkpoint is unreadable, its shapes disagree with `cfg`, a weight
      is not finite or it holds weights (parameters or buffers) that SASRec does not use.
  """
  root = load_module(path)
  flat = flat_parameters(root)
  item_num = root.state.get("item_num")
  if item_num is not None and (
    isinstance(item_num, bool) or not isinstance(item_num, (int, np.integer))
  ):
    raise UserError(f"checkpoint {path} holds item_num={item_num!r:.60}, not an item count")
  if item_num is not None and item_num != cfg.n_items:
    raise UserError(
      f"checkpoint {path} was trained on {int(item_num)} items but the data set "
      f"has {cfg.n_items} (wrong data set?)"
    )

  attention = root.children().get("mh_attn")
  heads = attention.state.get("num_heads") if attention is not None else None
  if isinstance(heads, int) and heads != cfg.num_heads:  # The weights fit any head count.
    raise UserError(
      f"checkpoint {path} was trained with {heads} attention head(s): set "
      f"config.sasrec.num_heads={heads} (it is {cfg.num_heads})"
    )

  used: set[str] = set()

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    used.add(name)
    if name not in flat:
      raise UserError(f"checkpoint {path} has no parameter {name}: not a SASRec checkpoint")
    with np.errstate(over="ignore"):  # A float64 beyond float32's range: caught below.
      value = np.asarray(flat[name], dtype=np.float32)
    if value.shape != shape:
      raise UserError(
        f"checkpoint {path}: {name} has shape {value.shape}, expected {shape} "
        f"for hidden={cfg.hidden}, max_len={cfg.max_len}, n_items={cfg.n_items}"
      )
    bad = int((~np.isfinite(value)).sum())
    if bad:
      raise UserError(
        f"checkpoint {path}: {name} holds {bad} NaN or infinite value(s) of {value.size} "
        "(or overflows float32): the model is broken; retrain it"
      )
    return value

  d = cfg.hidden

  def dense(name: str, d_out: int = d) -> dict[str, np.ndarray]:
    return {"kernel": get(f"{name}.weight", (d_out, d)).T, "bias": get(f"{name}.bias", (d_out,))}

  def conv1x1(name: str) -> dict[str, np.ndarray]:
    return {
      "kernel": get(f"{name}.weight", (d, d, 1))[:, :, 0].T,
      "bias": get(f"{name}.bias", (d,)),
    }

  def norm(name: str) -> dict[str, np.ndarray]:
    return {"scale": get(f"{name}.weight", (d,)), "bias": get(f"{name}.bias", (d,))}

  params = {
    "item_embeddings": {"embedding": get("item_embeddings.weight", (cfg.n_items + 1, d))},
    "positional_embeddings": {"embedding": get("positional_embeddings.weight", (cfg.max_len, d))},
    "ln_1": norm("ln_1"),
    "ln_2": norm("ln_2"),
    "ln_3": norm("ln_3"),
    "mh_attn": {k: dense(f"mh_attn.{k}") for k in ("linear_q", "linear_k", "linear_v")},
    "feed_forward": {
      "w_1": conv1x1("feed_forward.w_1"),
      "w_2": conv1x1("feed_forward.w_2"),
      "layer_norm": norm("feed_forward.layer_norm"),
    },
    "s_fc": dense("s_fc", cfg.n_items),
  }
  # The original's checkpoints hold exactly these weights (no buffers; dropout and softmax
  # modules have none): anything more belongs to another model, whose outputs these
  # weights alone would not reproduce.
  unused = sorted(set(flat) - used)
  if unused:
    more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
    raise UserError(
      f"checkpoint {path} holds {len(unused)} weight(s) this SASRec does not use: "
      f"{', '.join(unused[:3])}{more} (not the original's SASRec, or a modified one)"
    )
  return jax.tree.map(jnp.asarray, params)
