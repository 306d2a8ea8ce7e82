"""`ilora_jax.roofline`: kernels, flops and bytes read from a GPU compile, against formulas."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from ilora_jax import roofline

# An H100 compile's layout (bench/gpu_plan.py), shortened to one loop of four iterations: the
# layer's weights sliced out of the stack (a slice fusion), a cuBLAS matmul and its output
# written into a stacked buffer in place; the entry adds a transpose and a conditional whose
# costlier branch counts.
_MODULE = """
HloModule jit_step, entry_computation_layout={(bf16[128,256]{1,0})->bf16[128,512]{1,0}}

%fused_slice (param_0.1: bf16[4,256,512], param_1.1: s32[]) -> bf16[256,512] {
  %param_0.1 = bf16[4,256,512]{2,1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %constant_1 = s32[] constant(0)
  %dynamic-slice.1 = bf16[1,256,512]{2,1,0} dynamic-slice(%param_0.1, %param_1.1, %constant_1, %constant_1), dynamic_slice_sizes={1,256,512}
  ROOT %bitcast.1 = bf16[256,512]{1,0} bitcast(%dynamic-slice.1)
}

%fused_dynamic_update_slice (param_0.2: bf16[4,128,512], param_1.2: bf16[128,512], param_2.2: s32[]) -> bf16[4,128,512] {
  %param_0.2 = bf16[4,128,512]{2,1,0} parameter(0)
  %param_1.2 = bf16[128,512]{1,0} parameter(1)
  %bitcast.2 = bf16[1,128,512]{2,1,0} bitcast(%param_1.2)
  %param_2.2 = s32[] parameter(2)
  %constant_2 = s32[] constant(0)
  ROOT %dynamic-update-slice.2 = bf16[4,128,512]{2,1,0} dynamic-update-slice(%param_0.2, %bitcast.2, %param_2.2, %constant_2, %constant_2)
}

%fused_add (param_0.3: f32[8,4], param_1.3: f32[8,4]) -> f32[8,4] {
  %param_0.3 = f32[8,4]{1,0} parameter(0)
  %param_1.3 = f32[8,4]{1,0} parameter(1)
  ROOT %add.3 = f32[8,4]{1,0} add(%param_0.3, %param_1.3)
}

%body.1 (arg.1: (s32[], bf16[128,256], bf16[4,256,512], bf16[4,128,512])) -> (s32[], bf16[128,256], bf16[4,256,512], bf16[4,128,512]) {
  %arg.1 = (s32[], bf16[128,256]{1,0}, bf16[4,256,512]{2,1,0}, bf16[4,128,512]{2,1,0}) parameter(0)
  %get-tuple-element.0 = s32[] get-tuple-element(%arg.1), index=0
  %get-tuple-element.1 = bf16[128,256]{1,0} get-tuple-element(%arg.1), index=1
  %get-tuple-element.2 = bf16[4,256,512]{2,1,0} get-tuple-element(%arg.1), index=2
  %get-tuple-element.3 = bf16[4,128,512]{2,1,0} get-tuple-element(%arg.1), index=3
  %loop_dynamic_slice_fusion = bf16[256,512]{1,0} fusion(%get-tuple-element.2, %get-tuple-element.0), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/while/body/layers/jit(dynamic_index_in_dim)/dynamic_slice"}
  %custom-call.1 = (bf16[128,512]{1,0}, s8[4194304]{0}) custom-call(%get-tuple-element.1, %loop_dynamic_slice_fusion), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/while/body/layers/layers._block/mlp/up/btd,df->btf/dot_general"}, backend_config={"operation_queue_id":"0","gemm_backend_config":{"selected_algorithm":"0","alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  %get-tuple-element.4 = bf16[128,512]{1,0} get-tuple-element(%custom-call.1), index=0
  %loop_dynamic_update_slice_fusion = bf16[4,128,512]{2,1,0} fusion(%get-tuple-element.3, %get-tuple-element.4, %get-tuple-element.0), kind=kLoop, calls=%fused_dynamic_update_slice
  ROOT %tuple.1 = (s32[], bf16[128,256]{1,0}, bf16[4,256,512]{2,1,0}, bf16[4,128,512]{2,1,0}) tuple(%get-tuple-element.0, %get-tuple-element.1, %get-tuple-element.2, %loop_dynamic_update_slice_fusion)
}

%cond.1 (arg.2: (s32[], bf16[128,256], bf16[4,256,512], bf16[4,128,512])) -> pred[] {
  %arg.2 = (s32[], bf16[128,256]{1,0}, bf16[4,256,512]{2,1,0}, bf16[4,128,512]{2,1,0}) parameter(0)
  ROOT %constant.9 = pred[] constant(true)
}

%small.1 (arg.3: f32[8,4]) -> f32[8,4] {
  %arg.3 = f32[8,4]{1,0} parameter(0)
  ROOT %loop_add_fusion = f32[8,4]{1,0} fusion(%arg.3, %arg.3), kind=kLoop, calls=%fused_add
}

%big.1 (arg.4: f32[8,4]) -> f32[8,4] {
  %arg.4 = f32[8,4]{1,0} parameter(0)
  %copy.4 = f32[4,8]{0,1} copy(%arg.4)
  %loop_add_fusion.1 = f32[8,4]{1,0} fusion(%arg.4, %arg.4), kind=kLoop, calls=%fused_add
  ROOT %loop_add_fusion.2 = f32[8,4]{1,0} fusion(%loop_add_fusion.1, %arg.4), kind=kLoop, calls=%fused_add
}

ENTRY %main.1 (x: bf16[128,256], w: bf16[4,256,512], acc: bf16[4,128,512], p: pred[], g: f32[8,4]) -> bf16[4,128,512] {
  %x = bf16[128,256]{1,0} parameter(0)
  %w = bf16[4,256,512]{2,1,0} parameter(1)
  %acc = bf16[4,128,512]{2,1,0} parameter(2)
  %p = pred[] parameter(3)
  %g = f32[8,4]{1,0} parameter(4)
  %constant.0 = s32[] constant(0)
  %transpose.1 = bf16[256,128]{1,0} transpose(%x), dimensions={1,0}
  %conditional.1 = f32[8,4]{1,0} conditional(%p, %g, %g), true_computation=%small.1, false_computation=%big.1
  %tuple.0 = (s32[], bf16[128,256]{1,0}, bf16[4,256,512]{2,1,0}, bf16[4,128,512]{2,1,0}) tuple(%constant.0, %x, %w, %acc)
  %while.1 = (s32[], bf16[128,256]{1,0}, bf16[4,256,512]{2,1,0}, bf16[4,128,512]{2,1,0}) while(%tuple.0), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %get-tuple-element.9 = bf16[4,128,512]{2,1,0} get-tuple-element(%while.1), index=3
}
"""  # noqa: E501

_DEVICE = roofline.Device("test", matmul_flops_per_s=10e12, bytes_per_s=1e12, launch_s=2e-6)


def _by_name(kernels):
  return {k.name: k for k in kernels}


def test_kernels_of_a_gpu_module_carry_the_formulas_flops_and_bytes():
  ks, unknown = roofline.kernels(_MODULE, _DEVICE)
  assert unknown == 0
  k = _by_name(ks)
  # The loop body's four kernels, each launched once per iteration.
  matmul = k["custom-call.1"]
  assert matmul.kind == "matmul" and matmul.count == 4
  assert matmul.flops == 2 * 128 * 512 * 256  # 2 M N K
  assert matmul.bytes == 2 * (128 * 256 + 256 * 512 + 128 * 512)  # both operands, the output
  sliced = k["loop_dynamic_slice_fusion"]
  # Reads the one layer it slices (not the stack of 4) and the index, writes the layer.
  assert sliced.kind == "slice_copy" and sliced.bytes == 2 * (2 * 256 * 512) + 4
  update = k["loop_dynamic_update_slice_fusion"]
  # Reads the update (and the index) and writes it in place: the stacked buffer is neither
  # read nor rewritten.
  assert update.kind == "in_place" and update.bytes == 2 * (2 * 128 * 512) + 4
  assert k["transpose.1"].count == 1 and k["transpose.1"].bytes == 2 * (2 * 128 * 256)
  # The conditional: the costlier branch (a copy and two fusions) counts, the other does not.
  assert {"copy.4", "loop_add_fusion.1", "loop_add_fusion.2"} <= set(k)
  assert "loop_add_fusion" not in k
  assert k["loop_add_fusion.2"].bytes == 3 * 8 * 4 * 4
  assert len(ks) == 3 + 1 + 3
  for kernel in ks:  # Each kernel's time: the slower of its two limits, plus a launch.
    limit = max(kernel.flops / _DEVICE.matmul_flops_per_s, kernel.bytes / _DEVICE.bytes_per_s)
    assert kernel.seconds == pytest.approx(limit + _DEVICE.launch_s)
  # 2 x 128 x 512 x 256 flops at 10 TFLOP/s (3.4 us) against 458,752 bytes at 1 TB/s.
  assert matmul.seconds == pytest.approx(2 * 128 * 512 * 256 / 10e12 + 2e-6)


def test_estimate_sums_launches_times_and_kinds():
  ks, _ = roofline.kernels(_MODULE, _DEVICE)
  result = roofline.estimate(_MODULE, _DEVICE, top=3)
  want = sum(k.seconds * k.count for k in ks)
  assert result["seconds"] == pytest.approx(want)
  assert result["kernels"] == 4 * 3 + 1 + 3
  assert result["matmul_flops"] == 4 * 2 * 128 * 512 * 256
  assert sum(result["by_kind"].values()) == pytest.approx(want)
  assert sum(result["bound"].values()) == pytest.approx(want)
  assert result["bound"]["launch"] == pytest.approx(result["kernels"] * _DEVICE.launch_s)
  assert len(result["top"]) == 3
  assert result["top"][0]["seconds"] >= result["top"][1]["seconds"] >= result["top"][2]["seconds"]
  assert result["top"][0]["label"] == "mlp/up/btd,df->btf/dot_general"


def test_a_loop_of_unknown_length_counts_the_given_trip_count():
  module = _MODULE.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
  ks, unknown = roofline.kernels(module, _DEVICE, unknown_trip_count=7)
  assert unknown == 1
  assert _by_name(ks)["custom-call.1"].count == 7


# cuDNN's fused attention, forward (causal) and backward, as an H100 compile prints them: the
# backward's seven operands and four results numbered with /*index=N*/ comments, a workspace
# last; XLA's dynamic-slice fusion (`--xla_gpu_enable_dynamic_slice_fusion=true`): a cuBLAS
# call inside a fusion, reading a layer's weights in place in the stack; a float32 matmul.
_KERNELS = """
%address_computation.1 (p0: bf16[4,256,512], p1: bf16[128,256], p2: s32[]) -> bf16[128,512] {
  %p0 = bf16[4,256,512]{2,1,0} parameter(0)
  %p1 = bf16[128,256]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  %slice.1 = bf16[1,256,512]{2,1,0} dynamic-slice(%p0, %p2, %c0, %c0), dynamic_slice_sizes={1,256,512}
  %bitcast.1 = bf16[256,512]{1,0} bitcast(%slice.1)
  %gemm.1 = (bf16[128,512]{1,0}, s8[4194304]{0}) custom-call(%p1, %bitcast.1), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %get-tuple-element.1 = bf16[128,512]{1,0} get-tuple-element(%gemm.1), index=0
}

ENTRY %main.3 (q: bf16[2,64,4,32], k: bf16[2,48,4,32], v: bf16[2,48,4,32], o: bf16[2,4,64,32], st: f32[2,4,64], do: bf16[2,4,64,32], w: bf16[4,256,512], x: bf16[128,256], i: s32[], a: f32[96,80], b: f32[80,72]) -> bf16[2,64,4,32] {
  %q = bf16[2,64,4,32]{3,2,1,0} parameter(0)
  %k = bf16[2,48,4,32]{3,2,1,0} parameter(1)
  %v = bf16[2,48,4,32]{3,2,1,0} parameter(2)
  %o = bf16[2,4,64,32]{3,1,2,0} parameter(3)
  %st = f32[2,4,64]{2,1,0} parameter(4)
  %do = bf16[2,4,64,32]{3,1,2,0} parameter(5)
  %w = bf16[4,256,512]{2,1,0} parameter(6)
  %x = bf16[128,256]{1,0} parameter(7)
  %i = s32[] parameter(8)
  %a = f32[96,80]{1,0} parameter(9)
  %b = f32[80,72]{1,0} parameter(10)
  %fwd.1 = (bf16[2,4,64,32]{3,1,2,0}, f32[2,4,64]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", operand_layout_constraints={bf16[2,64,4,32]{3,2,1,0}, bf16[2,48,4,32]{3,2,1,0}, bf16[2,48,4,32]{3,2,1,0}}, backend_config={"operation_queue_id": "0", "cudnn_fmha_backend_config": {"fmha_scale": 0.125, "mask_type": "CAUSAL", "is_flash_attention": true}}
  %bwd.1 = (bf16[2,64,4,32]{3,2,1,0}, bf16[2,48,4,32]{3,2,1,0}, bf16[2,48,4,32]{3,2,1,0}, /*index=3*/u8[1024]{0}) custom-call(%q, %k, %v, %st, %do, /*index=5*/%o, %st), custom_call_target="__cudnn$fmhaSoftmaxBackward", operand_layout_constraints={bf16[2,64,4,32]{3,2,1,0}, bf16[2,48,4,32]{3,2,1,0}, bf16[2,48,4,32]{3,2,1,0}, f32[2,4,64]{2,1,0}, bf16[2,4,64,32]{3,2,1,0}, bf16[2,4,64,32]{3,2,1,0}, f32[2,4,64]{2,1,0}}, backend_config={"cudnn_fmha_backend_config": {"mask_type": "NO_MASK"}}
  %address_computation = bf16[128,512]{1,0} fusion(%w, %x, %i), kind=kCustom, calls=%address_computation.1, backend_config={"fusion_backend_config":{"kind":"__custom_fusion","custom_fusion_config":{"name":"dynamic_address_computation"}}}
  %gemm.2 = (f32[96,72]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %get-tuple-element.2 = bf16[2,64,4,32]{3,2,1,0} get-tuple-element(%bwd.1), index=0
}
"""  # noqa: E501


def test_attention_dynamic_slice_fusion_and_float32_matmuls():
  ks, _ = roofline.kernels(_KERNELS, _DEVICE)
  k = _by_name(ks)
  q, kv, o, st = 2 * 64 * 4 * 32 * 2, 2 * 48 * 4 * 32 * 2, 2 * 4 * 64 * 32 * 2, 2 * 4 * 64 * 4
  fwd, bwd = k["fwd.1"], k["bwd.1"]
  # 4 b h s_q s_kv d, halved by the causal mask; the backward 2.5 times that, unmasked.
  assert fwd.kind == "attention" and fwd.flops == 4 * 2 * 4 * 64 * 48 * 32 / 2
  assert bwd.kind == "attention" and bwd.flops == 2.5 * 4 * 2 * 4 * 64 * 48 * 32
  assert fwd.bytes == q + 2 * kv + o + st  # Reads q, k, v; writes the output and statistics.
  # All seven operands (the one after /*index=5*/ too) and the three gradients, no workspace.
  assert bwd.bytes == (q + 2 * kv + st + 2 * o + st) + (q + 2 * kv)
  # The dynamic-slice fusion is a matmul reading the one layer it slices.
  dsf = k["address_computation"]
  assert dsf.kind == "matmul" and dsf.flops == 2 * 128 * 512 * 256
  assert dsf.bytes == 2 * (256 * 512 + 128 * 256) + 4 + 2 * 128 * 512
  # Every kernel here does matmul work: with slow matmuls, all of it is compute-bound.
  slow = roofline.Device("slow matmuls", 1e9, 1e12, 0.0)
  ks, _ = roofline.kernels(_KERNELS, slow)
  result = roofline.estimate(_KERNELS, slow)
  assert result["bound"]["compute"] == pytest.approx(sum(x.compute_s * x.count for x in ks))
  assert result["bound"]["memory"] == 0.0


_F32 = """
ENTRY %main.4 (a: f32[48,48], b: f32[48,48]) -> f32[48,48] {
  %a = f32[48,48]{1,0} parameter(0)
  %b = f32[48,48]{1,0} parameter(1)
  %gemm.3 = (f32[48,48]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %get-tuple-element.3 = f32[48,48]{1,0} get-tuple-element(%gemm.3), index=0
}
"""  # noqa: E501


def test_a_float32_matmul_runs_at_half_rate_and_is_counted_by_its_own_limit():
  """48^3 float32: 221,184 flops against 27,648 bytes. At the bf16 rate (10 TFLOP/s) it
  would be memory-bound (22 ns against 28 ns); at half the rate (TF32) it is compute-bound
  (44 ns), and `estimate` files it so."""
  (k,), _ = roofline.kernels(_F32, _DEVICE)
  assert k.flops == 2 * 48**3 and k.bytes == 3 * 48 * 48 * 4
  assert k.compute_s == pytest.approx(2 * 48**3 / 5e12)
  assert k.seconds == pytest.approx(2 * 48**3 / 5e12 + _DEVICE.launch_s)
  bound = roofline.estimate(_F32, _DEVICE)["bound"]
  assert bound["compute"] == pytest.approx(2 * 48**3 / 5e12) and bound["memory"] == 0.0


def test_device_kinds_without_a_model_get_none():
  assert roofline.device_for("NVIDIA H100 PCIe") is None
  assert roofline.device_for("NVIDIA H100 NVL") is None
  assert roofline.device_for("NVIDIA GH200 480GB") is None


def test_a_failing_estimate_keeps_the_benchmark_and_warns(capsys):
  from ilora_jax import bench

  class Broken:
    def as_text(self):
      raise RuntimeError("no text")

  assert bench.roofline_s(Broken(), kind="NVIDIA H100 80GB HBM3") is None
  assert "no roofline estimate (RuntimeError: no text)" in capsys.readouterr().err


def _has_cuda_plugin() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


# Compiles a scan of 3 matmuls for a compile-only H100 (bench/gpu_plan.py's target) and
# prints the roofline's matmul kernels.
_GPU_SCRIPT = r"""
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import gpu_plan
from ilora_jax import roofline
mesh = gpu_plan.gpu_mesh()
s = NamedSharding(mesh, PartitionSpec())
x = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16, sharding=s)
w = jax.ShapeDtypeStruct((3, 1024, 1024), jnp.bfloat16, sharding=s)
def f(x, w):
  return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]
text = jax.jit(f).lower(x, w).compile().as_text()
ks, _ = roofline.kernels(text)
print(json.dumps([[k.kind, k.flops, k.count] for k in ks if k.kind == "matmul"]))
"""


@pytest.mark.skipif(
  not _has_cuda_plugin(),
  reason="needs JAX's CUDA plugin (pip install jax[cuda12]) to compile for a GPU; no GPU needed",
)
def test_a_real_gpu_compile_of_a_scan_of_matmuls_counts_each_layer():
  proc = subprocess.run(
    [sys.executable, "-c", _GPU_SCRIPT, ROOT], capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr
  matmuls = json.loads(proc.stdout.strip().splitlines()[-1])
  assert sum(count for _, _, count in matmuls) == 3
  assert sum(flops * count for _, flops, count in matmuls) == 3 * 2 * 512 * 1024 * 1024


_GEMM_FUSION = """
%fused_gemm (param_0.1: bf16[64,128], param_1.1: bf16[128,32]) -> bf16[64,32] {
  %param_0.1 = bf16[64,128]{1,0} parameter(0)
  %param_1.1 = bf16[128,32]{1,0} parameter(1)
  %convert.1 = bf16[128,32]{1,0} negate(%param_1.1)
  ROOT %dot.1 = bf16[64,32]{1,0} dot(%param_0.1, %convert.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.2 (x: bf16[64,128], w: bf16[128,32]) -> bf16[64,32] {
  %x = bf16[64,128]{1,0} parameter(0)
  %w = bf16[128,32]{1,0} parameter(1)
  ROOT %gemm_fusion.1 = bf16[64,32]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_gemm
}
"""  # noqa: E501


def test_a_gemm_fusion_counts_its_dot():
  """Triton's GEMM fusions (XLA's default on a card, where it can autotune them) are matmuls
  too: 2 M N K, and the operands' and output's bytes."""
  (k,), _ = roofline.kernels(_GEMM_FUSION, _DEVICE)
  assert k.kind == "matmul" and k.flops == 2 * 64 * 32 * 128
  assert k.bytes == 2 * (64 * 128 + 128 * 32 + 64 * 32)


def test_device_models_by_device_kind_and_the_benchmarks_key():
  """JAX's device kinds pick the model; a CPU has none, so the benchmark's roofline keys are
  None there, and a program compiled here still reads as a GPU program would."""
  import jax
  import jax.numpy as jnp

  from ilora_jax import bench

  assert roofline.device_for("NVIDIA H100 80GB HBM3") is roofline.H100
  assert roofline.device_for("NVIDIA H200") is roofline.H200
  assert roofline.device_for("cpu") is None
  x = jnp.ones((64, 64), jnp.float32)
  compiled = jax.jit(lambda a: jnp.tanh(a) * 2.0).lower(x).compile()
  assert bench.roofline_s(compiled) is None  # This machine: a CPU.
  seconds = bench.roofline_s(compiled, kind="NVIDIA H100 80GB HBM3")
  # One element-wise kernel at least: a launch, and the 16 KiB read and written.
  assert seconds >= roofline.H100.launch_s + 2 * 64 * 64 * 4 / roofline.H100.bytes_per_s


# A loop of 3 inside a loop of 4, each condition a compare fusion: the inner body's fusion runs
# 4 x 3 times, a condition once more than its body (the last test exits), so the outer one 5
# times and the inner one 4 x (3 + 1).
_NESTED = """
%fused_neg (p.0: f32[16]) -> f32[16] {
  %p.0 = f32[16]{0} parameter(0)
  ROOT %negate.0 = f32[16]{0} negate(%p.0)
}

%fused_lt (p.1: s32[]) -> pred[] {
  %p.1 = s32[] parameter(0)
  %c.1 = s32[] constant(3)
  ROOT %compare.1 = pred[] compare(%p.1, %c.1), direction=LT
}

%inner_body (a.0: (s32[], f32[16])) -> (s32[], f32[16]) {
  %a.0 = (s32[], f32[16]{0}) parameter(0)
  %i.0 = s32[] get-tuple-element(%a.0), index=0
  %x.0 = f32[16]{0} get-tuple-element(%a.0), index=1
  %inner_fusion = f32[16]{0} fusion(%x.0), kind=kLoop, calls=%fused_neg
  ROOT %t.0 = (s32[], f32[16]{0}) tuple(%i.0, %inner_fusion)
}

%inner_cond (a.1: (s32[], f32[16])) -> pred[] {
  %a.1 = (s32[], f32[16]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%a.1), index=0
  ROOT %inner_cond_fusion = pred[] fusion(%i.1), kind=kLoop, calls=%fused_lt
}

%outer_body (a.2: (s32[], f32[16])) -> (s32[], f32[16]) {
  %a.2 = (s32[], f32[16]{0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%a.2), index=0
  %x.2 = f32[16]{0} get-tuple-element(%a.2), index=1
  %outer_fusion = f32[16]{0} fusion(%x.2), kind=kLoop, calls=%fused_neg
  %t.2 = (s32[], f32[16]{0}) tuple(%i.2, %outer_fusion)
  ROOT %while.inner = (s32[], f32[16]{0}) while(%t.2), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
}

%outer_cond (a.3: (s32[], f32[16])) -> pred[] {
  %a.3 = (s32[], f32[16]{0}) parameter(0)
  %i.3 = s32[] get-tuple-element(%a.3), index=0
  ROOT %outer_cond_fusion = pred[] fusion(%i.3), kind=kLoop, calls=%fused_lt
}

ENTRY %main.7 (x: f32[16]) -> (s32[], f32[16]) {
  %x = f32[16]{0} parameter(0)
  %c.7 = s32[] constant(0)
  %t.7 = (s32[], f32[16]{0}) tuple(%c.7, %x)
  ROOT %while.outer = (s32[], f32[16]{0}) while(%t.7), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"4"}}
}
"""  # noqa: E501


def test_nested_loops_multiply_trip_counts_and_conditions_run_once_more():
  ks, unknown = roofline.kernels(_NESTED, _DEVICE)
  assert unknown == 0
  counts = {k.name: k.count for k in ks}
  assert counts == {
    "outer_fusion": 4,
    "outer_cond_fusion": 4 + 1,
    "inner_fusion": 4 * 3,
    "inner_cond_fusion": 4 * (3 + 1),
  }
  # Each kernel: 16 float32 read and written, or a 4-byte index read and a predicate written.
  k = _by_name(ks)
  assert k["inner_fusion"].bytes == 2 * 16 * 4 and k["inner_cond_fusion"].bytes == 4 + 1
  assert roofline.estimate(_NESTED, _DEVICE)["kernels"] == 4 + 5 + 12 + 16


def test_a_conditional_counts_its_costliest_branch_whatever_the_order():
  """The costlier branch (%big.1: a copy and two fusions) counts whether it is the true or
  the false computation, or the first or last of `branch_computations`."""
  given = "true_computation=%small.1, false_computation=%big.1"
  assert given in _MODULE
  orders = [
    _MODULE,
    _MODULE.replace(given, "true_computation=%big.1, false_computation=%small.1"),
    _MODULE.replace(given, "branch_computations={%big.1, %small.1}"),
    _MODULE.replace(given, "branch_computations={%small.1, %big.1}"),
  ]
  seconds = []
  for module in orders:
    ks, _ = roofline.kernels(module, _DEVICE)
    names = set(_by_name(ks))
    assert {"copy.4", "loop_add_fusion.1", "loop_add_fusion.2"} <= names, module
    assert "loop_add_fusion" not in names
    seconds.append(roofline.estimate(module, _DEVICE)["seconds"])
  assert seconds == pytest.approx([seconds[0]] * len(orders))


# Unfused in-place update and slices, as XLA leaves them outside a fusion: a 64 x 1024 bf16
# buffer, 2 rows written into it, 4 rows sliced dynamically, 8 statically and 3 gathered.
_UNFUSED = """
ENTRY %main.5 (buf: bf16[64,1024], upd: bf16[2,1024], i: s32[], idx: s32[3,1]) -> (bf16[64,1024], bf16[4,1024], bf16[8,1024], bf16[3,1024]) {
  %buf = bf16[64,1024]{1,0} parameter(0)
  %upd = bf16[2,1024]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %idx = s32[3,1]{1,0} parameter(3)
  %c.5 = s32[] constant(0)
  %dynamic-update-slice.5 = bf16[64,1024]{1,0} dynamic-update-slice(%buf, %upd, %i, %c.5)
  %dynamic-slice.5 = bf16[4,1024]{1,0} dynamic-slice(%buf, %i, %c.5), dynamic_slice_sizes={4,1024}
  %slice.5 = bf16[8,1024]{1,0} slice(%buf), slice={[0:8], [0:1024]}
  %gather.5 = bf16[3,1024]{1,0} gather(%buf, %idx), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,1024}
  ROOT %tuple.5 = (bf16[64,1024]{1,0}, bf16[4,1024]{1,0}, bf16[8,1024]{1,0}, bf16[3,1024]{1,0}) tuple(%dynamic-update-slice.5, %dynamic-slice.5, %slice.5, %gather.5)
}
"""  # noqa: E501


def test_unfused_updates_and_slices_move_only_the_rows_they_touch():
  """An in-place update reads its update and writes it (the buffer is neither read nor
  rewritten); a slice or gather reads the rows it takes and writes them."""
  ks, _ = roofline.kernels(_UNFUSED, _DEVICE)
  k = _by_name(ks)
  assert set(k) == {"dynamic-update-slice.5", "dynamic-slice.5", "slice.5", "gather.5"}
  row = 1024 * 2  # One bf16 row of the buffer.
  assert k["dynamic-update-slice.5"].kind == "in_place"
  assert k["dynamic-update-slice.5"].bytes == 2 * (2 * row)
  for name, rows in (("dynamic-slice.5", 4), ("slice.5", 8), ("gather.5", 3)):
    assert k[name].kind == "slice_copy" and k[name].bytes == 2 * (rows * row), name
  for kernel in ks:
    assert kernel.flops == 0 and kernel.seconds == pytest.approx(
      kernel.bytes / _DEVICE.bytes_per_s + _DEVICE.launch_s
    )


_CUSTOM = """
ENTRY %main.6 (a: f32[256]) -> (s8[1024], (f32[8], s8[512])) {
  %a = f32[256]{0} parameter(0)
  %quantize.6 = s8[1024]{0} custom-call(%a), custom_call_target="my_quantize"
  %with_scratch.6 = (f32[8]{0}, s8[512]{0}) custom-call(%a), custom_call_target="my_reduce"
  ROOT %tuple.6 = (s8[1024]{0}, (f32[8]{0}, s8[512]{0})) tuple(%quantize.6, %with_scratch.6)
}
"""  # noqa: E501


def test_a_custom_calls_lone_byte_array_is_its_result_not_scratch():
  """Only a tuple's trailing 1-D s8 array is the library's workspace; a custom call whose one
  result is a 1-D s8 array writes it."""
  ks, _ = roofline.kernels(_CUSTOM, _DEVICE)
  k = _by_name(ks)
  assert k["quantize.6"].kind == "other" and k["quantize.6"].flops == 0
  assert k["quantize.6"].bytes == 256 * 4 + 1024  # Reads the operand, writes 1024 bytes.
  assert k["with_scratch.6"].bytes == 256 * 4 + 8 * 4  # The 512-byte workspace left out.


def test_card_models_carry_the_recorded_figures():
  """bench/README.md and the module's docstring: on the H100, 661 TFLOP/s (a bf16 8192^3
  matmul in JAX on the card), 90% of the 3.35 TB/s of HBM3 and 3 us per launch; the H200 is
  the H100's compute and launches with 4.8 TB/s of HBM3e (at the same 90%)."""
  h100, h200 = roofline.H100, roofline.H200
  assert h100.matmul_flops_per_s == pytest.approx(661e12, rel=1e-12)
  assert h100.bytes_per_s == pytest.approx(0.9 * 3.35e12, rel=1e-12)
  assert h100.launch_s == pytest.approx(3e-6, rel=1e-12)
  assert h200.matmul_flops_per_s == h100.matmul_flops_per_s
  assert h200.launch_s == h100.launch_s
  assert h200.bytes_per_s == pytest.approx(0.9 * 4.8e12, rel=1e-12)
  assert h200.bytes_per_s / h100.bytes_per_s == pytest.approx(4.8 / 3.35, rel=1e-12)


_DTYPES = ["pred", "s8", "u8", "f8e4m3fn", "f8e5m2", "bf16", "f16", "s16", "u16", "f32", "s32",
           "u32", "f64", "s64", "u64"]  # fmt: skip


def test_each_element_type_moves_its_width_in_bytes():
  """HLO's element types are as wide as the bits in their names (pred takes a byte): an
  element-wise op on 3 x 5 elements reads and writes 15 of them, a tuple sums its arrays."""
  lines = "".join(f"  %p.{t} = {t}[3,5]{{1,0}} parameter({i})\n"
                  f"  %negate.{t} = {t}[3,5]{{1,0}} negate(%p.{t})\n"
                  for i, t in enumerate(_DTYPES))  # fmt: skip
  module = f"ENTRY %main.10 () -> pred[] {{\n{lines}  ROOT %c.10 = pred[] constant(false)\n}}\n"
  k = _by_name(roofline.kernels(module, _DEVICE)[0])
  assert len(k) == len(_DTYPES)
  for t in _DTYPES:
    bits = 8 if t == "pred" else int(re.match(r"[a-z]+(\d+)", t).group(1))
    assert k[f"negate.{t}"].kind == "other" and k[f"negate.{t}"].bytes == 2 * 15 * bits // 8, t
    assert roofline.shape_bytes(f"({t}[3,5]{{1,0}}, {t}[2]{{0}}, s32[])") == 17 * bits // 8 + 4


# Bookkeeping, views and the ends of asynchronous pairs, which launch nothing, between the
# starts (a copy, collectives, a send and a receive), which do; a call and an async-start run
# their computations.
_FREE = """
%callee (p.13: f32[16]) -> f32[16] {
  %p.13 = f32[16]{0} parameter(0)
  ROOT %negate.13 = f32[16]{0} negate(%p.13)
}

%async_comp (p.12: f32[16]) -> f32[16] {
  %p.12 = f32[16]{0} parameter(0)
  ROOT %negate.12 = f32[16]{0} negate(%p.12)
}

ENTRY %main.11 (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  %constant.11 = f32[] constant(1)
  %bitcast.11 = f32[4,4]{1,0} bitcast(%a)
  %opt-barrier.11 = f32[4,4]{1,0} opt-barrier(%bitcast.11)
  %after-all.11 = token[] after-all()
  %add-dependency.11 = f32[16]{0} add-dependency(%a, %after-all.11)
  %partition-id.11 = u32[] partition-id()
  %replica-id.11 = u32[] replica-id()
  %tuple.11 = (f32[16]{0}, u32[]) tuple(%a, %partition-id.11)
  %get-tuple-element.11 = f32[16]{0} get-tuple-element(%tuple.11), index=0
  %copy-start.11 = (f32[16]{0}, f32[16]{0}, u32[]) copy-start(%a)
  %copy-done.11 = f32[16]{0} copy-done(%copy-start.11)
  %all-reduce-start.11 = f32[16]{0} all-reduce-start(%a), replica_groups={}, to_apply=%sum
  %all-reduce-done.11 = f32[16]{0} all-reduce-done(%all-reduce-start.11)
  %all-gather-start.11 = (f32[16]{0}, f32[32]{0}) all-gather-start(%a), dimensions={0}
  %all-gather-done.11 = f32[32]{0} all-gather-done(%all-gather-start.11)
  %collective-permute-start.11 = (f32[16]{0}, f32[16]{0}) collective-permute-start(%a), source_target_pairs={{0,1}}
  %collective-permute-done.11 = f32[16]{0} collective-permute-done(%collective-permute-start.11)
  %send.11 = (f32[16]{0}, u32[], token[]) send(%a, %after-all.11), channel_id=1
  %send-done.11 = token[] send-done(%send.11), channel_id=1
  %recv.11 = (f32[16]{0}, u32[], token[]) recv(%after-all.11), channel_id=2
  %recv-done.11 = (f32[16]{0}, token[]) recv-done(%recv.11), channel_id=2
  %async-start.11 = ((f32[16]{0}), f32[16]{0}, u32[]) async-start(%a), calls=%async_comp
  %async-update.11 = ((f32[16]{0}), f32[16]{0}, u32[]) async-update(%async-start.11)
  %async-done.11 = f32[16]{0} async-done(%async-update.11)
  %call.11 = f32[16]{0} call(%copy-done.11), to_apply=%callee
  ROOT %negate.11 = f32[16]{0} negate(%add-dependency.11)
}
"""  # noqa: E501


def test_bookkeeping_views_and_async_ends_launch_nothing():
  ks, _ = roofline.kernels(_FREE, _DEVICE)
  k = _by_name(ks)
  assert set(k) == {
    "copy-start.11", "all-reduce-start.11", "all-gather-start.11",
    "collective-permute-start.11", "send.11", "recv.11", "negate.11", "negate.12", "negate.13",
  }  # fmt: skip
  assert k["copy-start.11"].kind == "copy" and k["negate.12"].count == k["negate.13"].count == 1


# Copies outside and inside fusions, named as XLA names them: a pad, a concatenate, a
# concatenating fusion and a fusion named after an in-place update (with dashes).
_COPIES = """
%fused_cat (p.0: f32[4], p.1: f32[4]) -> f32[8] {
  %p.0 = f32[4]{0} parameter(0)
  %p.1 = f32[4]{0} parameter(1)
  ROOT %concatenate.0 = f32[8]{0} concatenate(%p.0, %p.1), dimensions={0}
}

%fused_upd (p.2: f32[8], p.3: f32[4], p.4: s32[]) -> f32[8] {
  %p.2 = f32[8]{0} parameter(0)
  %p.3 = f32[4]{0} parameter(1)
  %p.4 = s32[] parameter(2)
  ROOT %dynamic-update-slice.0 = f32[8]{0} dynamic-update-slice(%p.2, %p.3, %p.4)
}

ENTRY %main.14 (a: f32[4], b: f32[4], i: s32[]) -> (f32[6], f32[8], f32[8], f32[8]) {
  %a = f32[4]{0} parameter(0)
  %b = f32[4]{0} parameter(1)
  %i = s32[] parameter(2)
  %c.14 = f32[] constant(0)
  %pad.14 = f32[6]{0} pad(%a, %c.14), padding=1_1
  %concatenate.14 = f32[8]{0} concatenate(%a, %b), dimensions={0}
  %input_concatenate_fusion = f32[8]{0} fusion(%a, %b), kind=kInput, calls=%fused_cat
  %wrapped_dynamic-update-slice = f32[8]{0} fusion(%concatenate.14, %a, %i), kind=kLoop, calls=%fused_upd
  ROOT %tuple.14 = (f32[6]{0}, f32[8]{0}, f32[8]{0}, f32[8]{0}) tuple(%pad.14, %concatenate.14, %input_concatenate_fusion, %wrapped_dynamic-update-slice)
}
"""  # noqa: E501


def test_pads_concatenates_and_in_place_fusions_are_filed_by_kind():
  k = _by_name(roofline.kernels(_COPIES, _DEVICE)[0])
  assert {n: x.kind for n, x in k.items()} == {
    "pad.14": "copy", "concatenate.14": "copy", "input_concatenate_fusion": "copy",
    "wrapped_dynamic-update-slice": "in_place",
  }  # fmt: skip
  assert k["pad.14"].bytes == 6 * 4 + 4 * 4 + 4  # Writes 6, reads 4 and the padding value.
  assert k["concatenate.14"].bytes == k["input_concatenate_fusion"].bytes == 2 * 8 * 4
  # Reads the update and the index, writes the update: the buffer is neither read nor written.
  assert k["wrapped_dynamic-update-slice"].bytes == 4 * 4 + 4 + 4 * 4


# Fusions whose reads and writes take their operands' users into account: a parameter sliced
# and also read whole; updated in place and also read whole; sliced through a bitcast; an
# update and a conversion as two outputs; an update written through a bitcast; a ROOT printed
# before the body's last line; a fusion whose computation is not in the text.
_FUSIONS = """
%fused_slice_and_read (p.0: f32[64], p.1: s32[]) -> (f32[8], f32[64]) {
  %p.0 = f32[64]{0} parameter(0)
  %p.1 = s32[] parameter(1)
  %dynamic-slice.0 = f32[8]{0} dynamic-slice(%p.0, %p.1), dynamic_slice_sizes={8}
  %negate.0 = f32[64]{0} negate(%p.0)
  ROOT %tuple.0 = (f32[8]{0}, f32[64]{0}) tuple(%dynamic-slice.0, %negate.0)
}

%fused_update_and_read (p.2: f32[32], p.3: f32[4], p.4: s32[]) -> (f32[32], f32[32]) {
  %p.2 = f32[32]{0} parameter(0)
  %p.3 = f32[4]{0} parameter(1)
  %p.4 = s32[] parameter(2)
  %dynamic-update-slice.2 = f32[32]{0} dynamic-update-slice(%p.2, %p.3, %p.4)
  %negate.2 = f32[32]{0} negate(%p.2)
  ROOT %tuple.2 = (f32[32]{0}, f32[32]{0}) tuple(%dynamic-update-slice.2, %negate.2)
}

%fused_bitcast_slice (p.5: f32[4,64], p.6: s32[]) -> f32[64] {
  %p.5 = f32[4,64]{1,0} parameter(0)
  %p.6 = s32[] parameter(1)
  %bitcast.5 = f32[256]{0} bitcast(%p.5)
  %dynamic-slice.5 = f32[64]{0} dynamic-slice(%bitcast.5, %p.6), dynamic_slice_sizes={64}
  ROOT %negate.5 = f32[64]{0} negate(%dynamic-slice.5)
}

%fused_update_and_convert (p.7: bf16[16,128], p.8: bf16[2,128], p.9: s32[]) -> (bf16[16,128], f32[2,128]) {
  %p.7 = bf16[16,128]{1,0} parameter(0)
  %p.8 = bf16[2,128]{1,0} parameter(1)
  %p.9 = s32[] parameter(2)
  %c.7 = s32[] constant(0)
  %dynamic-update-slice.7 = bf16[16,128]{1,0} dynamic-update-slice(%p.7, %p.8, %p.9, %c.7)
  %convert.7 = f32[2,128]{1,0} convert(%p.8)
  ROOT %tuple.7 = (bf16[16,128]{1,0}, f32[2,128]{1,0}) tuple(%dynamic-update-slice.7, %convert.7)
}

%fused_update_bitcast (p.10: bf16[8,64], p.11: bf16[64], p.12: s32[]) -> bf16[512] {
  %p.10 = bf16[8,64]{1,0} parameter(0)
  %p.11 = bf16[64]{0} parameter(1)
  %p.12 = s32[] parameter(2)
  %c.10 = s32[] constant(0)
  %bitcast.10 = bf16[1,64]{1,0} bitcast(%p.11)
  %dynamic-update-slice.10 = bf16[8,64]{1,0} dynamic-update-slice(%p.10, %bitcast.10, %p.12, %c.10)
  ROOT %bitcast.11 = bf16[512]{0} bitcast(%dynamic-update-slice.10)
}

%fused_root_first (p.13: f32[16]) -> f32[16] {
  %p.13 = f32[16]{0} parameter(0)
  ROOT %negate.13 = f32[16]{0} negate(%p.13)
  %constant.13 = f32[] constant(1)
}

ENTRY %main.15 (a: f32[64], i: s32[], b: f32[32], c: f32[4], d: f32[4,64], e: bf16[16,128], f: bf16[2,128], g: bf16[8,64], h: bf16[64], j: f32[16]) -> f32[16] {
  %a = f32[64]{0} parameter(0)
  %i = s32[] parameter(1)
  %b = f32[32]{0} parameter(2)
  %c = f32[4]{0} parameter(3)
  %d = f32[4,64]{1,0} parameter(4)
  %e = bf16[16,128]{1,0} parameter(5)
  %f = bf16[2,128]{1,0} parameter(6)
  %g = bf16[8,64]{1,0} parameter(7)
  %h = bf16[64]{0} parameter(8)
  %j = f32[16]{0} parameter(9)
  %slice_and_read = (f32[8]{0}, f32[64]{0}) fusion(%a, %i), kind=kLoop, calls=%fused_slice_and_read
  %update_and_read = (f32[32]{0}, f32[32]{0}) fusion(%b, %c, %i), kind=kLoop, calls=%fused_update_and_read
  %bitcast_slice = f32[64]{0} fusion(%d, %i), kind=kLoop, calls=%fused_bitcast_slice
  %update_and_convert = (bf16[16,128]{1,0}, f32[2,128]{1,0}) fusion(%e, %f, %i), kind=kLoop, calls=%fused_update_and_convert
  %update_bitcast = bf16[512]{0} fusion(%g, %h, %i), kind=kLoop, calls=%fused_update_bitcast
  %root_first = f32[16]{0} fusion(%j), kind=kLoop, calls=%fused_root_first
  ROOT %not_in_text = f32[16]{0} fusion(%j, %j), kind=kLoop, calls=%fused_elsewhere
}
"""  # noqa: E501


def test_a_fusion_reads_and_writes_by_its_operands_users_and_its_outputs():
  k = _by_name(roofline.kernels(_FUSIONS, _DEVICE)[0])
  # Sliced and read whole: read whole (and the index); writes the slice and the negation.
  assert k["slice_and_read"].bytes == 64 * 4 + 4 + 8 * 4 + 64 * 4
  # Updated in place and read whole: read whole, the update and the index; writes the update
  # (in place) and the negation.
  assert k["update_and_read"].bytes == 32 * 4 + 4 * 4 + 4 + 4 * 4 + 32 * 4
  # Sliced through a bitcast: only the slice is read.
  assert k["bitcast_slice"].bytes == 64 * 4 + 4 + 64 * 4
  # Two outputs: the update written in place (2 rows), the conversion in full; the update is
  # read once (for both), the buffer not at all.
  assert k["update_and_convert"].bytes == 2 * 128 * 2 + 4 + 2 * 128 * 2 + 2 * 128 * 4
  # An update returned through a bitcast still writes only the update (a row of 64).
  assert k["update_bitcast"].bytes == 64 * 2 + 4 + 64 * 2
  # The ROOT is the output, wherever it is printed.
  assert k["root_first"].bytes == 16 * 4 + 16 * 4
  # No body to look into: every operand read whole and the result written.
  assert k["not_in_text"].bytes == 2 * 16 * 4 + 16 * 4 and k["not_in_text"].kind == "fusion"


# Matmuls in other forms: a GEMM fusion of a float32 dot contracting two axes and a bf16 dot
# contracting the first; cuBLAS calls contracting two axes, with no dimension numbers (the
# lhs's last axis) and with a backend config followed by other attributes; a cuDNN
# convolution; a custom call whose trailing byte array is 2-D (a result, not a workspace).
_MATMULS = """
%fused_two_dots (p.0: f32[8,4,16], p.1: f32[4,16,32], p.2: bf16[8,12], p.3: bf16[8,10]) -> (f32[8,32], bf16[12,10]) {
  %p.0 = f32[8,4,16]{2,1,0} parameter(0)
  %p.1 = f32[4,16,32]{2,1,0} parameter(1)
  %p.2 = bf16[8,12]{1,0} parameter(2)
  %p.3 = bf16[8,10]{1,0} parameter(3)
  %dot.0 = f32[8,32]{1,0} dot(%p.0, %p.1), lhs_contracting_dims={1,2}, rhs_contracting_dims={0,1}
  %dot.1 = bf16[12,10]{1,0} dot(%p.2, %p.3), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %tuple.0 = (f32[8,32]{1,0}, bf16[12,10]{1,0}) tuple(%dot.0, %dot.1)
}

ENTRY %main.16 (a: f32[8,4,16], b: f32[4,16,32], c: bf16[8,12], d: bf16[8,10], e: bf16[8,4,16], f: bf16[4,16,32], g: bf16[8,24], h: bf16[24,16], k: bf16[24,8], img: bf16[1,8,8,4], ker: bf16[3,3,4,4]) -> bf16[8,16] {
  %a = f32[8,4,16]{2,1,0} parameter(0)
  %b = f32[4,16,32]{2,1,0} parameter(1)
  %c = bf16[8,12]{1,0} parameter(2)
  %d = bf16[8,10]{1,0} parameter(3)
  %e = bf16[8,4,16]{2,1,0} parameter(4)
  %f = bf16[4,16,32]{2,1,0} parameter(5)
  %g = bf16[8,24]{1,0} parameter(6)
  %h = bf16[24,16]{1,0} parameter(7)
  %k = bf16[24,8]{1,0} parameter(8)
  %img = bf16[1,8,8,4]{3,2,1,0} parameter(9)
  %ker = bf16[3,3,4,4]{3,2,1,0} parameter(10)
  %gemm_fusion.16 = (f32[8,32]{1,0}, bf16[12,10]{1,0}) fusion(%a, %b, %c, %d), kind=kCustom, calls=%fused_two_dots
  %gemm.two_axes = (bf16[8,32]{1,0}, s8[256]{0}) custom-call(%e, %f), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1","2"],"rhs_contracting_dimensions":["0","1"]}}}
  %gemm.no_dims = (bf16[8,16]{1,0}, s8[256]{0}) custom-call(%g, %h), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1}}
  %gemm.then_metadata = (bf16[8,16]{1,0}, s8[256]{0}) custom-call(%k, %h), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["0"],"rhs_contracting_dimensions":["0"]}}}, metadata={op_name="jit(f)/k,kn->n" source_file="f.py"}
  %conv.16 = (bf16[1,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%img, %ker), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  %pack.16 = (f32[8]{0}, s8[4,4]{1,0}) custom-call(%g), custom_call_target="my_pack"
  ROOT %get-tuple-element.16 = bf16[8,16]{1,0} get-tuple-element(%gemm.no_dims), index=0
}
"""  # noqa: E501


def test_matmuls_count_every_contracted_axis_and_their_operand_type():
  k = _by_name(roofline.kernels(_MATMULS, _DEVICE)[0])
  rate = _DEVICE.matmul_flops_per_s
  # Both dots of the fusion: 2 M N K each, K = 4 x 16 for the first; the float32 one at half
  # the rate.
  fused = k["gemm_fusion.16"]
  assert fused.kind == "matmul" and fused.flops == 2 * 8 * 32 * (4 * 16) + 2 * 12 * 10 * 8
  assert fused.compute_s == pytest.approx(2 * 8 * 32 * 64 / (rate / 2) + 2 * 12 * 10 * 8 / rate)
  assert k["gemm.two_axes"].flops == 2 * 8 * 32 * (4 * 16)
  assert k["gemm.no_dims"].kind == "matmul" and k["gemm.no_dims"].flops == 2 * 8 * 16 * 24
  assert k["gemm.then_metadata"].flops == 2 * 8 * 16 * 24
  assert k["gemm.then_metadata"].op_name == "jit(f)/k,kn->n"
  conv = k["conv.16"]  # Bytes only: reads the image and kernel, writes the image.
  assert conv.kind == "convolution" and conv.flops == 0
  assert conv.bytes == 2 * (8 * 8 * 4 + 3 * 3 * 4 * 4 + 8 * 8 * 4)
  assert k["pack.16"].bytes == 8 * 24 * 2 + 8 * 4 + 4 * 4  # Reads g; writes both results.


# A loop of unknown length (its body once per iteration given); a loop of 12 whose body holds
# a conditional: the costly branch (two fusions and a loop of unknown length) counts with its
# unknown loop, the cheap one (a loop of unknown length alone) does not.
_LOOPS = """
%fused_neg (p.0: f32[16]) -> f32[16] {
  %p.0 = f32[16]{0} parameter(0)
  ROOT %negate.0 = f32[16]{0} negate(%p.0)
}

%cond (c.0: f32[16]) -> pred[] {
  %c.0 = f32[16]{0} parameter(0)
  ROOT %constant.0 = pred[] constant(false)
}

%body_a (a.0: f32[16]) -> f32[16] {
  %a.0 = f32[16]{0} parameter(0)
  ROOT %fusion_a = f32[16]{0} fusion(%a.0), kind=kLoop, calls=%fused_neg
}

%body_b (a.1: f32[16]) -> f32[16] {
  %a.1 = f32[16]{0} parameter(0)
  ROOT %fusion_b = f32[16]{0} fusion(%a.1), kind=kLoop, calls=%fused_neg
}

%body_d (a.2: f32[16]) -> f32[16] {
  %a.2 = f32[16]{0} parameter(0)
  ROOT %fusion_d = f32[16]{0} fusion(%a.2), kind=kLoop, calls=%fused_neg
}

%costly (a.3: f32[16]) -> f32[16] {
  %a.3 = f32[16]{0} parameter(0)
  %fusion_k1 = f32[16]{0} fusion(%a.3), kind=kLoop, calls=%fused_neg
  %fusion_k2 = f32[16]{0} fusion(%fusion_k1), kind=kLoop, calls=%fused_neg
  ROOT %while.b = f32[16]{0} while(%fusion_k2), condition=%cond, body=%body_b
}

%cheap (a.4: f32[16]) -> f32[16] {
  %a.4 = f32[16]{0} parameter(0)
  ROOT %while.d = f32[16]{0} while(%a.4), condition=%cond, body=%body_d
}

%body_c (a.5: (pred[], f32[16])) -> (pred[], f32[16]) {
  %a.5 = (pred[], f32[16]{0}) parameter(0)
  %p.5 = pred[] get-tuple-element(%a.5), index=0
  %x.5 = f32[16]{0} get-tuple-element(%a.5), index=1
  %conditional.5 = f32[16]{0} conditional(%p.5, %x.5, %x.5), true_computation=%cheap, false_computation=%costly
  ROOT %tuple.5 = (pred[], f32[16]{0}) tuple(%p.5, %conditional.5)
}

%cond_c (a.6: (pred[], f32[16])) -> pred[] {
  %a.6 = (pred[], f32[16]{0}) parameter(0)
  ROOT %constant.6 = pred[] constant(false)
}

ENTRY %main.17 (x: f32[16], p: pred[]) -> (pred[], f32[16]) {
  %x = f32[16]{0} parameter(0)
  %p = pred[] parameter(1)
  %while.a = f32[16]{0} while(%x), condition=%cond, body=%body_a
  %tuple.17 = (pred[], f32[16]{0}) tuple(%p, %while.a)
  ROOT %while.c = (pred[], f32[16]{0}) while(%tuple.17), condition=%cond_c, body=%body_c, backend_config={"known_trip_count":{"n":"12"}}
}
"""  # noqa: E501


def test_unknown_loops_are_counted_once_each_and_only_in_the_branch_that_counts():
  ks, unknown = roofline.kernels(_LOOPS, _DEVICE, unknown_trip_count=5)
  assert {k.name: k.count for k in ks} == {
    "fusion_a": 5, "fusion_k1": 12, "fusion_k2": 12, "fusion_b": 12 * 5,
  }  # fmt: skip
  assert unknown == 2  # %while.a and %costly's; not %cheap's, whose branch does not count.
  assert roofline.estimate(_LOOPS, _DEVICE, unknown_trip_count=5)["unknown_trip_counts"] == 2
  # Without a trip count given, an unknown loop runs once.
  counts = {k.name: k.count for k in roofline.kernels(_LOOPS, _DEVICE)[0]}
  assert counts["fusion_a"] == 1 and counts["fusion_b"] == 12


def test_operands_printed_with_their_shapes_are_read():
  """XLA can print each operand with its type (HloPrintOptions' print_operand_shape):
  `negate(f32[2,3]{1,0} %a)`; the commas in dimensions and layouts separate no operands."""
  module = """
ENTRY %main.18 (a: f32[2,3], b: f32[2,3]) -> f32[2,3] {
  %a = f32[2,3]{1,0} parameter(0)
  %b = f32[2,3]{1,0} parameter(1)
  ROOT %add.18 = f32[2,3]{1,0} add(f32[2,3]{1,0} %a, f32[2,3]{1,0} %b)
}
"""
  (k,), _ = roofline.kernels(module, _DEVICE)
  assert k.bytes == 3 * 6 * 4  # Reads both, writes one.
  comps, entry = roofline.parse(module)
  assert entry == "main.18" and comps[entry][-1].operands == ["a", "b"]


def test_labels_keep_the_path_inside_the_last_block_without_scaffolding():
  label = roofline._label
  # Inside the last of nested blocks, jit, autodiff and remat wrappers and loops left out.
  assert label(
    "jit(step)/transpose(jvp(step))/outer_block/while/body/inner_block/attn/q/dot"
  ) == "attn/q/dot"  # fmt: skip
  assert label("jit(train)/transpose(jvp(checkpoint))/rematted_computation/mlp/down/dot") == (
    "train/mlp/down/dot"
  )
  assert label("jit(main)/while/cond/closed_call/lt") == "lt"
  # The last four parts; nothing left is "?".
  assert label("jit(f)/a/b/c/d/e") == "b/c/d/e"
  assert label("jit(step)/while/body") == "?" and label("") == "?"


def test_estimate_groups_by_label_and_kind_with_launches_bytes_and_device():
  result = roofline.estimate(_MODULE, _DEVICE)
  assert result["device"] == "test"
  matmul = 2 * (128 * 256 + 256 * 512 + 128 * 512)
  sliced, update = 2 * 2 * 256 * 512 + 4, 2 * 2 * 128 * 512 + 4
  # The loop's three kernels four times; the transpose, the copy and two fusions once.
  once = 2 * 2 * 128 * 256 + 2 * 8 * 4 * 4 + 2 * 3 * 8 * 4 * 4
  assert result["bytes"] == 4 * (matmul + sliced + update) + once
  groups = {(t["label"], t["kind"]): t["launches"] for t in result["top"]}
  # Kernels without an op_name share the label "?", one group per kind.
  assert groups == {
    ("mlp/up/btd,df->btf/dot_general", "matmul"): 4,
    ("layers/dynamic_index_in_dim/dynamic_slice", "slice_copy"): 4,
    ("?", "in_place"): 4,
    ("?", "copy"): 2,
    ("?", "fusion"): 2,
  }
  # The kinds, costliest first (as gpu_plan.py prints them).
  seconds = list(result["by_kind"].values())
  assert seconds == sorted(seconds, reverse=True) and len(seconds) == 5
  # The default: the H100, the top 10 ops, an unknown loop run once.
  names = [f"op{i}" for i in range(12)]
  module = "ENTRY %main.19 (a: f32[4]) -> f32[4] {\n  %a = f32[4]{0} parameter(0)\n" + "".join(
    f'  %negate.{n} = f32[4]{{0}} negate(%a), metadata={{op_name="{n}"}}\n' for n in names
  ) + "  ROOT %c.19 = f32[4]{0} constant({0, 0, 0, 0})\n}\n"  # fmt: skip
  default = roofline.estimate(module)
  assert default["device"] == roofline.H100.name and len(default["top"]) == 10
  assert default["seconds"] == pytest.approx(12 * (32 / roofline.H100.bytes_per_s + 3e-6))
  assert roofline.kernels(module)[0][0].seconds == pytest.approx(32 / 0.9 / 3.35e12 + 3e-6)
  unknown = _MODULE.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
  assert roofline.estimate(unknown, _DEVICE)["kernels"] == 3 + 1 + 3
  assert roofline.estimate(unknown, _DEVICE)["unknown_trip_counts"] == 1


def test_trip_counts_and_device_kinds_as_xla_and_jax_write_them():
  (instr,) = [i for i in roofline.parse(_LOOPS)[0]["main.17"] if i.name == "while.c"]
  assert roofline.trip_count(instr) == 12
  # The SXM cards by either of their names, with whitespace around.
  assert roofline.device_for(" NVIDIA H100 SXM5 80GB\n") is roofline.H100
  assert roofline.device_for("NVIDIA H200 SXM 141GB") is roofline.H200


def test_an_escaped_quote_in_an_op_name_does_not_end_it():
  module = r"""
ENTRY %main.20 (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  ROOT %negate.20 = f32[4]{0} negate(%a), metadata={op_name="jit(f)/say \"hi\"/neg" source_file="f.py"}
}
"""  # noqa: E501
  (k,), _ = roofline.kernels(module, _DEVICE)
  assert k.op_name == r"jit(f)/say \"hi\"/neg"
  assert roofline.estimate(module, _DEVICE)["top"][0]["label"] == r"f/say \"hi\"/neg"
