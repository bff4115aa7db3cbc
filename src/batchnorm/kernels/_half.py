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
- float16: LLVM's ``fpext``/``fptrunc`` (IEEE round to nearest even) where the target converts
  in hardware (x86 with F16C, AArch64). Elsewhere (an x86 CPU without F16C, or
  ``NUMBA_CPU_NAME=generic``, which drops the host's features) LLVM would call compiler-rt's
  ``__extendhfsf2``/``__truncsfhf2``, which Numba's JIT does not link ("LLVM ERROR: Symbol not
  found" aborts the process), so the same conversions are written out on the bits
  (:func:`_float16_to_single`, :func:`_single_to_float16`). Numba keys its cache on the target's
  CPU name and features, so a cached kernel never runs on a target it was not built for.

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
_SINGLE = ir.FloatType()
BFLOAT16_BITS = types.int16
FLOAT16_BITS = types.uint16


def _is_half(dtype: Any) -> bool:
    return dtype in (BFLOAT16_BITS, FLOAT16_BITS)


def _converts_float16_in_hardware(context: Any) -> bool:
    """Whether the target compiles ``fpext``/``fptrunc`` of half to instructions, not libcalls."""
    triple, _, features = context.codegen().magic_tuple()
    if triple.startswith(("aarch64", "arm64")):
        return True
    return triple.startswith(("x86_64", "i686", "i386")) and "+f16c" in str(features).split(",")


def _constant(value: int) -> ir.Constant:
    return ir.Constant(_I32, value)


def _float16_to_single(builder: ir.IRBuilder, half: ir.Value) -> ir.Value:
    """float16 bits to float32, exactly: sign ``s``, exponent ``e``, mantissa ``m`` (10 bits)
    give ``(e + 112) << 23 | m << 13`` (normal), ``0x7F800000 | m << 13`` (inf, NaN) and
    ``m * 2**-24`` (subnormal, exact in float32), with the sign's bit set."""
    bits = builder.zext(half, _I32)
    sign = builder.shl(builder.and_(bits, _constant(0x8000)), _constant(16))
    exponent = builder.and_(builder.lshr(bits, _constant(10)), _constant(0x1F))
    mantissa = builder.and_(bits, _constant(0x3FF))
    shifted = builder.shl(mantissa, _constant(13))
    normal = builder.or_(builder.shl(builder.add(exponent, _constant(112)), _constant(23)), shifted)
    special = builder.or_(_constant(0x7F800000), shifted)
    scaled = builder.fmul(builder.uitofp(mantissa, _SINGLE), ir.Constant(_SINGLE, 2.0**-24))
    subnormal = builder.bitcast(scaled, _I32)
    magnitude = builder.select(
        builder.icmp_unsigned("==", exponent, _constant(0x1F)),
        special,
        builder.select(builder.icmp_unsigned("==", exponent, _constant(0)), subnormal, normal),
    )
    return builder.bitcast(builder.or_(magnitude, sign), _SINGLE)


def _single_to_float16(builder: ir.IRBuilder, single: ir.Value) -> ir.Value:
    """float32 to float16 bits, round to nearest, ties to even, on the magnitude's bits ``a``:

    - normal (``2**-14 <= |x| < 65520``): rebias the exponent (``a - (112 << 23)``), then
      ``(r + 0xFFF + ((r >> 13) & 1)) >> 13``; a carry out of the mantissa steps the exponent;
    - subnormal (``|x| < 2**-14``): the 24-bit significand shifted right by ``126 - e`` (at most
      25: smaller values round to 0), rounded up when the remainder passes half, or equals it
      with an odd result;
    - ``|x| >= 65520`` and inf: inf (``0x7C00``); NaN: the quiet NaN ``0x7E00`` (c10's rule);

    with the sign's bit set. Integer operations only, which fast-math flags do not touch.
    """
    bits = builder.bitcast(single, _I32)
    sign = builder.and_(builder.lshr(bits, _constant(16)), _constant(0x8000))
    magnitude = builder.and_(bits, _constant(0x7FFFFFFF))

    rebiased = builder.sub(magnitude, _constant(112 << 23))
    odd = builder.and_(builder.lshr(rebiased, _constant(13)), _constant(1))
    normal = builder.lshr(builder.add(rebiased, builder.add(odd, _constant(0xFFF))), _constant(13))

    exponent = builder.lshr(magnitude, _constant(23))
    significand = builder.or_(builder.and_(magnitude, _constant(0x7FFFFF)), _constant(0x800000))
    # 14 <= shift <= 25 on every input (no shift by a negative amount, which is poison in LLVM).
    capped = builder.select(
        builder.icmp_unsigned(">", exponent, _constant(112)), _constant(112), exponent
    )
    shift = builder.sub(_constant(126), capped)
    shift = builder.select(builder.icmp_unsigned(">", shift, _constant(25)), _constant(25), shift)
    kept = builder.lshr(significand, shift)
    remainder = builder.and_(
        significand, builder.sub(builder.shl(_constant(1), shift), _constant(1))
    )
    halfway = builder.shl(_constant(1), builder.sub(shift, _constant(1)))
    above = builder.icmp_unsigned(">", remainder, halfway)
    tie = builder.icmp_unsigned("==", remainder, halfway)
    odd_kept = builder.icmp_unsigned("!=", builder.and_(kept, _constant(1)), _constant(0))
    round_up = builder.or_(above, builder.and_(tie, odd_kept))
    subnormal = builder.add(kept, builder.zext(round_up, _I32))

    result = builder.select(
        builder.icmp_unsigned(">", magnitude, _constant(0x7F800000)),
        _constant(0x7E00),
        builder.select(
            builder.icmp_unsigned(">=", magnitude, _constant(0x477FF000)),
            _constant(0x7C00),
            builder.select(
                builder.icmp_unsigned("<", magnitude, _constant(0x38800000)), subnormal, normal
            ),
        ),
    )
    return builder.trunc(builder.or_(result, sign), _I16)


@intrinsic
def _widened(typingctx, value):  # type: ignore[no-untyped-def]
    """A loaded data value in the compute dtype: a float unchanged, half bits as float32."""
    if isinstance(value, types.Float):
        return value(value), lambda context, builder, signature, args: args[0]
    if value == BFLOAT16_BITS:

        def from_bfloat16(context, builder, signature, args):  # type: ignore[no-untyped-def]
            bits = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
            return builder.bitcast(bits, _SINGLE)

        return types.float32(value), from_bfloat16
    if value == FLOAT16_BITS:

        def from_float16(context, builder, signature, args):  # type: ignore[no-untyped-def]
            if _converts_float16_in_hardware(context):
                return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _SINGLE)
            return _float16_to_single(builder, args[0])

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
            if _converts_float16_in_hardware(context):
                return builder.bitcast(builder.fptrunc(single, ir.HalfType()), _I16)
            return _single_to_float16(builder, single)
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


@intrinsic
def _holds_half(typingctx, value):  # type: ignore[no-untyped-def]
    """Whether ``value`` (an element loaded from an array) is half-precision bits: a constant of
    the compiled kernel, so a branch on it costs nothing (a run-time flag in its place kept the
    channels-last loops from vectorising: the fused-activation backward ran 3x slower)."""
    half = _is_half(value)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return context.get_constant(types.boolean, half)

    return types.boolean(value), codegen


# Called from kernels only (with the value, not the typing context): typed as Any for mypy.
widened: Any = _widened
narrowed: Any = _narrowed
compute_dtype: Any = _compute_dtype
holds_half: Any = _holds_half
