"""Compile every Triton kernel configuration offline for an sm_90 GPU (no GPU needed).

Run as ``python tests/sm90_compile.py``: prints one JSON line per configuration with its registers,
spilled (local) bytes and shared memory, or the compiler's error. Kept out of the pytest process
because Triton's interpreter (``TRITON_INTERPRET=1``) patches ``triton.language`` in-process.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
# Run as a script, sys.path[0] is tests/: put this checkout first, or an installed (editable)
# fused_trim from another checkout would be compiled instead.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_trim.triton import (  # noqa: E402
    ce_backward,
    ce_backward_spatial,
    ce_forward,
    ce_forward_spatial,
    grid_select,
    select,
)

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


# The soft cap and z-loss arguments of the four cross-entropy kernels, and their constexpr flags.
HEAD_SIG = {"softcap_bits": "i64", "z_loss_bits": "i64", "HAS_CAP": "constexpr", "HAS_Z": "constexpr"}


def _head(cap, z):
    """The flags' constexprs, and a name tag when any is on."""
    return {"HAS_CAP": cap, "HAS_Z": z}, (f",cap={cap},z={z}" if cap or z else "")


def _forward_case(dtype, has_weight, has_smoothing, block_c, warps, cap=False, z=False):
    sig = {
        "logits_ptr": f"*{dtype}",
        "stride_row": "i32",
        "target_ptr": "*i64",
        "weight_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "stats_ptr": "*fp32",
        "stats_stride": "i32",
        "wy_ptr": "*fp32",
        "num_classes": "i32",
        "ignore_index": "i32",
        "label_smoothing_bits": "i64",
        **HEAD_SIG,
        "HAS_WEIGHT": "constexpr",
        "HAS_SMOOTHING": "constexpr",
        "BLOCK_C": "constexpr",
    }
    head, tag = _head(cap, z)
    const = {"HAS_WEIGHT": has_weight, "HAS_SMOOTHING": has_smoothing, "BLOCK_C": block_c, **head}
    name = f"ce_forward[{dtype},w={has_weight},ls={has_smoothing},BLOCK_C={block_c},warps={warps}{tag}]"
    return name, ce_forward.ce_forward_kernel, sig, const, warps


def _offset_sig(offset):
    """The score-offset parameters of the select kernels: ``offset`` is its dtype, or None (none)."""
    return {"HAS_OFFSET": "constexpr", "offset_ptr": f"*{offset or 'fp32'}"}, {"HAS_OFFSET": offset is not None}


def _select_case(loss_dtype, out_dtype, keep_all, easiest, reduction, from_ptr, offset=None):
    off_sig, off_const = _offset_sig(offset)
    sig = {
        "loss_ptr": f"*{loss_dtype}",
        "wy_ptr": f"*{loss_dtype}",
        "target_ptr": "*i64",
        "kept_ptr": "*i1",
        "out_ptr": f"*{out_dtype}",
        "result_ptr": f"*{out_dtype}",
        "k_ptr": "*i64",
        "threshold_ptr": f"*{out_dtype}",
        "denom_ptr": f"*{loss_dtype}",
        "num_rows": "i32",
        "ignore_index": "i32",
        "keep_ratio_bits": "i64",
        "ratio_ptr": "*fp32",
        "RATIO_FROM_PTR": "constexpr",
        "KEEP_ALL": "constexpr",
        "EASIEST": "constexpr",
        "REDUCTION": "constexpr",
        "BLOCK": "constexpr",
        **off_sig,
    }
    const = {
        "RATIO_FROM_PTR": from_ptr,
        "KEEP_ALL": keep_all,
        "EASIEST": easiest,
        "REDUCTION": reduction,
        "BLOCK": 2048,
        **off_const,
    }
    name = f"select[{loss_dtype}->{out_dtype},all={keep_all},easiest={easiest},red={reduction},ptr={from_ptr}"
    name += f",offset={offset}]" if offset else "]"
    return name, select.select_kernel, sig, const, 4


def _backward_case(dtype, per_row, has_weight, has_smoothing, block_c, warps, cap=False, z=False):
    sig = {
        "logits_ptr": f"*{dtype}",
        "stride_row": "i32",
        "grad_ptr": f"*{dtype}",
        "stride_grad": "i32",
        "target_ptr": "*i64",
        "weight_ptr": "*fp32",
        "weight_sum_ptr": "*fp32",
        "stats_ptr": "*fp32",
        "stats_stride": "i32",
        "kept_ptr": "*i1",
        "grad_out_ptr": f"*{dtype}",
        "denom_ptr": "*fp32",
        "num_classes": "i32",
        "label_smoothing_bits": "i64",
        **HEAD_SIG,
        "PER_ROW_GRAD": "constexpr",
        "HAS_WEIGHT": "constexpr",
        "HAS_SMOOTHING": "constexpr",
        "BLOCK_C": "constexpr",
    }
    head, tag = _head(cap, z)
    const = {
        "PER_ROW_GRAD": per_row,
        "HAS_WEIGHT": has_weight,
        "HAS_SMOOTHING": has_smoothing,
        "BLOCK_C": block_c,
        **head,
    }
    name = f"ce_backward[{dtype},row_grad={per_row},w={has_weight},ls={has_smoothing},BLOCK_C={block_c}{tag}]"
    return name, ce_backward.ce_backward_kernel, sig, const, warps


def _forward_spatial_case(dtype, has_weight, has_smoothing, block_c, block_s, warps, cap=False, z=False):
    acc = "fp64" if dtype == "fp64" else "fp32"
    sig = {
        "logits_ptr": f"*{dtype}",
        "stride_n": "i64",
        "stride_c": "i32",
        "target_ptr": "*i64",
        "weight_ptr": f"*{dtype}",
        "loss_ptr": f"*{acc}",
        "stats_ptr": f"*{acc}",
        "stats_stride": "i32",
        "wy_ptr": f"*{acc}",
        "num_classes": "i32",
        "num_pixels": "i32",
        "ignore_index": "i32",
        "label_smoothing_bits": "i64",
        **HEAD_SIG,
        "HAS_WEIGHT": "constexpr",
        "HAS_SMOOTHING": "constexpr",
        "BLOCK_C": "constexpr",
        "BLOCK_S": "constexpr",
    }
    head, tag = _head(cap, z)
    const = {"HAS_WEIGHT": has_weight, "HAS_SMOOTHING": has_smoothing, "BLOCK_C": block_c, "BLOCK_S": block_s, **head}
    name = (
        f"ce_forward_spatial[{dtype},w={has_weight},ls={has_smoothing},BLOCK_C={block_c},"
        f"BLOCK_S={block_s},warps={warps}{tag}]"
    )
    return name, ce_forward_spatial.ce_forward_spatial_kernel, sig, const, warps


def _backward_spatial_case(dtype, per_sample, has_weight, has_smoothing, block_c, block_s, warps, cap=False, z=False):
    acc = "fp64" if dtype == "fp64" else "fp32"
    head, tag = _head(cap, z)
    sig = {
        "logits_ptr": f"*{dtype}",
        "stride_n": "i64",
        "stride_c": "i32",
        "grad_ptr": f"*{dtype}",
        "stride_grad_n": "i64",
        "stride_grad_c": "i32",
        "target_ptr": "*i64",
        "weight_ptr": f"*{dtype}",
        "weight_sum_ptr": f"*{acc}",
        "stats_ptr": f"*{acc}",
        "stats_stride": "i32",
        "kept_ptr": "*i1",
        "grad_out_ptr": f"*{dtype}",
        "denom_ptr": f"*{acc}",
        "num_classes": "i32",
        "num_pixels": "i32",
        "label_smoothing_bits": "i64",
        **HEAD_SIG,
        "PER_SAMPLE_GRAD": "constexpr",
        "HAS_WEIGHT": "constexpr",
        "HAS_SMOOTHING": "constexpr",
        "BLOCK_C": "constexpr",
        "BLOCK_S": "constexpr",
    }
    const = {
        "PER_SAMPLE_GRAD": per_sample,
        "HAS_WEIGHT": has_weight,
        "HAS_SMOOTHING": has_smoothing,
        "BLOCK_C": block_c,
        "BLOCK_S": block_s,
        **head,
    }
    name = (
        f"ce_backward_spatial[{dtype},sample_grad={per_sample},w={has_weight},ls={has_smoothing},"
        f"BLOCK_C={block_c},BLOCK_S={block_s},warps={warps}{tag}]"
    )
    return name, ce_backward_spatial.ce_backward_spatial_kernel, sig, const, warps


def _grid_cases(loss_dtype, out_dtype, easiest, reduction, offset=None):
    """The multi-program select's six kernels for one configuration."""
    rows = {"num_rows": "i32", "ignore_index": "i32"}
    off_sig, off_const = _offset_sig(offset)
    tag = f",offset={offset}" if offset else ""
    return [
        (
            f"grid_histogram[{loss_dtype},easiest={easiest}{tag}]",
            grid_select.grid_histogram_kernel,
            {
                "loss_ptr": f"*{loss_dtype}",
                "target_ptr": "*i64",
                "state_ptr": "*i64",
                "hist_ptr": "*i64",
                **rows,
                "SHIFT": "constexpr",
                "EASIEST": "constexpr",
                "BLOCK": "constexpr",
                **off_sig,
            },
            {"SHIFT": 24, "EASIEST": easiest, "BLOCK": 2048, **off_const},
            8,
        ),
        (
            f"grid_pick[{loss_dtype}]",
            grid_select.grid_pick_kernel,
            {
                "state_ptr": "*i64",
                "hist_ptr": "*i64",
                "keep_ratio_bits": "i64",
                "ratio_ptr": "*fp32",
                "SHIFT": "constexpr",
                "FIRST": "constexpr",
                "IS_FP64": "constexpr",
                "RATIO_FROM_PTR": "constexpr",
            },
            {"SHIFT": 24, "FIRST": True, "IS_FP64": loss_dtype == "fp64", "RATIO_FROM_PTR": False},
            4,
        ),
        (
            f"grid_ties[{loss_dtype}{tag}]",
            grid_select.grid_ties_kernel,
            {
                "loss_ptr": f"*{loss_dtype}",
                "target_ptr": "*i64",
                "state_ptr": "*i64",
                "ties_ptr": "*i64",
                **rows,
                "EASIEST": "constexpr",
                "BLOCK": "constexpr",
                **off_sig,
            },
            {"EASIEST": easiest, "BLOCK": 2048, **off_const},
            8,
        ),
        (
            "grid_scan",
            grid_select.grid_scan_kernel,
            {"ties_ptr": "*i64", "num_blocks": "i32", "BLOCK": "constexpr"},
            {"BLOCK": 1024},
            4,
        ),
        (
            f"grid_keep[{loss_dtype}->{out_dtype},red={reduction}{tag}]",
            grid_select.grid_keep_kernel,
            {
                "loss_ptr": f"*{loss_dtype}",
                "wy_ptr": f"*{loss_dtype}",
                "target_ptr": "*i64",
                "state_ptr": "*i64",
                "ties_before_ptr": "*i64",
                "kept_ptr": "*i1",
                "out_ptr": f"*{out_dtype}",
                "partial_ptr": f"*{loss_dtype}",
                "num_rows": "i32",
                "num_blocks": "i32",
                "ignore_index": "i32",
                "EASIEST": "constexpr",
                "REDUCTION": "constexpr",
                "BLOCK": "constexpr",
                **off_sig,
            },
            {"EASIEST": easiest, "REDUCTION": reduction, "BLOCK": 2048, **off_const},
            8,
        ),
        (
            f"grid_finish[{loss_dtype}->{out_dtype},red={reduction}]",
            grid_select.grid_finish_kernel,
            {
                "partial_ptr": f"*{loss_dtype}",
                "state_ptr": "*i64",
                "result_ptr": f"*{out_dtype}",
                "k_ptr": "*i64",
                "threshold_ptr": f"*{out_dtype}",
                "denom_ptr": f"*{loss_dtype}",
                "num_blocks": "i32",
                "EASIEST": "constexpr",
                "REDUCTION": "constexpr",
                "BLOCK": "constexpr",
            },
            {"EASIEST": easiest, "REDUCTION": reduction, "BLOCK": 1024},
            4,
        ),
    ]


def _chunk_backward_case(grad_dtype, per_row, has_weight, has_smoothing, block_c, warps, cap=False, z=False):
    """The row backward on the LM head's fp32 logits chunk, rounding ``dlogits`` to ``grad_dtype``."""
    name, fn, sig, const, warps = _backward_case("fp32", per_row, has_weight, has_smoothing, block_c, warps, cap, z)
    sig = {**sig, "grad_ptr": f"*{grad_dtype}", "grad_out_ptr": "*fp32"}
    return name.replace("[fp32,", f"[fp32->{grad_dtype},", 1), fn, sig, const, warps


CASES = [
    _forward_case("fp32", False, False, 4096, 8),
    _forward_case("bf16", False, False, 8192, 8),
    _forward_case("fp16", True, True, 8192, 8),
    _forward_case("fp32", True, True, 16, 1),
    _forward_case("fp64", True, True, 2048, 4),
    _select_case("fp32", "fp32", False, False, 1, False),
    _select_case("fp32", "bf16", False, True, 0, True),
    _select_case("fp32", "fp16", True, False, 2, False),
    _select_case("fp64", "fp64", False, False, 1, False),
    # With a score offset (ranking loss - offset; a bf16 offset converted on load, an fp32 one on fp64 losses).
    _select_case("fp32", "bf16", False, False, 1, False, offset="bf16"),
    _select_case("fp64", "fp64", True, True, 0, True, offset="fp32"),
    _backward_case("fp32", False, False, False, 4096, 8),
    _backward_case("bf16", True, False, False, 8192, 8),
    _backward_case("fp16", False, True, True, 8192, 8),
    _backward_case("fp32", False, True, True, 16, 1),
    _backward_case("fp64", True, True, True, 2048, 4),
    # The spatial kernels at tiles spatial_config picks: many classes (16x128; 8 warps for fp64),
    # few classes (8x256, 4x256), one class (1x256), and a small image (8x16).
    _forward_spatial_case("fp32", False, False, 16, 128, 4),
    _forward_spatial_case("bf16", True, True, 16, 128, 4),
    _forward_spatial_case("fp16", False, True, 4, 256, 4),
    _forward_spatial_case("fp32", True, True, 1, 256, 4),
    _forward_spatial_case("bf16", False, False, 8, 16, 1),
    _forward_spatial_case("fp64", True, True, 16, 128, 8),
    _forward_spatial_case("fp64", False, False, 8, 256, 8),
    _backward_spatial_case("fp32", False, False, False, 16, 128, 4),
    _backward_spatial_case("bf16", True, True, True, 16, 128, 4),
    _backward_spatial_case("fp16", False, True, False, 4, 256, 4),
    _backward_spatial_case("fp32", True, True, True, 1, 256, 4),
    _backward_spatial_case("bf16", False, False, False, 8, 16, 1),
    _backward_spatial_case("fp64", True, True, True, 16, 128, 8),
    _backward_spatial_case("fp64", False, False, False, 8, 256, 8),
    *_grid_cases("fp32", "bf16", False, 1),
    *_grid_cases("fp64", "fp64", True, 0),
    *[case for case in _grid_cases("fp32", "fp32", True, 2, offset="fp16") if "offset" in case[0]],
    # The LM head (linear_ce): the row forward and backward on its fp32 logits chunks (the forward's
    # at 4096 and 8192 columns above), the backward rounding dlogits to bf16/fp16.
    _chunk_backward_case("bf16", False, True, True, 4096, 8),
    _chunk_backward_case("fp16", True, False, False, 4096, 8),
    # logit_softcap / z_loss (HAS_CAP, HAS_Z): each kernel with both, and each flag alone somewhere;
    # the LM head's fp32 chunks and the CE op's bf16 logits (4096-column blocks with a cap), fp64.
    _forward_case("fp32", False, False, 4096, 8, cap=True, z=True),
    _forward_case("bf16", True, True, 4096, 8, cap=True),
    _forward_case("fp64", False, False, 2048, 4, z=True),
    _backward_case("fp32", False, False, False, 4096, 8, cap=True, z=True),
    _backward_case("bf16", True, True, True, 4096, 8, cap=True),
    _backward_case("fp64", False, False, False, 2048, 4, z=True),
    _chunk_backward_case("bf16", False, True, True, 4096, 8, cap=True, z=True),
    _forward_spatial_case("fp32", True, True, 16, 128, 4, cap=True, z=True),
    _forward_spatial_case("fp64", False, False, 16, 128, 8, cap=True),
    _forward_spatial_case("bf16", False, False, 1, 256, 4, z=True),
    _backward_spatial_case("fp32", False, True, True, 16, 128, 4, cap=True, z=True),
    _backward_spatial_case("fp64", True, False, False, 16, 128, 8, cap=True),
    _backward_spatial_case("bf16", False, False, False, 1, 256, 4, z=True),
]


def _resources(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    spill = int(re.search(r"LOCAL:(\d+)", text).group(1))
    return regs, spill


_DEF = re.compile(r"^\s*(%[\w.]+)\s*=\s*([\w.]+)\s+(.*?)(?:\s+loc\(.*)?$")
# Ops that carry a value unchanged in width (a stride stays i32 through them).
_SAME_WIDTH = {"tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape"}


def int32_stride_products(ttir: str) -> list[str]:
    """Every ``arith.muli`` in i32 of a value derived from a kernel argument named ``*stride*``
    (through splat/broadcast/reshape): an index times a stride that wraps at 2^31 (a weight view
    with ``(D - 1) * V >= 2^31``). Returns the offending TTIR lines (names as in the source)."""
    header = next(line for line in ttir.splitlines() if "tt.func public" in line)
    strided = set(re.findall(r"(%\w*stride\w*):\s*i32", header))
    found = []
    for line in ttir.splitlines():
        match = _DEF.match(line)
        if not match:
            continue
        result, op, rest = match.groups()
        operands, _, type_ = rest.rpartition(" : ")
        used = set(re.findall(r"%[\w.]+", operands))
        if not used & strided:
            continue
        if op in _SAME_WIDTH:
            strided.add(result)
        elif op == "arith.muli" and re.search(r"\bi32\b|xi32>", type_):
            found.append(line.strip()[:200])
    return found


def main() -> int:
    failed = 0
    for name, fn, sig, const, warps in CASES:
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=const), target=TARGET, options={"num_warps": warps}
            )
        except Exception as exc:  # report every failing configuration, not just the first
            failed += 1
            print(json.dumps({"name": name, "error": str(exc)[-2000:]}), flush=True)
            continue
        regs, spill = _resources(compiled.asm["cubin"])
        info = {
            "name": name,
            "registers": regs,
            "spill_bytes": spill,
            "shared_bytes": compiled.metadata.shared,
            "int32_stride_products": int32_stride_products(compiled.asm["ttir"]),
        }
        print(json.dumps(info), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
