"""Every Triton kernel compiles offline for an sm_90 GPU (no GPU needed).

The interpreter accepts code the compiler rejects, so this is the check that the kernels are real.
Registers and spills of each configuration are printed (``pytest -s``) and written to
``.benchmarks/sm90_resources.txt``.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_trim.triton import ce_backward, ce_forward, select  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    # Under the interpreter @triton.jit gives InterpretedFunction; compile the real JITFunctions.
    import importlib
    import sys

    def _fresh(mod):
        env = os.environ.pop("TRITON_INTERPRET")
        try:
            name = mod.__name__
            saved = sys.modules.pop(name)
            fresh = importlib.import_module(name)
            sys.modules[name] = saved
            return fresh
        finally:
            os.environ["TRITON_INTERPRET"] = env

    ce_forward, select, ce_backward = _fresh(ce_forward), _fresh(select), _fresh(ce_backward)

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _forward_case(dtype, has_weight, has_smoothing, block_c, warps):
    sig = {
        "logits_ptr": f"*{dtype}", "stride_row": "i32", "target_ptr": "*i64", "weight_ptr": "*fp32",
        "loss_ptr": "*fp32", "lse_ptr": "*fp32", "wy_ptr": "*fp32", "num_classes": "i32",
        "ignore_index": "i32", "label_smoothing_bits": "i64", "HAS_WEIGHT": "constexpr",
        "HAS_SMOOTHING": "constexpr", "BLOCK_C": "constexpr",
    }  # fmt: skip
    const = {"HAS_WEIGHT": has_weight, "HAS_SMOOTHING": has_smoothing, "BLOCK_C": block_c}
    name = f"ce_forward[{dtype},w={has_weight},ls={has_smoothing},BLOCK_C={block_c},warps={warps}]"
    return name, ce_forward.ce_forward_kernel, sig, const, warps


def _select_case(loss_dtype, out_dtype, keep_all, hardest, reduction, from_ptr):
    sig = {
        "loss_ptr": f"*{loss_dtype}", "wy_ptr": f"*{loss_dtype}", "target_ptr": "*i64", "kept_ptr": "*i1",
        "out_ptr": f"*{out_dtype}", "result_ptr": f"*{out_dtype}", "k_ptr": "*i64",
        "threshold_ptr": f"*{out_dtype}", "denom_ptr": f"*{loss_dtype}", "num_rows": "i32",
        "ignore_index": "i32", "keep_ratio_bits": "i64", "ratio_ptr": "*fp32", "RATIO_FROM_PTR": "constexpr",
        "KEEP_ALL": "constexpr", "HARDEST": "constexpr", "REDUCTION": "constexpr", "BLOCK": "constexpr",
    }  # fmt: skip
    const = {"RATIO_FROM_PTR": from_ptr, "KEEP_ALL": keep_all, "HARDEST": hardest, "REDUCTION": reduction,
             "BLOCK": 2048}  # fmt: skip
    name = f"select[{loss_dtype}->{out_dtype},all={keep_all},hardest={hardest},red={reduction},ptr={from_ptr}]"
    return name, select.select_kernel, sig, const, 4


def _backward_case(dtype, per_row, has_weight, has_smoothing, block_c, warps):
    sig = {
        "logits_ptr": f"*{dtype}", "stride_row": "i32", "grad_ptr": f"*{dtype}", "stride_grad": "i32",
        "target_ptr": "*i64", "weight_ptr": "*fp32", "weight_sum_ptr": "*fp32", "lse_ptr": "*fp32",
        "kept_ptr": "*i1", "grad_out_ptr": f"*{dtype}", "denom_ptr": "*fp32", "num_classes": "i32",
        "label_smoothing_bits": "i64", "PER_ROW_GRAD": "constexpr", "HAS_WEIGHT": "constexpr",
        "HAS_SMOOTHING": "constexpr", "BLOCK_C": "constexpr",
    }  # fmt: skip
    const = {"PER_ROW_GRAD": per_row, "HAS_WEIGHT": has_weight, "HAS_SMOOTHING": has_smoothing,
             "BLOCK_C": block_c}  # fmt: skip
    name = f"ce_backward[{dtype},row_grad={per_row},w={has_weight},ls={has_smoothing},BLOCK_C={block_c}]"
    return name, ce_backward.ce_backward_kernel, sig, const, warps


CASES = [
    _forward_case("fp32", False, False, 4096, 8),
    _forward_case("bf16", False, False, 8192, 8),
    _forward_case("fp16", True, True, 8192, 8),
    _forward_case("fp32", True, True, 16, 1),
    _forward_case("fp64", True, True, 2048, 4),
    _select_case("fp32", "fp32", False, True, 0, False),
    _select_case("fp32", "bf16", False, False, 2, True),
    _select_case("fp32", "fp16", True, True, 1, False),
    _select_case("fp64", "fp64", False, True, 0, False),
    _backward_case("fp32", False, False, False, 4096, 8),
    _backward_case("bf16", True, False, False, 8192, 8),
    _backward_case("fp16", False, True, True, 8192, 8),
    _backward_case("fp32", False, True, True, 16, 1),
    _backward_case("fp64", True, True, True, 2048, 4),
]


def _resources(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    spill = int(re.search(r"LOCAL:(\d+)", text).group(1))
    return regs, spill


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_compiles_for_sm90(case):
    name, fn, sig, const, warps = case
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": warps})
    regs, spill = _resources(compiled.asm["cubin"])
    line = f"{name}: registers={regs} local(spill)={spill}B shared={compiled.metadata.shared}B"
    print(line)
    out = pathlib.Path(".benchmarks")
    out.mkdir(exist_ok=True)
    with open(out / "sm90_resources.txt", "a") as f:
        f.write(line + "\n")
    assert regs > 0
    assert spill == 0, f"{name} spills {spill} bytes of registers"
