r"""Where the benchmark's train step (or generation) spends its time, by HLO op and kind of work.

  taskset -c 0 python bench/profile_step.py --config=configs/movielens.py \
      --config.llm.name=smollm2-135m-random --config.llm.dtype=float32 \
      --config.llm.param_dtype=float32 --config.bench.batch_size=4 --config.bench.seq_len=256

Compiles the benchmark's train step (`ilora_jax.bench.train_stepper`), runs one warm-up
step, then `--steps` steps under `jax.profiler.trace` (the trace is kept in --out, for
Perfetto or TensorBoard, beside the compiled module as `step.hlo.txt`). Every executed HLO op
of the trace is matched to its instruction in the compiled module, whose metadata names the
JAX operation it came from, and put in one kind (see `KINDS`): matmul (dot_general, however
XLA fused it), dropout bits (threefry), attention softmax, layer slices (dynamic-slice of the
scanned weights), scan stacking (dynamic-update-slice of the saved residuals), fills
(broadcasts), copies and transposes, and other element-wise work. An op is a matmul by what
it runs, not by its metadata: a dot or convolution, a fusion with one among its fused
instructions (XLA:CPU's YNNPACK and oneDNN fusions hold their dot), or a custom call to a
matmul library (cuBLAS, oneDNN).

Prints the kinds and the `--top` ops, per step, with the wall-clock step; the last line is one
JSON object. On a CPU, XLA runs independent ops on two threads and YNNPACK matmuls split
their work over threads that leave no events, so the per-op times add up to the wall clock
only on one core: pin the process (`taskset -c 0`) for a ledger that sums.

--mode=generate profiles greedy generation instead (`ilora_jax.bench.generate_stepper`: the
adapted model, `bench.eval_batch_size` random prompts of `bench.eval_prompt_len` tokens,
`bench.eval_new_tokens` tokens without early stop, the loop `llm.unroll_decode` picks), and
adds the decode loop's ops per decode step by kind (JSON: `decode_step_ops_s`,
`decode_step_kinds_s`), apart from the prefill:

  taskset -c 0 python bench/profile_step.py --mode=generate --steps=1 \
      --config=configs/movielens.py --config.llm.name=smollm2-135m-random \
      --config.llm.dtype=float32 --config.llm.param_dtype=float32 \
      --config.bench.eval_batch_size=16 --config.bench.eval_prompt_len=400 \
      --config.bench.eval_new_tokens=17
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
from absl import flags

from ilora_jax import bench, configuration, console, errors, roofline
from ilora_jax.errors import UserError

_CONFIG = errors.define_config_file("config", None, "config file (configs/movielens.py)")
_STEPS = flags.DEFINE_integer("steps", 3, "profiled steps (after one warm-up step)")
_TOP = flags.DEFINE_integer("top", 15, "ops listed, the slowest first")
_OUT = flags.DEFINE_string("out", "", "folder for the trace (default: a new temporary one)")
_MODE = flags.DEFINE_enum(
  "mode", "train", ["train", "generate"],
  "train: the train step; generate: greedy generation of bench.eval_new_tokens tokens for a "
  "batch of the bench.eval_* shape (prefill and decode loop)",
)  # fmt: skip
_DECODE_LOOP = "/while/body/"  # The decode loop's ops, in generate's HLO op_names.

# (kind, test on (opcode, instruction name, JAX sources, inner opcodes)), the first match
# wins. The sources are the instruction's own op_name first, then those of the computation it
# calls (a fusion's fused instructions); the inner opcodes are those of the computations it
# calls, nested fusions included, and a custom call's "target:<name>". A fusion is a matmul
# when one of its fused instructions is a dot or convolution (XLA:CPU fuses reductions and
# element-wise work around a dot, the loss's log-softmax around the LM head for one), never
# by metadata alone (a fusion of a dot's neighbours can carry its op_name); dropout bits when
# any source comes from threefry (fused into the mask's test).
_MATMUL_TARGET = re.compile(r"target:.*(matmul|gemm|conv)", re.I)
KINDS = (
  ("matmul", lambda op, name, src, inner=frozenset(): op in ("dot", "convolution")
   or bool(inner & {"dot", "convolution"}) or any(_MATMUL_TARGET.match(i) for i in inner)),
  ("dropout bits", lambda op, name, src, *_: any("threefry" in s for s in src)),
  ("attention softmax", lambda op, name, src, *_: "/attn/" in src[0] and any(
    k in src[0] for k in ("reduce_max", "exp", "reduce_sum", "div", "select_n", "softmax"))),
  ("layer slices", lambda op, name, src, *_: op == "dynamic-slice" or "dynamic-slice" in name),
  ("scan stacking", lambda op, name, src, *_: op == "dynamic-update-slice"
   or "dynamic-update-slice" in name or "dynamic_update_slice" in src[0]),
  ("fills", lambda op, name, src, *_: "broadcast" in name),
  ("copies and transposes", lambda op, name, src, *_: "copy" in name or "transpose" in name),
  ("other element-wise", lambda op, name, src, *_: True),
)  # fmt: skip
_CONTROL = ("while", "conditional", "call", "tuple", "get-tuple-element", "parameter")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def instructions(hlo_text: str) -> dict[str, tuple[str, tuple[str, ...], frozenset]]:
  """Instruction name -> (opcode, JAX sources, inner opcodes) of every instruction in an HLO
  module (`roofline.parse`); the sources are its op_name metadata, then those inside the
  computation it calls (XLA leaves some fusions without their own), or ('',) when there is
  none; the inner opcodes, those of the computations it calls (nested calls too) and, for a
  custom call, its "target:<name>"."""
  comps, _ = roofline.parse(hlo_text)

  def own_opcodes(instr: roofline.Instr) -> set[str]:
    target = _TARGET.search(instr.attrs)
    return {instr.opcode, f"target:{target.group(1)}"} if target else {instr.opcode}

  def reached(computation: str | None) -> frozenset:
    seen, todo, out = set(), [computation] if computation else [], set()
    while todo:
      c = todo.pop()
      if c not in seen and c in comps:
        seen.add(c)
        for instr in comps[c]:
          out |= own_opcodes(instr)
          todo.append(roofline.called(instr, "calls"))
    return frozenset(out - {None})

  def source(instr: roofline.Instr) -> str:
    found = _OP_NAME.search(instr.attrs)
    return found.group(1) if found else ""

  known = {}
  for instr in (i for body in comps.values() for i in body):
    calls = roofline.called(instr, "calls")
    src = [source(instr)] + [source(i) for i in comps.get(calls, ())]
    inner = reached(calls) | (own_opcodes(instr) - {instr.opcode})
    known[instr.name] = (instr.opcode, tuple(s for s in src if s) or ("",), inner)
  return known


def kind_of(opcode: str, name: str, src: tuple[str, ...], inner: frozenset = frozenset()) -> str:
  """The kind (`KINDS`) of an instruction, from `instructions`' opcode, sources and inner
  opcodes."""
  return next(kind for kind, test in KINDS if test(opcode, name, src, inner))


def _kind(known: dict, name: str) -> str:
  opcode, src, inner = known[name]
  return kind_of(opcode, name, src, inner)


def is_decode_loop(source: str) -> bool:
  """Whether an op of generate's module runs in the decode loop (not in the prefill): its
  JAX source is the loop's body, `jit(generate_tokens)/while/body/...`."""
  head = source.split(_DECODE_LOOP, 1)[0]
  return _DECODE_LOOP in source and "/" not in head.removeprefix("jit(generate_tokens)")


def op_times(trace_events: list[dict], known: dict) -> dict[str, float]:
  """Microseconds per executed HLO op (complete events named like a non-control instruction)."""
  times: dict[str, float] = collections.Counter()
  for event in trace_events:
    name = event.get("name", "")
    if event.get("ph") == "X" and name in known and known[name][0] not in _CONTROL:
      times[name] += float(event.get("dur", 0.0))
  return times


def output_folder(path: str) -> str:
  """The trace's folder `path`, created, or refused as one line when it cannot be created or
  written (checked before anything is profiled); '' as is (a new temporary one, later)."""
  return bench.writable_folder("out", path) if path else path  # The trace, step.hlo.txt.


def main(argv) -> None:
  del argv
  configuration.validate(_CONFIG.value)  # One line naming a bad field, as ilora_jax.bench.
  bench.check_config(_CONFIG.value)
  if _STEPS.value < 1:
    raise UserError(f"--steps={_STEPS.value}: must be >= 1")
  if _TOP.value < 1:
    raise UserError(f"--top={_TOP.value}: must be >= 1")
  out = output_folder(_OUT.value)
  stepper = bench.train_stepper if _MODE.value == "train" else bench.generate_stepper
  console.info(f"profile_step: building and compiling the {_MODE.value} program")
  compiled, step = stepper(_CONFIG.value)
  console.info("profile_step: warm-up")
  step()  # warm-up
  console.info(f"profile_step: tracing {_STEPS.value} steps")
  out = out or tempfile.mkdtemp(prefix="ilora_jax_profile_")
  with jax.profiler.trace(out, create_perfetto_trace=True):
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
      step()
    step_s = (time.perf_counter() - t0) / _STEPS.value  # Not the trace's write-out.
  paths = sorted(glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True))
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  hlo = compiled.as_text()
  with open(os.path.join(out, "step.hlo.txt"), "w") as f:  # The module the names refer to.
    f.write(hlo)
  known = instructions(hlo)
  times = op_times(events, known)
  per_step = {name: us / 1e6 / _STEPS.value for name, us in times.items()}
  kinds: dict[str, float] = collections.Counter()
  for name, seconds in per_step.items():
    kinds[_kind(known, name)] += seconds
  total = sum(per_step.values())
  print(f"step {step_s:.3f} s wall; ops {total:.3f} s summed over threads", file=sys.stderr)
  print(f"{'kind':<24}{'s/step':>9}{'share':>8}", file=sys.stderr)
  for kind, _ in KINDS:
    print(f"{kind:<24}{kinds[kind]:>9.3f}{kinds[kind] / total:>8.1%}", file=sys.stderr)
  decode = {}
  if _MODE.value == "generate":  # The decode loop's share: per call, and per decode step.
    steps = int(_CONFIG.value.bench.eval_new_tokens) - 1  # The first token comes from prefill.
    in_loop = {n: t for n, t in per_step.items() if is_decode_loop(known[n][1][0])}
    loop_kinds: dict[str, float] = collections.Counter()
    for name, seconds in in_loop.items():
      loop_kinds[_kind(known, name)] += seconds / steps
    decode = {
      "decode_loop_s": sum(in_loop.values()),
      "decode_step_ops_s": sum(in_loop.values()) / steps,
      "decode_step_kinds_s": {kind: loop_kinds[kind] for kind, _ in KINDS},
    }
    loop_s = decode["decode_loop_s"]
    print(f"\ndecode loop {loop_s:.3f} s of ops; per decode step:", file=sys.stderr)
    for kind, _ in KINDS:
      print(f"  {kind:<22}{loop_kinds[kind]:>9.4f}", file=sys.stderr)
  top = sorted(per_step.items(), key=lambda kv: -kv[1])[: _TOP.value]
  print(f"\n{'op':<32}{'s/step':>9}  source", file=sys.stderr)
  for name, seconds in top:
    print(f"{name:<32}{seconds:>9.3f}  {known[name][1][0][-90:]}", file=sys.stderr)
  result = {
    "device": jax.devices()[0].device_kind,
    "step_s": step_s,
    "ops_s": total,
    "kinds_s": {kind: kinds[kind] for kind, _ in KINDS},
    "top": [
      {"op": n, "s": s, "kind": _kind(known, n), "source": known[n][1][0]} for n, s in top
    ],  # fmt: skip
    "trace": out,
    "mode": _MODE.value,
    **decode,
  }
  print(json.dumps(result))


if __name__ == "__main__":
  errors.run_script(main, default_config="configs/movielens.py")
