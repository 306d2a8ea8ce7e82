"""An independent numpy forward of the original SASRec, written from its formula.

Works directly on the torch `state_dict` names (`ln_1.weight`, `mh_attn.linear_q.weight`,
...), so it shares nothing with the Flax port but the checkpoint reader's raw arrays.
"""

import numpy as np


def _layer_norm(x, w, b, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w + b


def _linear(x, p, name):
  return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def user_vectors(p, seq, len_seq, n_items, heads=1, dropout=None):
  """seq [B, T] ids (padding n_items), len_seq [B] -> [B, hidden] (eval mode).

  `heads` > 1: Q, K, V split along the hidden axis, each head's scores scaled by
  1/sqrt(hidden), the whole width, as the original divides by hidden_size ** 0.5; the heads'
  outputs concatenated. `dropout` {site: factor}: the output of that dropout multiplied by
  the factor (what a keep-everything mask of rate 1 - 1/factor does): 'emb' (the summed
  embeddings, before the padding mask), 'attn' (the attention weights after the query mask)
  and 'ff' (W2's output, before the residual)."""
  drop = dropout or {}
  seq = np.asarray(seq)
  b, t = seq.shape
  x = p["item_embeddings.weight"][seq] + p["positional_embeddings.weight"][np.arange(t)][None]
  x = x * drop.get("emb", 1.0)
  mask = (seq != n_items).astype(np.float64)[..., None]
  x = x * mask
  q_in = _layer_norm(x, p["ln_1.weight"], p["ln_1.bias"])
  q = _linear(q_in, p, "mh_attn.linear_q")
  k = _linear(x, p, "mh_attn.linear_k")
  v = _linear(x, p, "mh_attn.linear_v")
  d = q.shape[-1]
  dh = d // heads
  pad = -(2.0**32) + 1
  key_mask = np.sign(np.abs(x.sum(-1)))  # [B, Tk]
  tril = np.tril(np.ones((t, t)))
  query_kept = np.sign(np.abs(q_in.sum(-1)))[:, :, None]
  outputs = []
  for i in range(heads):
    cut = slice(i * dh, (i + 1) * dh)
    scores = q[..., cut] @ k[..., cut].transpose(0, 2, 1) / np.sqrt(d)  # [B, Tq, Tk]
    scores = np.where(key_mask[:, None, :] == 0, pad, scores)
    scores = np.where(tril[None] == 0, pad, scores)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    probs = probs * query_kept * drop.get("attn", 1.0)
    outputs.append(probs @ v[..., cut])
  attn = np.concatenate(outputs, -1) + q_in
  h = _layer_norm(attn, p["ln_2.weight"], p["ln_2.bias"])
  w1 = p["feed_forward.w_1.weight"][:, :, 0]
  w2 = p["feed_forward.w_2.weight"][:, :, 0]
  ff = np.maximum(h @ w1.T + p["feed_forward.w_1.bias"], 0) @ w2.T + p["feed_forward.w_2.bias"]
  ff = ff * drop.get("ff", 1.0)
  ff = _layer_norm(ff + h, p["feed_forward.layer_norm.weight"], p["feed_forward.layer_norm.bias"])
  out = _layer_norm(ff * mask, p["ln_3.weight"], p["ln_3.bias"])
  return out[np.arange(b), np.asarray(len_seq) - 1]


def item_scores(p, seq, len_seq, n_items):
  return _linear(user_vectors(p, seq, len_seq, n_items), p, "s_fc")
