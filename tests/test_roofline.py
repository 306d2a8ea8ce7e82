"""`ilora_jax.roofline`: kernels, flops and bytes read from a GPU compile, against formulas."""

import importlib.util
import json
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
