r"""XLA's plan of the benchmark's programs for an H100, compiled on a machine without a GPU.

  pip install "jax[cuda12]==<this jax's version>"   # CUDA plugin and libraries; no driver
  python bench/gpu_plan.py --config=configs/movielens.py --config.llm.name=llama2-7b \
      --config.bench.batch_size=8 --config.bench.seq_len=512 --config.bench.eval_batch_size=16 \
      --config.bench.eval_prompt_len=400 --config.bench.eval_new_tokens=32 \
      --programs=train,generate,generate_unrolled,both

JAX's CUDA plugin makes compile-only devices from a target description (`H100_SXM` below:
an H100 SXM 80GB, compute capability 9.0, 132 SMs, 3.35 TB/s), so XLA's GPU compiler runs
here as it would on the card, minus autotuning. Abstract weights of the configured model
(`jax.eval_shape` of the benchmark's own setup, `ilora_jax.bench.build`) make a 7B shape fit
on a laptop. For each program, with the config's numerics (bf16 and cuDNN attention unless
overridden):

  - XLA's memory plan: argument, output, aliased (donated) and scratch bytes, and the peak
    they imply (arguments + scratch + outputs - aliased; the allocator's own overhead and
    cuBLAS/cuDNN workspaces outside XLA's plan are not in it);
  - for each loop (the layer scans, the decode loop), what its body writes per iteration
    (`ilora_jax.bench.loop_census`): weights cut out of the stacked layers or concatenated by
    XLA's dot merger are copies, memory traffic on top of the matmuls' reads;
  - a roofline estimate of its time on the card (`ilora_jax.roofline`): every kernel XLA
    launches, loop bodies once per iteration (the decode loop, of unknown length to XLA, as
    `bench.eval_new_tokens - 1` steps), at the slower of its matmul and memory limits plus a
    launch, with the `--top` costliest JAX ops; calibrated against the card's 2026-11-27
    measurements (bench/README.md);
  - XLA's compile seconds here (no autotuning, a different machine: not a GPU's compile time).

Programs: `train` (the jitted train step, state donated), `generate` and `generate_unrolled`
(greedy generation of `bench.eval_new_tokens` with the scanned / unrolled decode loop),
`both` (`scoring.generate_and_score`: both evaluation modes from one prefill, as validation
runs them, `bench.eval_candidates` candidates packed). Triton GEMMs are off
(`--xla_gpu_enable_triton_gemm=false`): without autotuning XLA cannot tile some of them.
The last line is one JSON object.
"""

from __future__ import annotations

import os

# Before JAX starts: no GPU backend is opened (there is none), the CUDA plugin only compiles.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false"
).strip()

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from ilora_jax import (  # noqa: E402
  bench,
  configuration,
  console,
  errors,
  llm,
  roofline,
  scoring,
  sharding,
  train_ilora,
)
from ilora_jax.errors import UserError  # noqa: E402

_CONFIG = errors.define_config_file("config", "configs/movielens.py")
_PROGRAMS = flags.DEFINE_list(
  "programs", "train,generate,generate_unrolled,both", "programs to compile (see the docstring)"
)
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "writes each program's optimized HLO here")
_TOP = flags.DEFINE_integer("top", 8, "the roofline's costliest JAX ops listed per program")

# The card, as XLA's GPU compiler sees it (stream_executor.GpuTargetConfigProto, text format):
# figures of an H100 SXM 80GB HBM3.
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
PROGRAMS = ("train", "generate", "generate_unrolled", "both")


def gpu_mesh() -> Mesh:
  """A one-device mesh over a compile-only H100."""
  from jax.experimental import topologies

  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=H100_SXM, topology="1x1x1")
  except (NotImplementedError, RuntimeError) as exc:
    raise UserError(
      "no CUDA compiler: install JAX's CUDA plugin for this jax "
      f'(pip install "jax[cuda12]=={jax.__version__}"); {str(exc).splitlines()[0]}'
    ) from None
  return Mesh(np.array(topo.devices).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def abstract_setup(config):
  """(parts, make_tx, frozen, state) of the benchmark's setup with shape-only arrays."""
  held = {}
  place = train_ilora.init_opt_state
  # Placing the optimizer state inspects concrete arrays' shardings; one device needs none.
  train_ilora.init_opt_state = lambda tx, trainable, mesh: tx.init(trainable)
  try:

    def build():
      parts, frozen, state, make_tx = bench.build(config, sharding.make_mesh(config.mesh))
      held.update(parts=parts, make_tx=make_tx)
      return frozen, state

    frozen, state = jax.eval_shape(build)
  finally:
    train_ilora.init_opt_state = place
  return held["parts"], held["make_tx"], frozen, state


def _on(tree, target):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target), tree)


def _compile(name: str, jitted, *args, loop_trips: int = 1, **kwargs) -> dict:
  compiled, times = bench.lower_and_compile(jitted, *args, **kwargs)
  seconds = times["trace"] + times["xla"]
  text = compiled.as_text()
  if _HLO_DIR.value:
    with open(os.path.join(_HLO_DIR.value, f"{name}.hlo"), "w") as f:
      f.write(text)
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
  return {
    "compile_here_s": seconds,
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "peak_bytes": int(peak - m.alias_size_in_bytes),
    "loops": bench.loop_census(text),
    # The decode loop may stop early, so XLA does not know its trip count: at most
    # eval_new_tokens - 1 steps, all of which the benchmark runs (no stop token).
    "roofline": roofline.estimate(text, top=_TOP.value, unknown_trip_count=loop_trips),
  }


def plan(config, programs) -> dict:
  """{program: its plan} for `config`'s benchmark shapes on one compile-only H100."""
  bc = config.bench
  mesh = gpu_mesh()
  repl = NamedSharding(mesh, PartitionSpec())
  with sharding.compiling_for("gpu"):  # The GPU's code paths (attention, adapter gradients).
    parts, make_tx, frozen, state = abstract_setup(config)
    frozen, state = _on(frozen, repl), _on(state, repl)
    out = {}
    if "train" in programs:
      step, batch_sh = bench.jit_train_step(config, mesh, parts, frozen, state, make_tx)
      host = bench.random_batch(parts, bc.grad_accum, bc.batch_size, bc.seq_len, bc.target_tokens)
      out["train"] = _compile("train", step, state, frozen, _on(host, batch_sh))
    out.update(_decoding_plans(config, programs, parts, frozen, state, repl))
  return out


def _decoding_plans(config, programs, parts, frozen, state, repl) -> dict:
  """The generation and evaluation programs' plans (`plan`)."""
  bc = config.bench
  out = {}
  b, t, cfg = bc.eval_batch_size, bc.eval_prompt_len, parts.model.config
  params = jax.eval_shape(train_ilora._merge, frozen["llm"], state["trainable"]["lora"])
  params = _on(params, repl)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=repl)  # noqa: E731
  prompt = (params, spec((b, t), jnp.int32), spec((b, t), jnp.int32))
  kwargs = dict(
    gate_weights=spec((b, config.lora.num_experts), jnp.float32),
    replace_mask=spec((b, t), jnp.bool_),
    replace_embeds=spec((b, t, cfg.hidden_size), jnp.dtype(cfg.dtype)),
    max_new_tokens=bc.eval_new_tokens,
    eos_ids=(),
    pad_id=0,
  )
  module = parts.model.module
  for name, unroll in (("generate", False), ("generate_unrolled", True)):
    if name in programs:
      out[name] = _compile(name, llm.generate_tokens, module, *prompt, **kwargs, unroll=unroll,
                           loop_trips=bc.eval_new_tokens - 1)  # fmt: skip
  if "both" in programs:
    n, cl = bc.eval_candidates, bc.eval_candidate_len
    cands = (spec((b, n, cl), jnp.int32), spec((b, n, cl), jnp.int32))
    packed = scoring.packed_length(np.ones((b, n, cl), np.int32))
    out["both"] = _compile("both", scoring.generate_and_score, module, *prompt, *cands, **kwargs,
                           packed_len=packed, unroll=bool(config.llm.unroll_decode),
                           loop_trips=bc.eval_new_tokens - 1)  # fmt: skip
  return out


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  programs = [p for p in _PROGRAMS.value if p.strip()]
  if not programs:
    raise UserError(f"--programs is empty: name one or more of {', '.join(PROGRAMS)}")
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown:
    raise UserError(f"--programs: unknown {', '.join(unknown)}; known: {', '.join(PROGRAMS)}")
  if _TOP.value < 1:
    raise UserError(f"--top={_TOP.value}: must be >= 1")
  configuration.validate(config)
  bench.check_config(config)
  if _HLO_DIR.value:  # Created (or refused) before the first program compiles.
    bench.writable_folder("hlo_dir", _HLO_DIR.value)
  console.quiet_libraries()
  with sharding.compiling_for("gpu"):
    attention = train_ilora.attention_impl(config)  # What `auto` picks on a GPU.
  result = plan(config, programs)
  gib = 2.0**30
  print(f"{config.llm.name} on an H100 (compile-only), {config.llm.dtype}, attention "
        f"{attention}, remat {config.llm.remat}")  # fmt: skip
  for name, p in result.items():
    print(f"{name}: peak {p['peak_bytes'] / gib:.2f} GiB (arguments "
          f"{p['argument_bytes'] / gib:.2f}, scratch {p['temp_bytes'] / gib:.2f}, outputs "
          f"{p['output_bytes'] / gib:.2f}, aliased {p['alias_bytes'] / gib:.2f}); compiled here "
          f"in {p['compile_here_s']:.1f} s")  # fmt: skip
    r = p["roofline"]
    kinds = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["by_kind"].items())
    print(f"  roofline on the card: {r['seconds'] * 1e3:.1f} ms ({kinds}; of which kernel "
          f"launches {r['bound']['launch'] * 1e3:.1f}), {r['kernels']} kernels, "
          f"{r['matmul_flops'] / 1e12:.1f} TFLOP, {r['bytes'] / 2**30:.1f} GiB moved")  # fmt: skip
    for t in r["top"]:
      print(f"    {t['seconds'] * 1e3:8.2f} ms  x{t['launches']:<5d} {t['kind']:<11s} {t['label']}")
    for loop in p["loops"]:
      copies = (loop["slice_copies_bytes"] + loop["concat_copies_bytes"]) / 2**20
      print(f"  loop x{loop['trip_count'] or '?'}: copies {copies:.1f} MiB per iteration "
            f"({loop['slice_copies_count']} slices, {loop['concat_copies_count']} "
            f"concatenations), {loop['matmuls_count']} matmuls")  # fmt: skip
  summary = {"model": config.llm.name, "target": "H100 SXM (compile-only)",
             "dtype": config.llm.dtype, "attention": attention,
             "remat": config.llm.remat, "programs": result}  # fmt: skip
  print(json.dumps(summary))


@errors.cli_main
def cli(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  errors.parse_flags(flags.FLAGS, argv)  # A bad flag or config key: one error line.
  main(argv)


if __name__ == "__main__":
  cli()
