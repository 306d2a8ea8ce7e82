"""The iLoRA stage on 8 CPU devices: same losses on every mesh, arrays sharded by the rules."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
  ROOT,
  TINY,
  complete_steps,
  ilora_records,
  run_cli,
  start_processes,
  with_sasrec_of,
  xla_flags,
)

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]

# Runs in a child process: the device count is fixed when JAX starts.
_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, os.path.join(ROOT, "configs"))
import jax
import tiny
from ilora_jax import configuration, llm, train_ilora, sharding

def _spec(spec):  # "P(None, 'fsdp')" whatever the jax version's repr.
  return "P(" + ", ".join(repr(a) for a in tuple(spec)) + ")"

out = {}
for data, fsdp, tensor in MESHES:
  config = configuration.override(tiny.get_config(), RUN)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  workdir = os.path.join(BASE, f"mesh_{data}{fsdp}{tensor}")
  train_ilora.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  losses = [r["loss"] for r in records if r["stage"] == "ilora" and r["split"] == "train"]
  # Where the arrays live on this mesh: the setup places them exactly as the run does.
  su = train_ilora.setup(config, workdir)
  mesh = su.mesh
  # Evaluation of the same untrained state, rows split by the mesh.
  ev = train_ilora.Evaluator(su.parts, config, su.dataset.val, su.gate_kind, mesh)
  metrics = ev(su.state["trainable"], su.state["stats"], su.frozen, False)
  evals = {"metrics": metrics, "scores": ev.scores["model"].tolist(),
           "rows_per_device": ev.rows_per_device, "shards": ev.row_shards}
  expected = llm.mesh_shardings(su.parts.model.config, mesh, sharding.rules(config),
                                su.parts.model.module.adapter)
  def specs(tree):
    return {jax.tree_util.keystr(p): [_spec(a.sharding.spec), list(a.sharding.shard_shape(a.shape))]
            for p, a in jax.tree_util.tree_leaves_with_path(tree)}
  llm_params = su.frozen["llm"]
  lora = su.state["trainable"]["lora"]
  want = {jax.tree_util.keystr(p): _spec(s.spec)
          for p, s in jax.tree_util.tree_leaves_with_path(expected)}
  moments = {k: v for k, v in specs(su.state["opt_state"]).items() if ".mu['lora']" in k}
  # The memory plan, from shapes and rules alone, against the bytes each device really holds.
  from ilora_jax import plan as plan_lib
  planned = plan_lib.plan(config, jax.device_count(), llama_cfg=su.parts.model.config,
                          n_items=su.parts.n_items)
  def real(*trees):
    per = {}
    for x in jax.tree.leaves(trees):
      for shard in x.addressable_shards:
        per[shard.device.id] = per.get(shard.device.id, 0) + shard.data.nbytes
    return max(per.values())
  memory = {
    "planned": {k: planned[k + "_bytes"] for k in ("frozen_llm", "frozen_sasrec", "trainable",
                                                    "optimizer")},
    "real": {"frozen_llm": real(su.frozen["llm"]), "frozen_sasrec": real(su.frozen["sasrec"]),
             "trainable": real(su.state["trainable"], su.state["stats"]),
             "optimizer": real(su.state["opt_state"])},
  }
  out[f"{data}x{fsdp}x{tensor}"] = {"losses": losses, "llm": specs(llm_params),
                                    "lora": specs(lora), "want": want, "moments": moments,
                                    "memory": memory, "eval": evals}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def mesh_runs(pipeline, tmp_path_factory):
  pipeline_dir, _ = pipeline  # Its trained SASRec, frozen under every mesh's run.
  base = tmp_path_factory.mktemp("meshes")
  for data, fsdp, tensor in MESHES:
    with_sasrec_of(pipeline_dir, base / f"mesh_{data}{fsdp}{tensor}")
  out = {}
  for devices in (1, 8):  # 1x1x1 on one device, the others on eight.
    meshes = [m for m in MESHES if (m == (1, 1, 1)) == (devices == 1)]
    code = f"ROOT = {ROOT!r}\nBASE = {str(base)!r}\nMESHES = {meshes!r}\nRUN = {_RUN!r}\n" + _SCRIPT
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
    proc = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out.update(json.loads(line[len("RESULT ") :]))
  for data, fsdp, tensor in MESHES:
    out[f"{data}x{fsdp}x{tensor}"]["workdir"] = str(base / f"mesh_{data}{fsdp}{tensor}")
  return out


# The settings of every mesh's run (`_SCRIPT`); the two-process test gives them as flags.
_RUN = ["stage=ilora", "train.batch_size=8", "train.grad_accum=2", "train.steps=3",
        "ilora.eval_rows=4", "ilora.eval_batch_size=4", "ilora.max_new_tokens=2",
        "ilora.pad_multiple=384",  # Every prompt (224-320 tokens) one length: one compile each.
        "ilora.eval_base=False"]  # fmt: skip


def test_every_mesh_gives_the_same_losses(mesh_runs):
  ref = np.array(mesh_runs["1x1x1"]["losses"])
  assert len(ref) == 3 and np.all(np.isfinite(ref))
  for name, run in mesh_runs.items():
    np.testing.assert_allclose(run["losses"], ref, rtol=2e-5, err_msg=name)


def test_evaluation_splits_rows_over_the_data_shards_with_the_same_results(mesh_runs):
  ref = mesh_runs["1x1x1"]["eval"]
  assert ref["rows_per_device"] == 4 and ref["shards"] == 1
  assert {"hr@1", "valid_ratio", "loss"} <= set(ref["metrics"])
  for name, run in mesh_runs.items():
    ev = run["eval"]
    data, fsdp, _ = map(int, name.split("x"))
    assert ev["shards"] == data * fsdp, name
    # 4 rows padded to a multiple of the shards, then split: each device scored its share.
    assert ev["rows_per_device"] == -(-4 // ev["shards"]), name
    np.testing.assert_allclose(ev["scores"], ref["scores"], rtol=1e-4, atol=1e-4, err_msg=name)
    for key, value in ref["metrics"].items():
      assert ev["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, key)


def test_arrays_are_sharded_as_the_rules_say(mesh_runs):
  run = mesh_runs["2x2x2"]
  # Rules: embed -> fsdp, heads/kv_heads/mlp/vocab -> tensor, layers and lora_rank unsplit.
  spec, shard = run["llm"]["['layers']['attn']['q']['kernel']"]
  assert spec == "P(None, 'fsdp', 'tensor', None)", spec
  assert shard[1:3] == [64 // 2, 4 // 2]  # tiny: embed 64 over fsdp=2, 4 heads over tensor=2.
  spec, shard = run["llm"]["['layers']['mlp']['down']['kernel']"]
  assert spec == "P(None, 'tensor', 'fsdp')", spec
  spec, shard = run["llm"]["['embedding']"]
  assert spec == "P('tensor', 'fsdp')", spec
  assert shard[0] * 2 == 49152 + 128  # Vocabulary grown by the special tokens, padded to 128.
  spec, _ = run["lora"]["['layers']['attn']['q']['adapter']['lora_a']"]
  assert spec == "P(None, 'fsdp', None)", spec
  spec, _ = run["lora"]["['layers']['mlp']['down']['adapter']['lora_b']"]
  assert spec == "P(None, None, 'fsdp')", spec
  # Adam moments follow their parameters' shardings.
  moments = run["moments"]
  assert moments
  for path, (spec, _) in moments.items():
    param = path.split(".mu['lora']")[1]
    assert spec == run["lora"][param][0], path
  for tree in ("llm", "lora"):
    for path, (spec, _) in run[tree].items():
      assert spec == run["want"][path], path
  # The all-data mesh keeps every weight whole on each device.
  whole = mesh_runs["1x1x1"]["llm"]
  for path, (_, shard) in mesh_runs["8x1x1"]["llm"].items():
    assert shard == whole[path][1], path


def test_memory_plan_equals_the_real_arrays(mesh_runs):
  """`ilora_jax.plan` (shapes + rules, no devices) vs the bytes each device really holds."""
  for name, run in mesh_runs.items():
    assert run["memory"]["planned"] == run["memory"]["real"], name
  # Sharding shrinks what one device holds: fsdp x tensor = 4 splits the frozen LLM.
  whole = mesh_runs["1x1x1"]["memory"]["real"]["frozen_llm"]
  assert mesh_runs["2x2x2"]["memory"]["real"]["frozen_llm"] < whole / 2


def test_plan_cli_for_a_7b_model_on_1_8_and_64_devices():
  proc = run_cli("--config=configs/movielens.py", "--config.llm.name=llama2-7b",
                 "--config.plan.devices=1,8,64", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                 "--config.ilora.train.batch_size=64", module="ilora_jax.plan")  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [r["devices"] for r in results] == [1, 8, 64]
  one, eight, many = results
  # bf16 Llama-2-7B (6,738,415,616 parameters, vocabulary grown to 32,128) on one device.
  assert one["params_total"] == 6_738_415_616 + 2 * 128 * 4096  # Embedding and head grow.
  assert one["frozen_llm_bytes"] == 2 * one["params_total"]
  assert eight["frozen_llm_bytes"] == one["frozen_llm_bytes"] // 8  # Every weight splits by 8.
  assert many["frozen_llm_bytes"] < eight["frozen_llm_bytes"] / 4
  assert many["activations_estimate_bytes"] < one["activations_estimate_bytes"] / 32


def test_two_processes_match_one_process_with_eight_devices(mesh_runs, pipeline, tmp_path):
  """jax.distributed on CPU: 2 processes x 4 devices, mesh 2x2x2, from the command line ==
  the fixture's run of the same settings in 1 process x 8 devices: every record of training,
  the val evaluations (target loss, generation, scoring) and the test evaluation."""
  single = mesh_runs["2x2x2"]["workdir"]
  multi = with_sasrec_of(pipeline[0], tmp_path / "multi")
  args = [TINY, f"--workdir={multi}", *[f"--config.{o}" for o in _RUN],
          "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]  # fmt: skip
  procs = start_processes(args, args)
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err
  assert "iLoRA: trainable" in outs[0][1] and "iLoRA: trainable" not in outs[1][1]  # Rank 0 logs.
  ours, ref = ilora_records(multi), ilora_records(single)
  assert [(r["split"], r["step"]) for r in ours] == [(r["split"], r["step"]) for r in ref]
  assert {"hr@1", "valid_ratio", "loss"} <= set(ref[-1])  # Both modes ran in the evaluations.
  for a, b in zip(ours, ref):
    assert set(a) == set(b), (a["split"], a["step"])
    for key, value in b.items():
      if isinstance(value, float):
        assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a["split"], a["step"], key)
  assert complete_steps(multi) == complete_steps(single)  # Orbax wrote them collectively.
