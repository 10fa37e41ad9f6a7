"""Helpers shared by the Triton kernels: device functions and launch arithmetic."""

import math
import os
import struct

import triton
import triton.language as tl

from fusedloss._dtypes import acc_dtype  # noqa: F401  (re-exported for the kernels' launchers)

# Triton's CPU interpreter, chosen by the environment before triton is imported, is the only way its
# kernels run on CPU tensors; the launchers take its paths (fp32 dot operands, small blocks) from this
# flag, never from the tensors' device, so that a compile for a GPU sees the GPU's paths.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements per thread that set num_warps (16 fp32 values; 32 bytes of bf16 = two 16-byte loads).
ELEMENTS_PER_THREAD = 16


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr):
    """fp32/fp64 x in DTYPE, rounded to nearest even.

    bfloat16 is rounded by bit arithmetic on every target: Triton 3.8's CPU interpreter truncates
    a plain .to(bfloat16), and its explicit "rtne" path neither carries into the exponent nor
    rounds ties to even (errors of a full ulp, and of half the value). On a GPU the same integer
    ops cost nothing next to the store, and the tests run exactly the code the GPU runs.
    float16 and wider casts are correct everywhere as plain casts.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        # add 0x7FFF plus the lowest kept bit: rounds to nearest, ties to even; carries propagate
        # into the exponent (and to inf at the top), NaN payloads keep their high bits
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def param(hi, lo, ACC: tl.constexpr):
    # A float option of the op, passed as two float32 halves (kernel float arguments are float32):
    # the float64 path gets hi + lo, about 48 bits of the host double; float32 gets hi = float(v).
    if ACC == tl.float64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, ACC)


def split_float(v: float) -> tuple[float, float]:
    """v as float32 hi + float32 lo (hi + lo carries about 48 bits of v for the float64 path)."""
    v = float(v)
    if not math.isfinite(v) or abs(v) > 3.4028234663852886e38:
        return v, 0.0
    hi = struct.unpack("f", struct.pack("f", v))[0]
    lo = struct.unpack("f", struct.pack("f", v - hi))[0]
    return hi, lo


def launch_config(num_classes: int, max_block: int, max_warps: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(num_classes, 1)), max_block)
    num_warps = max(1, min(max_warps, block // (32 * ELEMENTS_PER_THREAD)))
    return block, num_warps
