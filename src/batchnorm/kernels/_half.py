"""Half-precision storage: the kernels read and write float16/bfloat16 data as their bits.

Numba has no half type. A float16 tensor is passed as a ``uint16`` array of its bits, a bfloat16
one as an ``int16`` array (the two integer types tell the formats apart at compile time, so each
compiles its own conversion and float32/float64 arrays compile none). Every load of a data
value goes through :func:`widened`, every store through :func:`narrowed`; the arithmetic runs in
the compute dtype (:func:`compute_dtype`), float32 for both half formats, as torch's CPU batch
norm and Keras' mixed-precision policies compute.

- bfloat16 ``b`` to float32: the bits ``b << 16``; float32 to bfloat16: round to nearest, ties to
  even, ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16`` of the float32 bits ``u``, and NaN to the quiet
  NaN ``0x7FC0`` (c10's ``round_to_nearest_even``, what ``tensor.to(torch.bfloat16)`` does).
- float16: LLVM's ``fpext``/``fptrunc`` (IEEE round to nearest even, F16C instructions on x86).

Both directions equal torch's conversions on every float16/bfloat16 bit pattern and on float32
values across the range (tests/test_half_kernels.py): a half kernel's result is the float32
kernel's on ``x.float()``, rounded as ``.to(half)`` rounds it. Intrinsics, not functions: they
are lowered inline at each call, with nothing more for Numba to compile.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

_I16, _I32 = ir.IntType(16), ir.IntType(32)
BFLOAT16_BITS = types.int16
FLOAT16_BITS = types.uint16


def _is_half(dtype: Any) -> bool:
    return dtype in (BFLOAT16_BITS, FLOAT16_BITS)


@intrinsic
def _widened(typingctx, value):  # type: ignore[no-untyped-def]
    """A loaded data value in the compute dtype: a float unchanged, half bits as float32."""
    if isinstance(value, types.Float):
        return value(value), lambda context, builder, signature, args: args[0]
    if value == BFLOAT16_BITS:

        def from_bfloat16(context, builder, signature, args):  # type: ignore[no-untyped-def]
            bits = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
            return builder.bitcast(bits, ir.FloatType())

        return types.float32(value), from_bfloat16
    if value == FLOAT16_BITS:

        def from_float16(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(value), from_float16
    return None


@intrinsic
def _narrowed(typingctx, value, like):  # type: ignore[no-untyped-def]
    """``value`` as an element of the array ``like`` stores it (rounded to nearest even)."""
    target = like.dtype
    if isinstance(target, types.Float):

        def cast(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return context.cast(builder, args[0], signature.args[0], target)

        return target(value, like), cast
    if not _is_half(target):
        return None

    def to_half(context, builder, signature, args):  # type: ignore[no-untyped-def]
        single = context.cast(builder, args[0], signature.args[0], types.float32)
        if target == FLOAT16_BITS:
            return builder.bitcast(builder.fptrunc(single, ir.HalfType()), _I16)
        bits = builder.bitcast(single, _I32)
        odd = builder.and_(builder.lshr(bits, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
        bias = builder.add(odd, ir.Constant(_I32, 0x7FFF))
        rounded = builder.lshr(builder.add(bits, bias), ir.Constant(_I32, 16))
        nan = builder.fcmp_unordered("uno", single, single)
        return builder.trunc(builder.select(nan, ir.Constant(_I32, 0x7FC0), rounded), _I16)

    return target(value, like), to_half


@intrinsic
def _compute_dtype(typingctx, array):  # type: ignore[no-untyped-def]
    """The dtype the kernels compute in for ``array``'s data: its own, float32 for half bits
    (``np.empty(n, compute_dtype(x))``)."""
    target = types.float32 if _is_half(array.dtype) else array.dtype

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return context.get_dummy_value()

    return types.DType(target)(array), codegen


# Called from kernels only (with the value, not the typing context): typed as Any for mypy.
widened: Any = _widened
narrowed: Any = _narrowed
compute_dtype: Any = _compute_dtype
