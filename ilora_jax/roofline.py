r"""A roofline estimate of a compiled GPU program's run time, read from its optimized HLO.

Without a GPU there is no profile, but XLA's GPU compiler (compile-only devices,
`bench/gpu_plan.py`) still says exactly which kernels a program launches: each fusion,
cuBLAS call, cuDNN attention or convolution and copy of the scheduled computations, and how
often each loop body runs. Each kernel gets the time of the slower of its two limits:

    time = max(flops / matmul rate, bytes moved / memory bandwidth) + a launch overhead

  - flops: 2 M N K for a cuBLAS matmul, a GEMM fusion or the cuBLAS call inside XLA's
    dynamic-slice fusion (K from the contracting dimensions); for cuDNN's fused attention
    4 b h s_q s_kv d forward (half of it with a causal mask) and 2.5 times that backward
    (five matmuls against two); other fusions and convolutions count bytes only;
  - bytes: what the kernel reads and writes. A fusion reads each operand whole, except an
    operand it only slices (a layer's weights out of the stacked ones: the slice's bytes) or
    only updates in place (a cache or stacked buffer: nothing read); an in-place update
    writes only the update. Custom calls (matmuls, attention) read their operands and write
    their results, less the library's scratch workspace;
  - float32 matmuls run at half the bf16 rate (TF32 on Hopper, as XLA's default precision
    allows).

Loops count their body once per iteration (XLA's known trip count; a loop that may stop
early, like greedy decoding, counts `unknown_trip_count`), a conditional its costliest
branch.

It is a model, not a measurement: no overlap of kernels, no cache reuse between kernels, no
wave quantisation, a matmul at the same rate whatever its shape (thin ones are limited by
their bytes anyway). Its use is to compare programs (remat policies, decode loops, fusions)
and to see where a step's time should go. Against the card (bench/README.md, the programs
of the commit the H100 measured on 2026-11-27): train step 312 ms predicted for 309
measured (remat none) and 299 for 305 (dots); greedy generation 1010 ms for 1041 (scanned
decode) and 877 for 853 (unrolled); the SmolLM2-135M-shape step, mostly kernel launches,
39.9 ms for 35.6.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
# Ops that launch nothing: bookkeeping, views, control flow (costed through its bodies).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier",
         "after-all", "add-dependency", "partition-id", "replica-id", "while", "conditional",
         "call", "copy-done", "send-done", "recv-done", "all-reduce-done", "all-gather-done",
         "collective-permute-done", "async-done", "async-update"}  # fmt: skip
_SLICES = {"slice", "dynamic-slice", "gather"}


@dataclasses.dataclass(frozen=True)
class Device:
  """The rates a kernel's time is taken from."""

  name: str
  matmul_flops_per_s: float  # bf16 dense matmul rate reached in practice
  bytes_per_s: float  # memory bandwidth reached in practice
  launch_s: float  # per kernel: launch and the gap between kernels


# An H100 SXM 80GB: 661 TFLOP/s is what a bf16 8192^3 matmul reached in JAX on the card
# (the benchmark issue); 90% of the 3.35 TB/s of HBM3; a few microseconds per kernel.
H100 = Device("H100 SXM", 661e12, 0.9 * 3.35e12, 3e-6)
# An H200: the H100's compute with 4.8 TB/s of HBM3e (not calibrated on a card).
H200 = Device("H200", 661e12, 0.9 * 4.8e12, 3e-6)


def device_for(kind: str) -> Device | None:
  """The model of a JAX device kind, or None for a device without one: the SXM cards only
  ('NVIDIA H100 80GB HBM3', 'NVIDIA H200'); the PCIe and NVL variants and the GH200 have
  other rates."""
  kind = kind.strip()
  if kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"):
    return H100
  if kind in ("NVIDIA H200", "NVIDIA H200 SXM 141GB"):
    return H200
  return None


@dataclasses.dataclass
class Instr:
  name: str
  shape: str  # the HLO type text, e.g. "bf16[8,512]{1,0}" or a tuple "(f32[2], s8[4])"
  opcode: str
  operands: list[str]
  attrs: str
  root: bool


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  pairs = {"(": ")", "{": "}", "[": "]"}
  closing = set(pairs.values())
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      depth += 1
    elif c in closing:
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _split_top(text: str) -> list[str]:
  """Splits at the commas outside brackets."""
  out, depth, cur = [], 0, []
  for c in text:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    if c == "," and depth == 0:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(c)
  if cur:
    out.append("".join(cur))
  return out


def parse(hlo_text: str) -> tuple[dict[str, list[Instr]], str | None]:
  """({computation: its instructions}, the entry computation's name) of an HLO module."""
  comps: dict[str, list[Instr]] = {}
  entry = current = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(ENTRY )?%(\S+) \(", line)
    if head and line.rstrip().endswith("{"):
      current = head.group(2)
      comps[current] = []
      if head.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    # XLA numbers long operand lists and tuples with /*index=N*/ comments.
    m = re.match(r"^\s*(ROOT )?%(\S+) = (.*)$", re.sub(r"/\*.*?\*/", "", line))
    if not m:
      continue
    rest = m.group(3)
    end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w-]+)\(", rest)
    if not op:
      continue
    close = _balanced(rest, op.end() - 1)
    operands = [a.strip().split()[-1][1:] for a in _split_top(rest[op.end() : close - 1])
                if a.strip().split() and a.strip().split()[-1].startswith("%")]  # fmt: skip
    comps[current].append(Instr(m.group(2), shape, op.group(1), operands, rest[close:],
                                bool(m.group(1))))  # fmt: skip
  return comps, entry


def called(instr: Instr, key: str) -> str | None:
  """The computation an instruction names by `key` ('body', 'condition', 'calls', ...)."""
  m = re.search(rf"\b{key}=%([^,\s]+)", instr.attrs)
  return m.group(1) if m else None


def trip_count(instr: Instr) -> int | None:
  """A while loop's trip count where XLA knows it (its backend config), else None."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
  return int(m.group(1)) if m else None


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)]


def _arrays_bytes(arrays: list[tuple[str, tuple[int, ...]]]) -> int:
  return sum(_BYTES[t] * math.prod(dims) for t, dims in arrays)


def shape_bytes(shape: str) -> int:
  """Bytes of the arrays in an HLO type (a tuple's elements summed)."""
  return _arrays_bytes(_arrays(shape))


def _result_bytes(shape: str) -> int:
  """Bytes a custom call writes: its results, less the scratch workspace cuBLAS and cuDNN
  add as a last 1-D s8 / u8 array."""
  arrays = _arrays(shape)
  if len(arrays) > 1 and arrays[-1][0] in ("s8", "u8") and len(arrays[-1][1]) == 1:
    arrays = arrays[:-1]
  return _arrays_bytes(arrays)


def _backend(attrs: str) -> dict:
  m = re.search(r"backend_config=(\{.*\})", attrs)
  if not m:
    return {}
  text = m.group(1)
  try:
    return json.loads(text[: _balanced(text, 0)])
  except ValueError:
    return {}


def _op_name(attrs: str) -> str:
  m = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attrs)
  return m.group(1) if m else ""


@dataclasses.dataclass
class Kernel:
  """One launched kernel's estimate: `count` launches of it in a run of the program."""

  name: str
  kind: str  # matmul, attention, convolution, fusion, slice_copy, copy, in_place, other
  flops: float
  bytes: float
  seconds: float  # per launch: max(compute_s, bytes / bandwidth) + the launch overhead
  count: int
  op_name: str
  compute_s: float = 0.0  # per launch: flops at the kernel's matmul rate


class _Costs:
  def __init__(self, comps: dict[str, list[Instr]], device: Device, unknown_trip_count: int):
    self.comps = comps
    self.unknown_trip_count = unknown_trip_count
    self.device = device
    self.shapes = {i.name: i.shape for instrs in comps.values() for i in instrs}
    self.unknown_trip_counts = 0

  def _read(self, name: str) -> int:
    return shape_bytes(self.shapes.get(name, ""))

  def _fusion_bytes(self, instr: Instr) -> int:
    """What a fusion reads and writes (see the module docstring)."""
    body = self.comps.get(called(instr, "calls"), [])
    if not body:
      return shape_bytes(instr.shape) + sum(self._read(o) for o in instr.operands)
    users = collections.defaultdict(list)
    by_name = {i.name: i for i in body}
    for i in body:
      for pos, o in enumerate(i.operands):
        users[o].append((i, pos))

    def final_users(name):  # Users past bitcasts.
      out = []
      for u, pos in users[name]:
        out.extend(final_users(u.name) if u.opcode == "bitcast" else [(u, pos)])
      return out

    total = 0
    for p in body:
      if p.opcode != "parameter":
        continue
      us = final_users(p.name)
      if us and all(u.opcode in _SLICES and pos == 0 for u, pos in us):
        total += sum(shape_bytes(u.shape) for u, _ in us)
      elif us and all(u.opcode == "dynamic-update-slice" and pos == 0 for u, pos in us):
        pass  # Updated in place: not read.
      else:
        total += shape_bytes(p.shape)
    root = next((i for i in body if i.root), body[-1])
    outs = [by_name[o] for o in root.operands if o in by_name] if root.opcode == "tuple" else [root]
    for out in outs:
      while out.opcode == "bitcast" and out.operands and out.operands[0] in by_name:
        out = by_name[out.operands[0]]
      if out.opcode == "dynamic-update-slice" and len(out.operands) > 1:
        total += self._read(out.operands[1])  # Only the update is written.
      else:
        total += shape_bytes(out.shape)
    return total

  def _rate(self, lhs_dtype: str) -> float:
    """The matmul rate for an operand dtype: float32 at half the bf16 rate (TF32)."""
    rate = self.device.matmul_flops_per_s
    return rate / 2 if lhs_dtype == "f32" else rate

  def _dot_compute_s(self, instr: Instr) -> tuple[float, float]:
    """(flops, seconds at its rate) of a `dot`: 2 M N K."""
    lhs = _arrays(self.shapes.get(instr.operands[0], "")) if instr.operands else []
    dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
    out = _arrays(instr.shape)
    if not (lhs and out):
      return 0.0, 0.0
    axes = [int(d) for d in dims.group(1).split(",") if d] if dims else [len(lhs[0][1]) - 1]
    flops = 2.0 * math.prod(out[0][1]) * math.prod(lhs[0][1][a] for a in axes)
    return flops, flops / self._rate(lhs[0][0])

  def _custom_call_compute(self, instr: Instr) -> tuple[str, float, float]:
    """(kind, flops, seconds at its rate) of a custom call: cuBLAS matmuls 2 M N K (K from
    the contracting dimensions of its config, the lhs's last axis when it has none); cuDNN's
    fused attention 4 b h s_q s_kv d (halved by a causal mask; 2.5 times that backward)."""
    attrs = instr.attrs
    target = re.search(r'custom_call_target="([^"]+)"', attrs)
    target = target.group(1) if target else ""
    config = _backend(attrs)
    if "cublas" in target or "gemm" in target.lower():
      lhs = _arrays(self.shapes.get(instr.operands[0], "")) if instr.operands else []
      out = _arrays(instr.shape)
      if not (lhs and out):
        return "matmul", 0.0, 0.0
      dims = config.get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
      axes = [int(d) for d in dims.get("lhs_contracting_dimensions", [])] or [len(lhs[0][1]) - 1]
      flops = 2.0 * math.prod(out[0][1]) * math.prod(lhs[0][1][a] for a in axes)
      return "matmul", flops, flops / self._rate(lhs[0][0])
    if "fmha" in target:
      at = attrs.find("operand_layout_constraints={")
      qk = _arrays(attrs[at : _balanced(attrs, attrs.index("{", at))]) if at >= 0 else []
      if len(qk) < 2 or len(qk[0][1]) != 4 or len(qk[1][1]) != 4:
        return "attention", 0.0, 0.0
      (b, sq, h, d), sk = qk[0][1], qk[1][1][1]
      flops = 4.0 * b * h * sq * sk * d
      fmha = config.get("cudnn_fmha_backend_config", {})
      if "CAUSAL" in str(fmha.get("mask_type", "")):
        flops /= 2
      if "Backward" in target:
        flops *= 2.5
      return "attention", flops, flops / self._rate(qk[0][0])
    if "conv" in target:
      return "convolution", 0.0, 0.0
    return "other", 0.0, 0.0

  def _fusion_compute(self, instr: Instr) -> tuple[str | None, float, float]:
    """(kind or None, flops, seconds) of the matmuls inside a fusion: a GEMM fusion's dots
    (Triton's, where it is on) and the cuBLAS or cuDNN calls of XLA's dynamic-slice fusion
    (an `address_computation` fusion: the call reads its operand's slice in place)."""
    kind, flops, seconds = None, 0.0, 0.0
    for i in self.comps.get(called(instr, "calls"), []):
      if i.opcode == "dot":
        f, t = self._dot_compute_s(i)
        kind = "matmul"
      elif i.opcode == "custom-call":
        kind, f, t = self._custom_call_compute(i)
      else:
        continue
      flops, seconds = flops + f, seconds + t
    return kind, flops, seconds

  def _kernel(self, instr: Instr) -> Kernel | None:
    op, attrs = instr.opcode, instr.attrs
    flops = compute = 0.0
    if op in _FREE:
      return None
    if op == "fusion":
      kind = "fusion"
      if "dynamic_update_slice" in instr.name or "dynamic-update-slice" in instr.name:
        kind = "in_place"
      elif "concatenate" in instr.name:
        kind = "copy"
      elif "slice" in instr.name:
        kind = "slice_copy"
      moved = self._fusion_bytes(instr)
      inner, flops, compute = self._fusion_compute(instr)
      kind = inner or kind
    elif op == "custom-call":
      kind, flops, compute = self._custom_call_compute(instr)
      moved = _result_bytes(instr.shape) + sum(self._read(o) for o in instr.operands)
    elif op == "dynamic-update-slice":
      kind, moved = "in_place", 2 * self._read(instr.operands[1])
    elif op in _SLICES:
      kind, moved = "slice_copy", 2 * shape_bytes(instr.shape)
    elif op in ("copy", "transpose", "concatenate", "pad", "copy-start"):
      kind = "copy"
      moved = shape_bytes(instr.shape) + sum(self._read(o) for o in instr.operands)
    else:
      kind = "other"
      moved = shape_bytes(instr.shape) + sum(self._read(o) for o in instr.operands)
    seconds = max(compute, moved / self.device.bytes_per_s) + self.device.launch_s
    return Kernel(instr.name, kind, flops, moved, seconds, 1, _op_name(attrs), compute)

  def run(self, comp: str, times: int, out: list[Kernel], depth: int = 0) -> None:
    """Appends the kernels of `comp` run `times` times, control flow followed."""
    if depth > 64:
      return
    for instr in self.comps.get(comp, []):
      if instr.opcode == "while":
        n = trip_count(instr)
        self.unknown_trip_counts += n is None
        n = self.unknown_trip_count if n is None else n
        for key, runs in (("body", n), ("condition", n + 1)):
          if called(instr, key):
            self.run(called(instr, key), times * runs, out, depth + 1)
      elif instr.opcode == "conditional":
        names = re.findall(r"%([\w.\-]+)", " ".join(
          re.findall(r"(?:branch_computations=\{[^}]*\}|(?:true|false)_computation=%[\w.\-]+)",
                     instr.attrs)))  # fmt: skip
        branches, before = [], self.unknown_trip_counts
        for name in names:
          ks: list[Kernel] = []
          self.unknown_trip_counts = 0
          self.run(name, times, ks, depth + 1)
          branches.append((sum(k.seconds * k.count for k in ks), ks, self.unknown_trip_counts))
        self.unknown_trip_counts = before
        if branches:  # The costliest branch.
          _, ks, unknown = max(branches, key=lambda branch: branch[0])
          out.extend(ks)
          self.unknown_trip_counts += unknown
      elif instr.opcode in ("call", "async-start"):
        inner = called(instr, "to_apply") or called(instr, "calls")
        if inner:
          self.run(inner, times, out, depth + 1)
      else:
        k = self._kernel(instr)
        if k is not None:
          k.count = times
          out.append(k)


def kernels(
  hlo_text: str, device: Device = H100, unknown_trip_count: int = 1
) -> tuple[list[Kernel], int]:
  """(every kernel one run of the program launches, with its launch count; the number of
  loops whose trip count XLA did not know, each counted as `unknown_trip_count` iterations:
  a decode loop that may stop early runs at most its number of new tokens less one)."""
  comps, entry = parse(hlo_text)
  costs = _Costs(comps, device, unknown_trip_count)
  out: list[Kernel] = []
  if entry:
    costs.run(entry, 1, out)
  return out, costs.unknown_trip_counts


_SCAFFOLD = {"while", "body", "cond", "closed_call", "checkpoint", "rematted_computation",
             "step", "main"}  # fmt: skip


def _label(op_name: str) -> str:
  """A short JAX-side label of an op: its path inside the layer block (or the program), with
  the tracing scaffolding (loops, remat, jit and autodiff wrappers) left out."""
  parts = [p for p in op_name.split("/") if p]
  blocks = [i for i, p in enumerate(parts) if p.endswith("_block")]
  if blocks:
    parts = parts[blocks[-1] + 1 :]
  out = []
  for p in parts:
    while (m := re.fullmatch(r"[\w.]+\((.*)\)", p)) is not None:  # jit(f), transpose(jvp(f))
      p = m.group(1)
    if p and p not in _SCAFFOLD:
      out.append(p)
  return "/".join(out[-4:]) or "?"


def estimate(
  hlo_text: str, device: Device = H100, top: int = 10, unknown_trip_count: int = 1
) -> dict:
  """The program's estimated seconds on `device`: `seconds`, `matmul_flops`, `bytes`,
  `kernels` (launches), `by_kind` ({kind: seconds}), `bound` ({'compute' | 'memory' |
  'launch': seconds}: which limit set each kernel's time), `unknown_trip_counts` and `top`
  (the `top` JAX ops by seconds: label, kind, seconds, launches)."""
  ks, unknown = kernels(hlo_text, device, unknown_trip_count)
  by_kind: dict[str, float] = collections.defaultdict(float)
  bound = {"compute": 0.0, "memory": 0.0, "launch": 0.0}
  groups: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for k in ks:
    total = k.seconds * k.count
    by_kind[k.kind] += total
    compute = k.compute_s
    memory = k.bytes / device.bytes_per_s
    bound["launch"] += device.launch_s * k.count
    bound["compute" if compute > memory else "memory"] += total - device.launch_s * k.count
    g = groups[(_label(k.op_name), k.kind)]
    g[0] += total
    g[1] += k.count
  ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
  return {
    "device": device.name,
    "seconds": sum(k.seconds * k.count for k in ks),
    "matmul_flops": sum(k.flops * k.count for k in ks),
    "bytes": sum(k.bytes * k.count for k in ks),
    "kernels": sum(k.count for k in ks),
    "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
    "bound": bound,
    "unknown_trip_counts": unknown,
    "top": [
      {"label": label, "kind": kind, "seconds": s, "launches": int(n)}
      for (label, kind), (s, n) in ranked
    ],  # fmt: skip
  }
