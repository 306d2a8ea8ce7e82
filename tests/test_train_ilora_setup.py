"""The ilora stage's set-up on the tiny config, in seconds: which frozen SASRec is loaded or
refused (`load_sasrec`, on small checkpoints written here), the model's numerics and kernels
(`model_options`), the LLM's check, the prompt inputs, `build` and `make_parts`, the run's
settings and state (`setup`, around stubs of the slow parts), the jitted step's shardings and
donation, the optimizer state's placement; and the small modules `main` (what each stage
runs), `console`.

Expected values are worked by hand from the docstrings and configs/tiny.py, or taken from
the stubs' own inputs; the end-to-end behaviour is in test_ilora_stage.py and test_cli.py."""

import dataclasses
import json
import logging
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ilora_jax import (
  checkpointing,
  configuration,
  console,
  llm,
  lora,
  router,
  sharding,
  train_ilora,
  train_sasrec,
)
from ilora_jax import tokenizer as tok_lib
from ilora_jax.data import load_from_config, split_fingerprint
from ilora_jax.errors import UserError
from ilora_jax.sasrec import init_params

TINY = os.path.join(ROOT, "configs", "tiny.py")


def _config(*overrides, **values):
  """The tiny config with command-line `overrides`, then `values` set as they are (with `__`
  for dots: values the loader would refuse, or None)."""
  config = configuration.load(TINY, list(overrides))
  for key, value in values.items():
    *path, last = key.split("__")
    node = config
    for name in path:
      node = node[name]
    node[last] = value
  return config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """The tiny config's synthetic data set (60 items)."""
  config = _config()
  return load_from_config(config, str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(_config().mesh)


def _one_device_mesh():
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)


# ----------------------------------------------------------------------------- SASRec


def _save_sasrec(workdir, config, dataset, seed, step=10, total=10, train_data=None):
  """A SASRec checkpoint of `step` (of `total` steps) as the sasrec stage writes one; its
  weights are drawn with `seed`, so a test tells which SASRec was loaded. Returns them."""
  cfg = train_sasrec.model_config(config, dataset.n_items)
  params = init_params(cfg, jax.random.PRNGKey(seed))
  state = train_sasrec.new_state(params, train_sasrec.make_optimizer(1e-3, 0.0))
  settings = {
    "model": checkpointing.jsonable(dataclasses.asdict(cfg)),
    "train_data": split_fingerprint(dataset.train) if train_data is None else train_data,
  }
  if total is not None:
    settings["total_steps"] = total
  ckpt = checkpointing.StageCheckpoints(str(workdir), "sasrec", 2, False)
  ckpt.save(step, state, {"step": step, "settings": settings})
  ckpt.close()
  return params


def _save_ilora(workdir):
  ckpt = checkpointing.StageCheckpoints(str(workdir), "ilora", 1, False)
  ckpt.save(1, {"x": jnp.zeros(2)}, {"step": 1})
  ckpt.close()


def _same(a, b):
  """Whether two param trees hold the same arrays."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_latest_step_reads_a_stage_without_creating_folders(tmp_path):
  assert train_ilora.latest_step(str(tmp_path)) is None and not train_ilora.has_weights(tmp_path)
  assert os.listdir(tmp_path) == []  # Read only: no `checkpoints/` left behind.
  _save_ilora(tmp_path)
  assert train_ilora.latest_step(str(tmp_path)) is not None and train_ilora.has_weights(tmp_path)
  assert train_ilora.latest_step(str(tmp_path), "sasrec") is None


def test_the_workdirs_own_sasrec_is_loaded(tmp_path, data, mesh, capsys):
  config = _config("stage=ilora")
  saved = _save_sasrec(tmp_path, config, data, seed=1, step=10, total=10)
  cfg, params = train_ilora.load_sasrec(config, str(tmp_path), data, mesh)
  assert cfg == train_sasrec.model_config(config, 60)
  assert _same(params, saved)
  for leaf in jax.tree.leaves(params):
    assert leaf.sharding.is_equivalent_to(sharding.replicated(mesh), leaf.ndim)
  own = os.path.join(str(tmp_path), "checkpoints", "sasrec")
  assert f"iLoRA: SASRec from {own} step 10" in capsys.readouterr().err


@pytest.mark.parametrize(
  "stage, warned", [("ilora", True), ("pipeline", False), ("evaluate", False)]
)
def test_the_own_sasrec_wins_over_a_workdir_given_as_init_from(
  tmp_path, data, mesh, capsys, stage, warned
):
  other = tmp_path / "other"
  config = _config(f"stage={stage}", f"sasrec.init_from={other}")
  _save_sasrec(other, config, data, seed=2)
  own = _save_sasrec(tmp_path / "w", config, data, seed=1)
  _, params = train_ilora.load_sasrec(config, str(tmp_path / "w"), data, mesh)
  assert _same(params, own)
  err = capsys.readouterr().err
  assert (f"warning: config.sasrec.init_from={other} is not used" in err) == warned, err


def test_a_begun_run_is_not_warned_of_an_unused_init_from(tmp_path, data, mesh, capsys):
  other = tmp_path / "other"
  config = _config("stage=ilora", f"sasrec.init_from={other}")
  _save_sasrec(other, config, data, seed=2)
  _save_sasrec(tmp_path / "w", config, data, seed=1)
  _save_ilora(tmp_path / "w")
  train_ilora.load_sasrec(config, str(tmp_path / "w"), data, mesh)
  assert "warning" not in capsys.readouterr().err


def test_another_workdirs_sasrec_is_borrowed_when_this_one_has_none(tmp_path, data, mesh, capsys):
  other = tmp_path / "other"
  config = _config("stage=ilora", f"sasrec.init_from={other}")
  theirs = _save_sasrec(other, config, data, seed=2, step=7, total=7)
  (tmp_path / "w").mkdir()
  _, params = train_ilora.load_sasrec(config, str(tmp_path / "w"), data, mesh)
  assert _same(params, theirs)
  err = capsys.readouterr().err
  assert f"iLoRA: SASRec from {os.path.join(str(other), 'checkpoints', 'sasrec')} step 7" in err
  assert "warning" not in err


def test_no_sasrec_and_an_empty_init_from_folder_are_refused(tmp_path, data, mesh):
  (tmp_path / "w").mkdir()
  with pytest.raises(UserError, match="the ilora stage needs a trained SASRec"):
    train_ilora.load_sasrec(_config("stage=ilora"), str(tmp_path / "w"), data, mesh)
  (tmp_path / "empty").mkdir()
  config = _config("stage=ilora", f"sasrec.init_from={tmp_path / 'empty'}")
  with pytest.raises(UserError, match="is a folder without a SASRec checkpoint"):
    train_ilora.load_sasrec(config, str(tmp_path / "w"), data, mesh)
  assert os.listdir(tmp_path / "w") == [] and os.listdir(tmp_path / "empty") == []


def test_a_run_trained_on_init_from_is_told_to_give_it_again(tmp_path, data, mesh, monkeypatch):
  """`stage=evaluate` of a run trained on `sasrec.init_from`, without it: the general advice
  (train a SASRec in this workdir) led an audit to a SASRec the run was not trained on, which
  every later evaluation then refused. The run's own config.json names the one to give."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"sasrec": {"init_from": "/data/lastfm.pt"}}))
  config = _config("stage=evaluate")
  with pytest.raises(UserError, match="the ilora stage needs a trained SASRec"):
    train_ilora.load_sasrec(config, str(workdir), data, mesh)  # No iLoRA weights: a new run.
  monkeypatch.setattr(train_ilora, "has_weights", lambda directory: directory == str(workdir))
  with pytest.raises(UserError) as info:
    train_ilora.load_sasrec(config, str(workdir), data, mesh)
  assert str(info.value) == (
    "this run's iLoRA was trained on the SASRec of config.sasrec.init_from=/data/lastfm.pt (its "
    "config.json): give --config.sasrec.init_from=/data/lastfm.pt"
  )


def test_an_original_pt_file_is_converted_and_replicated(tmp_path, data, mesh, monkeypatch, capsys):
  pt = str(tmp_path / "synthetic.pt")  # A file, not a folder: converted from torch.
  config = _config("stage=ilora", f"sasrec.init_from={pt}")
  seen = []

  def convert(path, cfg):
    seen.append((path, cfg))
    return {"w": np.arange(3.0)}

  monkeypatch.setattr(train_ilora, "params_from_torch", convert)
  cfg, params = train_ilora.load_sasrec(config, str(tmp_path), data, mesh)
  assert seen == [(pt, train_sasrec.model_config(config, 60))] and cfg == seen[0][1]
  np.testing.assert_array_equal(params["w"], [0.0, 1.0, 2.0])
  assert params["w"].sharding.is_equivalent_to(sharding.replicated(mesh), 1)
  assert f"iLoRA: SASRec from {pt}" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["ilora", "pipeline"])
def test_an_unfinished_sasrec_is_refused_when_training_starts(tmp_path, data, mesh, stage):
  config = _config(f"stage={stage}")
  _save_sasrec(tmp_path / "w", config, data, seed=1, step=3, total=10)
  with pytest.raises(UserError, match=r"stopped at step 3 of 10: finish it first .* this workdir"):
    train_ilora.load_sasrec(config, str(tmp_path / "w"), data, mesh)
  other = tmp_path / "w"
  config = _config(f"stage={stage}", f"sasrec.init_from={other}")
  (tmp_path / "new").mkdir()
  with pytest.raises(UserError, match=f"stopped at step 3 of 10: .*that workdir, {other},"):
    train_ilora.load_sasrec(config, str(tmp_path / "new"), data, mesh)


def test_an_unfinished_sasrec_is_kept_with_a_warning_outside_a_new_run(
  tmp_path, data, mesh, capsys
):
  config = _config("stage=evaluate")
  saved = _save_sasrec(tmp_path, config, data, seed=1, step=3, total=10)
  _, params = train_ilora.load_sasrec(config, str(tmp_path), data, mesh)
  assert _same(params, saved)
  assert "stopped at step 3 of 10; it is used as it is" in capsys.readouterr().err
  _save_ilora(tmp_path)  # A begun ilora run resumes on it.
  _, params = train_ilora.load_sasrec(_config("stage=ilora"), str(tmp_path), data, mesh)
  assert _same(params, saved)
  assert "stopped at step 3 of 10; it is used as it is" in capsys.readouterr().err


def test_a_finished_sasrec_or_one_without_a_total_is_not_warned_of(tmp_path, data, mesh, capsys):
  config = _config("stage=ilora")
  _save_sasrec(tmp_path / "a", config, data, seed=1, step=10, total=None)
  train_ilora.load_sasrec(config, str(tmp_path / "a"), data, mesh)
  _save_sasrec(tmp_path / "b", config, data, seed=1, step=11, total=10)
  train_ilora.load_sasrec(config, str(tmp_path / "b"), data, mesh)
  assert "warning" not in capsys.readouterr().err


def test_a_sasrec_of_other_training_rows_is_refused_then_warned(tmp_path, data, mesh, capsys):
  config = _config("stage=pipeline")
  saved = _save_sasrec(tmp_path, config, data, seed=1, train_data="0" * 16)
  with pytest.raises(UserError, match="was trained on other data.*iLoRA freezes a SASRec"):
    train_ilora.load_sasrec(config, str(tmp_path), data, mesh)
  _save_ilora(tmp_path)  # A begun run on its own SASRec: the config's rows changed mid-run.
  for stage in ("ilora", "pipeline"):
    with pytest.raises(UserError, match="was trained on other data.*iLoRA freezes a SASRec"):
      train_ilora.load_sasrec(_config(f"stage={stage}"), str(tmp_path), data, mesh)
  _, params = train_ilora.load_sasrec(_config("stage=evaluate"), str(tmp_path), data, mesh)
  assert _same(params, saved)
  err = capsys.readouterr().err
  assert "was trained on other data" in err and "it is used as it is" in err
  # A run begun (by older code) on a borrowed SASRec of other rows keeps it as it resumes.
  begun = tmp_path / "begun"
  _save_ilora(begun)
  borrowing = _config("stage=ilora", f"sasrec.init_from={tmp_path}")
  _, params = train_ilora.load_sasrec(borrowing, str(begun), data, mesh)
  assert _same(params, saved)
  err = capsys.readouterr().err
  assert "was trained on other data" in err and "it is used as it is" in err


def test_a_sasrec_of_other_model_settings_is_refused(tmp_path, data, mesh):
  _save_sasrec(tmp_path, _config(), data, seed=1)
  with pytest.raises(UserError, match="hidden 16 vs config 32"):
    train_ilora.load_sasrec(_config("stage=ilora", "sasrec.hidden=32"), str(tmp_path), data, mesh)


# ----------------------------------------------------------------------------- model options


def test_splash_mesh_only_for_splash_over_several_devices():
  big, one = types.SimpleNamespace(size=4), types.SimpleNamespace(size=1)
  assert train_ilora.splash_mesh("splash", big) is big
  assert train_ilora.splash_mesh("splash", one) is None
  assert train_ilora.splash_mesh("splash", None) is None
  assert train_ilora.splash_mesh("xla", big) is None
  assert train_ilora.splash_mesh("cudnn", big) is None


def test_model_options_carry_the_configs_numerics_and_kernels():
  config = _config(
    "llm.dtype=bfloat16", "llm.param_dtype=float16", "llm.remat=full", "llm.attention_chunks=3"
  )
  big = types.SimpleNamespace(size=2)
  assert train_ilora.model_options(config, big) == dict(
    dtype=jnp.bfloat16,
    param_dtype=jnp.float16,
    attention="xla",  # auto on a CPU.
    kernel_mesh=None,
    remat_policy="full",
    attention_chunks=3,
  )
  with sharding.compiling_for("gpu"):
    assert train_ilora.model_options(config, big)["attention"] == "cudnn"
  with sharding.compiling_for("tpu"):
    options = train_ilora.model_options(config, big)
    assert options["attention"] == "splash" and options["kernel_mesh"] is big
    assert train_ilora.model_options(config)["kernel_mesh"] is None
  tiny = train_ilora.model_options(_config(), big)
  assert tiny["dtype"] == jnp.float32 and tiny["param_dtype"] == jnp.float32
  assert tiny["remat_policy"] == "projections" and tiny["attention_chunks"] == 4


# ----------------------------------------------------------------------------- the LLM


def test_check_llm_gives_the_tokenizer_and_names_each_problem(monkeypatch):
  tokenizer = train_ilora.check_llm(_config())
  assert len(tokenizer) == 49152  # SmolLM2's vocabulary (the tiny preset's).
  with pytest.raises(UserError, match="no-such-model"):
    train_ilora.check_llm(_config("llm.name=no-such-model"))
  seen = []
  monkeypatch.setattr(llm, "check_init_std", lambda name, std: seen.append((name, std)))
  train_ilora.check_llm(_config("llm.init_std=0.05"))
  assert seen == [("tiny", 0.05)]

  def none(name, strict=False):
    assert strict
    raise tok_lib.NoTokenizer("no tokenizer in /m")

  monkeypatch.setattr(llm, "load_tokenizer", none)
  with pytest.raises(UserError, match=r"^no tokenizer in /m: the ilora stage writes its prompts"):
    train_ilora.check_llm(_config())
  monkeypatch.setattr(llm, "load_tokenizer", lambda name, strict=False: None)
  with pytest.raises(UserError, match=r"^tiny has no tokenizer: the ilora stage writes"):
    train_ilora.check_llm(_config())

  def unreadable_stops(name):
    raise UserError(f"{name}/generation_config.json is not JSON")

  monkeypatch.setattr(llm, "stop_ids_of", unreadable_stops)
  with pytest.raises(UserError, match=r"^tiny/generation_config.json is not JSON$"):
    train_ilora.check_llm(_config())


def test_check_llm_reads_a_gguf_models_config_not_only_its_tokenizer(monkeypatch):
  """A GGUF model's tokenizer is read without its config (`llm.load_tokenizer`): the check
  reads the config too, so an architecture the model code cannot run is named here."""

  def unsupported(name, **overrides):
    raise UserError(f"{name}: architecture 'mamba' is not supported")

  monkeypatch.setattr(llm, "config_for", unsupported)
  with pytest.raises(UserError, match="smollm2-135m: architecture 'mamba' is not supported"):
    train_ilora.check_llm(_config("llm.name=smollm2-135m"))


@pytest.fixture(scope="module")
def sasrec_stub():
  return types.SimpleNamespace(cfg="sas cfg", params={"w": jnp.ones(3)})


def _inputs(config, data, monkeypatch, sasrec_stub, workdir="/w", mesh="mesh", generates=True):
  seen = []

  def load(*args):
    seen.append(args)
    return sasrec_stub.cfg, sasrec_stub.params

  monkeypatch.setattr(train_ilora, "load_sasrec", load)
  inputs = train_ilora.prompt_inputs(config, workdir, data, mesh, generates)
  assert seen == [(config, workdir, data, mesh)]
  return inputs


def test_prompt_inputs_build_the_prompts_of_the_config(data, monkeypatch, sasrec_stub, capsys):
  config = _config("llm.bos=always", "ilora.pad_multiple=16")
  inputs = _inputs(config, data, monkeypatch, sasrec_stub)
  tokenizer, builder = inputs.tokenizer, inputs.builder
  assert (inputs.sas_cfg, inputs.sas_params) == (sasrec_stub.cfg, sasrec_stub.params)
  assert len(tokenizer) == 49152 + 5  # '[PAD]' and the four iLoRA tokens added.
  names = ("[PAD]", "[PH]", "[HistoryEmb]", "[CansEmb]", "[ItemEmb]")
  special = {t: tokenizer.convert_tokens_to_ids(t) for t in names}
  assert sorted(special.values()) == list(range(49152, 49157))
  assert builder.special_ids == special and builder.pad_id == special[tok_lib.PAD_TOKEN]
  assert builder.bos == [tokenizer.bos_token_id] and builder.multiple_of == 16
  assert builder.titles is data.titles and builder.n_items == 60
  first = tokenizer.decode(builder.templates[0][0])  # The synthetic data's: steam's games.
  assert first == "This user has played", first
  assert "game" in tokenizer.decode(builder.templates[0][1])
  assert inputs.longest == max(len(builder.target_tokens(i)) for i in data.titles)
  assert inputs.newline == tuple(tokenizer.encode("\n", add_special_tokens=False))
  assert "warning" not in capsys.readouterr().err
  assert _inputs(_config("llm.bos=never"), data, monkeypatch, sasrec_stub).builder.bos == []


def test_prompt_inputs_warn_of_titles_longer_than_the_target_cap(
  data, monkeypatch, sasrec_stub, capsys
):
  inputs = _inputs(_config(), data, monkeypatch, sasrec_stub)
  lengths = [len(inputs.builder.target_tokens(i)) for i in data.titles]
  cap = sorted(lengths)[len(lengths) // 2]
  assert max(lengths) > cap
  capsys.readouterr()
  _inputs(_config(f"ilora.max_target_tokens={cap}"), data, monkeypatch, sasrec_stub)
  over = sum(n > cap for n in lengths)
  assert 0 < over < len(lengths)
  assert (
    f"warning: {over} of {len(lengths)} titles have more than config.ilora.max_target_tokens={cap}"
    f" tokens (the longest {max(lengths)}): the loss scores their first {cap}"
  ) in capsys.readouterr().err
  capsys.readouterr()
  _inputs(_config(f"ilora.max_target_tokens={max(lengths)}"), data, monkeypatch, sasrec_stub)
  assert "warning" not in capsys.readouterr().err


def test_titles_holding_special_token_texts_are_plain_text_to_the_model(
  data, monkeypatch, sasrec_stub
):
  """A title "Foo [HistoryEmb] Bar" or "A<|im_end|>B" was encoded with the tokenizer's
  special tokens in it: generation stopped at that EOS, decoding dropped the placeholder, so
  a perfect answer never matched. Titles are now plain text; other titles keep their tokens."""
  odd = {0: "Foo [HistoryEmb] Bar", 1: "A<|im_end|>B", 2: "<|endoftext|>"}
  plain = _inputs(_config(), data, monkeypatch, sasrec_stub).builder.target_tokens(3)
  dataset = dataclasses.replace(data, titles={**data.titles, **odd})
  inputs = _inputs(_config(), dataset, monkeypatch, sasrec_stub)
  tokenizer, builder = inputs.tokenizer, inputs.builder
  special = set(tokenizer.all_special_ids) | set(builder.special_ids.values())
  for item, title in odd.items():
    tokens = builder.target_tokens(item)
    assert not special & set(tokens), (title, tokens)
    assert tokenizer.decode(tokens, skip_special_tokens=True) == f" {title}\n"
  assert builder.target_tokens(3) == plain


def test_prompt_inputs_warn_of_titles_generation_cannot_write_whole(
  data, monkeypatch, sasrec_stub, capsys
):
  inputs = _inputs(_config(), data, monkeypatch, sasrec_stub)
  lengths = [len(inputs.builder.target_tokens(i)) - 1 for i in data.titles]  # No newline.
  capsys.readouterr()
  budget = max(lengths) - 1
  _inputs(_config(f"ilora.max_new_tokens={budget}"), data, monkeypatch, sasrec_stub)
  over = sum(n > budget for n in lengths)
  assert (
    f"warning: {over} of {len(lengths)} titles have more than config.ilora.max_new_tokens="
    f"{budget} tokens (the longest {max(lengths)}): generation cannot write them whole"
  ) in capsys.readouterr().err
  # Enough tokens, or no generation: nothing to say.
  for quiet in ([f"ilora.max_new_tokens={max(lengths)}"],
                ["ilora.eval_generate=False", f"ilora.max_new_tokens={budget}"]):  # fmt: skip
    _inputs(_config(*quiet), data, monkeypatch, sasrec_stub)
    assert "max_new_tokens" not in capsys.readouterr().err, quiet
  # Nor where nothing is generated (recommend ranks by likelihood).
  _inputs(_config(f"ilora.max_new_tokens={budget}"), data, monkeypatch, sasrec_stub,
          generates=False)  # fmt: skip
  assert "max_new_tokens" not in capsys.readouterr().err


def test_build_loads_the_llm_grows_its_vocabulary_and_assembles_the_parts(
  data, mesh, monkeypatch, sasrec_stub
):
  config = _config(
    "llm.remat=full", "lora.rank=6", "lora.num_experts=3", "router.kind=mlp", "llm.init_std=0.05"
  )  # fmt: skip
  inputs = _inputs(config, data, monkeypatch, sasrec_stub)
  calls, real = [], llm.load

  def load(name, **kwargs):
    calls.append((name, kwargs))
    base = real(name, **kwargs)
    base.stop_ids = (7,)  # As a generation_config.json listing another end id.
    calls.append(base)
    return base

  monkeypatch.setattr(llm, "load", load)
  parts, frozen, loaded = train_ilora.build(config, data, mesh, inputs)
  (name, kwargs), base = calls
  assert name == "tiny" and kwargs["mesh"] is mesh and kwargs["rules"] == sharding.rules(config)
  assert kwargs["init_std"] == 0.05 and kwargs["with_tokenizer"] is False
  assert kwargs["remat_policy"] == "full" and kwargs["dtype"] == jnp.float32
  assert loaded is None  # A random preset: no weights' fingerprint.
  rows = -(-(49152 + 5) // 128) * 128  # The grown vocabulary, rounded up to 128.
  assert parts.model.config.vocab_size == rows == 49280
  assert frozen["llm"] is parts.model.params and frozen["sasrec"] is sasrec_stub.params
  embed = [x for x in jax.tree.leaves(frozen["llm"]) if x.shape[0] == rows]
  assert embed and all(x.shape[0] == rows for x in embed)
  want = llm.mesh_shardings(parts.model.config, mesh, sharding.rules(config))
  placed = jax.tree.map(lambda x, sh: (x.sharding.mesh, x.sharding.spec) == (mesh, sh.spec),
                        frozen["llm"], want)  # fmt: skip
  assert all(jax.tree.leaves(placed))  # Placed on the mesh by the sharding rules.
  assert parts.model.unroll_decode is False
  assert parts.model.eos_ids == (inputs.tokenizer.eos_token_id, 7)
  old = np.asarray(jax.tree.leaves(base.params)[0])
  assert old.shape[0] == 49152  # The original rows are kept.
  np.testing.assert_array_equal(np.asarray(embed[0])[:49152], old)
  assert parts.model.tokenizer is inputs.tokenizer and parts.builder is inputs.builder
  assert parts.lora_cfg == lora.LoRAConfig(
    6, 3, 32.0, 0.1, ("q", "k", "v", "o", "gate", "up", "down")
  )
  assert parts.model.module.adapter is not None and parts.router.num_experts == 3
  assert parts.newline_ids == (inputs.newline if len(inputs.newline) == 1 else ())
  assert parts.sasrec.cfg == sasrec_stub.cfg and parts.n_items == 60
  # Weights read from files are fingerprinted.
  monkeypatch.setattr(llm, "loads_weights", lambda name: True)
  calls.clear()
  config.llm.unroll_decode, config.llm.init_std = True, 0.02  # init_std: presets only.
  parts, _, loaded = train_ilora.build(config, data, mesh, inputs)
  assert loaded == checkpointing.fingerprint(calls[1].params)
  assert parts.model.unroll_decode is True


def test_build_keeps_a_one_token_line_end_only(data, mesh, monkeypatch, sasrec_stub):
  inputs = _inputs(_config(), data, monkeypatch, sasrec_stub)
  for newline, kept in (((5,), (5,)), ((5, 6), ())):
    parts, _, _ = train_ilora.build(
      _config(), data, mesh, dataclasses.replace(inputs, newline=newline)
    )
    assert parts.newline_ids == kept


@pytest.mark.parametrize(
  "kind, cls, hidden", [("linear", router.LinearRouter, None), ("mlp", router.MLPRouter, 24),
                        ("resnet1d", router.ResNet1dRouter, None)],
)  # fmt: skip
def test_make_parts_follow_the_config(kind, cls, hidden):
  config = _config(
    f"router.kind={kind}", "router.hidden=24", "router.shortcut=pad", "lora.num_experts=4",
    "ilora.max_target_tokens=12", "llm.unroll_train=True",
  )  # fmt: skip
  model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=12))
  sas_cfg = train_sasrec.model_config(config, 60)
  parts = train_ilora.make_parts(config, model, sas_cfg, None, 60, 13, [7])
  assert parts.model is model and parts.sasrec.cfg == sas_cfg and parts.builder is None
  assert type(parts.router) is cls and parts.router.num_experts == 4
  if hidden is not None:
    assert parts.router.hidden == hidden
  if kind == "resnet1d":
    assert parts.router.shortcut == "pad"
  assert parts.projector.d_model == 12 and parts.lora_cfg.num_experts == 4
  assert parts.n_items == 60 and parts.newline_ids == (7,) and parts.unroll_train is True
  assert parts.max_target_tokens == 12  # 13 rounded up to 16, capped at 12.
  parts = train_ilora.make_parts(_config(), model, sas_cfg, None, 60, 13)
  assert parts.max_target_tokens == 16  # Within tiny.py's cap of 48.
  parts = train_ilora.make_parts(_config(), model, sas_cfg, None, 60, 50)
  assert parts.max_target_tokens == 48 and parts.newline_ids == () and parts.unroll_train is False


# ----------------------------------------------------------------------------- setup


class _Trainable:
  """Stand-ins for the slow parts of `setup`: what they were given and returned."""

  def __init__(self, monkeypatch, sasrec_stub, loaded=None):
    self.calls = []
    self.inputs = None
    real_inputs = train_ilora.prompt_inputs

    def prompt_inputs(config, workdir, dataset, mesh, generates):
      monkeypatch.setattr(
        train_ilora, "load_sasrec", lambda *a: (sasrec_stub.cfg, {"w": jnp.ones(3)})
      )
      self.inputs = real_inputs(config, workdir, dataset, mesh, generates)
      self.calls.append("inputs")
      return self.inputs

    def build(config, dataset, mesh, inputs):
      assert inputs is self.inputs
      self.calls.append("build")
      parts = types.SimpleNamespace(max_target_tokens=None)
      return parts, {"llm": {"e": jnp.zeros(2)}, "sasrec": inputs.sas_params}, loaded

    def init_trainable(parts, mesh, rules, seed):
      self.calls.append(("init", seed))
      trainable = {
        "lora": {"a": jnp.ones(4)},
        "router": {"w": jnp.ones((2, 2))},
        "projector": {"b": jnp.ones(3)},
      }
      return trainable, {"bn": jnp.zeros(2)}

    monkeypatch.setattr(train_ilora, "prompt_inputs", prompt_inputs)
    monkeypatch.setattr(train_ilora, "build", build)
    monkeypatch.setattr(train_ilora, "init_trainable", init_trainable)


def test_setup_computes_the_schedule_and_settings_and_checks_before_the_weights(
  data, monkeypatch, sasrec_stub
):
  config = _config(
    "ilora.train.epochs=3",
    "train.seed=11",
    "lora.gate=uniform",
    "ilora.max_target_tokens=3",
    ilora__train__steps=None,
  )
  stubs = _Trainable(monkeypatch, sasrec_stub, loaded="weights 1234")
  checks = []

  def check(settings, numerics):
    checks.append((dict(settings), dict(numerics), list(stubs.calls)))

  su = train_ilora.setup(config, "/w", check=check, dataset=data)
  per_epoch = 2080 // (4 * 2)  # Training rows // (micro-batch x accumulation).
  assert (su.micro, su.accum, su.steps_per_epoch, su.total_steps) == (
    4,
    2,
    per_epoch,
    3 * per_epoch,
  )
  assert su.seed == 11 and su.lr == 1e-3 and su.gate_kind == "uniform" and su.dataset is data
  assert stubs.calls == ["inputs", "build", ("init", 11)]
  # The first check sees the settings before the weights are read, the second with them.
  (first, num1, calls1), (second, num2, calls2) = checks
  assert calls1 == ["inputs"] and calls2 == ["inputs", "build"]
  assert first["llm_weights"] is None and second["llm_weights"] == "weights 1234"
  assert num2["llm_weights"] == "weights 1234" and su.settings == second
  assert first["batch"] == [4, 2] and first["total_steps"] == 3 * per_epoch and first["seed"] == 11
  assert first["train_rows"] == 2080 and first["lr"] == 1e-3 and first["data"] == "synthetic"
  assert first["bos"] == [] and first["target_slots"] == 3  # The cap: titles are longer.
  assert first["sasrec"] == "3 weights, |w| sum 3"
  assert {k: first[k] for k in num1} == num1
  # The state: trainable, statistics, optimizer state, step 0; the run's inputs.
  state = su.state
  assert set(state) == {"trainable", "stats", "opt_state", "step"}
  assert int(state["step"]) == 0 and state["step"].dtype == jnp.int32
  np.testing.assert_array_equal(state["trainable"]["lora"]["a"], np.ones(4))
  assert float(su.frozen["run"]["lr"]) == pytest.approx(1e-3)
  tx = su.make_tx(su.frozen["run"])
  assert jax.tree.structure(tx.init(state["trainable"])) == jax.tree.structure(state["opt_state"])
  for leaf in jax.tree.leaves([state["opt_state"], state["step"]]):  # Counters too.
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == su.mesh
  # Coupled L2 (tiny.py: 1e-5) on router and projector only: with zero gradients Adam steps
  # the router's weights (all ones) down by the learning rate, and leaves the adapters and
  # the projector (no gradient: a step without hybrid prompts); with one, it decays too.
  run = {"lr": np.float32(0.5), "total_steps": np.int32(10), "warmup_steps": np.int32(0)}
  tx = su.make_tx(run)
  trainable = state["trainable"]
  zeros = jax.tree.map(jnp.zeros_like, trainable)
  updates, _ = tx.update(zeros, tx.init(trainable), trainable)
  np.testing.assert_array_equal(updates["lora"]["a"], 0.0)
  np.testing.assert_array_equal(updates["projector"]["b"], 0.0)
  assert np.all(np.asarray(updates["router"]["w"]) < 0)
  some = dict(zeros, projector={"b": jnp.asarray([0.0, 1e-9, 0.0])})
  updates, _ = tx.update(some, tx.init(trainable), trainable)
  assert np.all(np.asarray(updates["projector"]["b"]) < -0.1)


def test_setup_without_files_weights_checks_once_and_keeps_them_unset(
  data, monkeypatch, sasrec_stub
):
  stubs = _Trainable(monkeypatch, sasrec_stub, loaded=None)
  checks = []
  su = train_ilora.setup(_config(), "/w", check=lambda s, n: checks.append(s), dataset=data)
  assert len(checks) == 1 and su.settings["llm_weights"] is None
  assert su.total_steps == 6 and stubs.calls[-1] == ("init", _config().train.seed)


def test_setup_refuses_too_few_rows_and_no_new_tokens(data, monkeypatch, sasrec_stub):
  _Trainable(monkeypatch, sasrec_stub)
  with pytest.raises(
    UserError, match="the training split has 2080 rows, fewer than one step of 520 x 5"
  ):
    train_ilora.setup(
      _config("ilora.train.batch_size=520", "ilora.train.grad_accum=5"), "/w", dataset=data
    )
  su = train_ilora.setup(
    _config("ilora.train.batch_size=520", "ilora.train.grad_accum=4"), "/w", dataset=data
  )
  assert su.steps_per_epoch == 1
  with pytest.raises(UserError, match="config.ilora.max_new_tokens=0: must be >= 1"):
    train_ilora.setup(_config(ilora__max_new_tokens=0), "/w", dataset=data)
  train_ilora.setup(
    _config("ilora.eval_generate=False", ilora__max_new_tokens=0), "/w", dataset=data
  )


# ----------------------------------------------------------------------------- the step's jit


def test_jit_train_step_donates_the_state_and_not_the_frozen_weights():
  mesh = _one_device_mesh()
  repl = sharding.replicated(mesh)
  rows = NamedSharding(mesh, PartitionSpec("data"))
  state = {
    "w": jax.device_put(jnp.arange(4.0), rows),
    "step": jax.device_put(jnp.zeros((), jnp.int32), repl),
  }
  frozen = {"llm": jax.device_put(jnp.ones(4), repl)}  # Could alias the loss: donated, it would.
  su = types.SimpleNamespace(mesh=mesh, state=state, frozen=frozen)

  def step(state, frozen, batch):
    new = {"w": state["w"] + frozen["llm"].sum(), "step": state["step"] + 1}
    return new, batch.sum(0) * frozen["llm"]

  jitted, batch_sh = train_ilora.jit_train_step(su, step)
  assert batch_sh == NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
  new, loss = jitted(state, frozen, np.ones((2, 4), np.float32))
  np.testing.assert_array_equal(new["w"], [4.0, 5.0, 6.0, 7.0])
  np.testing.assert_array_equal(loss, [2.0, 2.0, 2.0, 2.0])
  assert int(new["step"]) == 1
  assert new["w"].sharding == rows and loss.sharding.is_equivalent_to(repl, 1)
  assert state["w"].is_deleted() and not frozen["llm"].is_deleted()


def test_init_opt_state_follows_the_parameters_and_replicates_counters():
  mesh = _one_device_mesh()
  rows = NamedSharding(mesh, PartitionSpec("data"))
  trainable = {
    "a": jax.device_put(jnp.ones((4, 2)), rows),
    "b": jax.device_put(jnp.ones(3), sharding.replicated(mesh)),
  }
  opt_state = train_ilora.init_opt_state(optax.adam(1e-3), trainable, mesh)
  mu, nu = opt_state[0].mu, opt_state[0].nu
  assert mu["a"].sharding == rows and nu["a"].sharding == rows
  assert mu["b"].sharding.spec == PartitionSpec()
  count = opt_state[0].count
  assert isinstance(count.sharding, NamedSharding) and count.sharding.mesh == mesh
  assert count.sharding.spec == PartitionSpec()
  for leaf in jax.tree.leaves(opt_state):
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh


def test_count_adds_the_sizes_of_every_leaf():
  tree = {"a": np.zeros((2, 3)), "b": [np.zeros(()), jnp.zeros((4, 1, 5))]}
  assert train_ilora._count(tree) == 6 + 1 + 20
  assert train_ilora._count({}) == 0


# ----------------------------------------------------------------------------- main


# `ilora_jax.main` and `ilora_jax.experiments` both define the absl flag --workdir, so they
# cannot share a process: the scenarios run in one child process, each stage's function
# replaced by one that records its call.
MAIN_SCRIPT = """
import json, os, sys
sys.path.insert(0, "configs")
from ilora_jax import compile_cache, configuration, console, main, train_ilora, train_sasrec
from ilora_jax.errors import UserError

ran, sasrec_result = [], [{}]
console.quiet_libraries = lambda: None
compile_cache.enable = lambda path: None


def check_llm(config):
  ran.append("check_llm")
  if config.llm.name == "typo":
    raise UserError("unknown LLM typo")


train_ilora.check_llm = check_llm
train_ilora.run = lambda c, w: ran.append("ilora " + w)
train_ilora.evaluate = lambda c, w: ran.append("evaluate ilora " + w)
train_sasrec.evaluate = lambda c, w: ran.append("evaluate sasrec " + w)
train_sasrec.run = lambda c, w: ran.append("sasrec " + w) or sasrec_result[0]
results = []
try:
  main.parse(["main", "--config=configs/tiny.py"])
except UserError as exc:
  results.append(str(exc))
for workdir, overrides, stopped, values in json.loads(sys.argv[1]):
  config = configuration.load("configs/tiny.py", overrides)
  for key, value in values.items():  # Set past the loader's checks.
    *path, last = key.split(".")
    node = config
    for name in path:
      node = node[name]
    node[last] = value
  main.parse = lambda argv: (config, workdir)
  del ran[:]
  sasrec_result[0] = None if stopped else {}
  try:
    main.main.__wrapped__(["main"])  # Errors as raised, not as an exit.
    results.append([list(ran), os.path.isdir(workdir)])
  except UserError as exc:
    results.append([list(ran), os.path.isdir(workdir), str(exc)])
print(json.dumps(results))
"""


def test_main_runs_the_functions_of_each_stage_in_order(tmp_path):
  import json
  import subprocess

  w = str(tmp_path / "new" / "w")  # Its parent is missing too.
  (tmp_path / "file").write_text("x")
  scenarios = [
    (w, ["stage=sasrec"], False),
    (w + "2", ["stage=ilora"], False),
    (w + "3", ["stage=pipeline"], False),
    (w + "4", ["stage=pipeline"], True),  # SASRec stopped early: no iLoRA.
    (str(tmp_path), ["stage=evaluate", "eval.stage=sasrec"], False),
    (str(tmp_path), ["stage=evaluate", "eval.stage=ilora"], False),
    (w + "5", ["stage=evaluate"], False),  # A missing workdir to evaluate: a typo.
    (str(tmp_path / "file" / "w"), ["stage=sasrec"], False),  # Cannot be created.
    (w + "6", ["stage=sasrec"], False, {"train.seed": -1}),  # Checked before anything runs.
    (w + "7", ["stage=pipeline"], False, {"llm.name": "typo"}),  # Before the workdir is made.
  ]
  scenarios = [(*s, {}) if len(s) == 3 else s for s in scenarios]
  proc = subprocess.run(
    [sys.executable, "-c", MAIN_SCRIPT, json.dumps(scenarios)],
    cwd=ROOT, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  required, *results = json.loads(proc.stdout.splitlines()[-1])
  assert required == "--workdir is required"
  assert results[:6] == [
    [[f"sasrec {w}"], True],
    [[f"ilora {w}2"], True],
    [["check_llm", f"sasrec {w}3", f"ilora {w}3"], True],
    [["check_llm", f"sasrec {w}4"], True],
    [[f"evaluate sasrec {tmp_path}"], True],
    [[f"evaluate ilora {tmp_path}"], True],
  ]
  missing, unwritable, invalid, no_llm = results[6:]
  assert no_llm == [["check_llm"], False, "unknown LLM typo"]
  assert invalid[:2] == [[], False] and "config.train.seed=-1" in invalid[2]
  assert missing == [[], False, f"--workdir={w}5 is no folder: stage=evaluate reads the workdir "
                     "of a trained run"]  # fmt: skip
  assert unwritable == [[], False, f"cannot create workdir {tmp_path / 'file' / 'w'}: "
                        f"{tmp_path / 'file'} is a file, not a folder"]  # fmt: skip


# ----------------------------------------------------------------------------- console


def test_info_prints_a_line_on_stderr_in_process_0_only(monkeypatch, capsys):
  console.info("hello")
  assert capsys.readouterr() == ("", "hello\n")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  console.info("hello")
  assert capsys.readouterr() == ("", "")


def _ours(logger) -> list:
  """The logger's filters that `console.quiet_libraries` adds."""
  return [f for f in logger.filters if isinstance(f, console._DropBackgroundTracebacks)]


def test_quiet_libraries_keeps_warnings_and_drops_background_noise(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(("unraisable", u.exc_value)))
  monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(("except", a[1])))
  loggers = {n: logging.getLogger(n) for n in ("absl", "orbax", "jax")}
  levels = {n: lg.level for n, lg in loggers.items()}
  filters = {n: list(lg.filters) for n, lg in loggers.items()}
  try:
    for lg in loggers.values():  # As in a new process (an earlier test may have added them).
      lg.filters[:] = [f for f in lg.filters if f not in _ours(lg)]
    console.quiet_libraries()
    hooks = (sys.unraisablehook, sys.excepthook)
    console.quiet_libraries()  # Twice: wrapped once, one filter each.
    assert (sys.unraisablehook, sys.excepthook) == hooks
    for name, lg in loggers.items():
      assert lg.level == logging.WARNING, name
      assert len(_ours(lg)) == (0 if name == "jax" else 1), name
    closed, other = RuntimeError("Event loop is closed"), RuntimeError("boom")
    sys.unraisablehook(types.SimpleNamespace(exc_value=closed))
    sys.unraisablehook(types.SimpleNamespace(exc_value=other))
    sys.excepthook(RuntimeError, closed, None)
    sys.excepthook(ValueError, ValueError("Event loop is closed"), None)
    assert [(k, str(v)) for k, v in seen] == [
      ("unraisable", "boom"),
      ("except", "Event loop is closed"),
    ]
    (drop,) = _ours(loggers["orbax"])

    def record(msg, exc=False):
      r = logging.LogRecord("orbax", logging.ERROR, "f", 1, msg, None, None)
      r.exc_info = (RuntimeError, RuntimeError(), None) if exc else None
      return r

    assert not drop.filter(record("in _SignalingThread: failed", exc=True))
    assert drop.filter(record("in _SignalingThread: failed"))  # No traceback: kept.
    # A commit's failure and the wait for the finalize thread, as Orbax 0.12 words them.
    commit = "[process=0] Failed to run 4 Handler Commit operations or the Commit callback in "
    assert not drop.filter(record(commit + "background save thread, directory: /c/4", exc=True))
    finalize = "[process=0][thread=MainThread][step=4][wait_until_finished] Save Finalize thread"
    assert not drop.filter(record(finalize + " (save_finalize) failed.", exc=True))
    assert drop.filter(record(finalize + " (save_finalize) to complete."))
    assert drop.filter(record("another failure", exc=True))
    assert not drop.filter(record("Metadata file does not exist: /c/3"))
    assert drop.filter(record("the Metadata file does not exist"))
  finally:
    for name, lg in loggers.items():
      lg.setLevel(levels[name])
      lg.filters[:] = filters[name]


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("mode", ["r+", "x", "a+", "rb"])
def test_atomic_write_refuses_every_mode_but_a_whole_file_write(tmp_path, mode):
  from ilora_jax import files

  path = tmp_path / "f"
  path.write_text("old")
  with pytest.raises(ValueError, match=f"mode '{re.escape(mode)}' is not a 'w' mode"):
    with files.atomic_write(str(path), mode):
      pass
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["f"]
