"""@triton.jit helpers shared by the Triton kernels."""

import triton
import triton.language as tl


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
