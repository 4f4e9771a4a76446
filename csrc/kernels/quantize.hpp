// Quantisation kernels of the ring all-reduce: float data travels as small integers plus one
// (float32, float32) parameter pair per block of kBlockElements values.
//
// Wire layout of n elements (n == 0 is zero bytes):
//   nblocks = ceil(n / kBlockElements); the last block may be shorter.
//   [nblocks x 8 bytes]   per block two little-endian float32 parameters (below)
//   [n x sizeof(wire)]    the quantised values, in element order, little endian
//   wire_bytes(f, n) = nblocks * kParamBytesPerBlock + n * element_size(f.wire)
// The wire buffer has NO alignment requirement (it is read and written with memcpy or bytewise).
// Source, local and destination buffers must be aligned for the source type, as for reduce.hpp.
// A buffer of wire bytes is self-contained: a piece of a tensor quantised on its own decodes on its
// own, its blocks starting at the piece's first element. Pieces cut at multiples of kBlockElements
// decode exactly like the whole tensor.
//
// MIN_MAX (wire UINT8 or UINT16; q in [0, qmax], qmax = 255 or 65535):
//   params = (min, scale); min = the block's minimum; scale = (max - min) / qmax rounded UP to a
//   float32 with at most 24 - bits(q) significant bits (so that q * scale is exact in float32).
//   q = round_half_even(clamp((x - min) * (1 / scale), 0, qmax));  x' = min + q * scale.
//   A constant block sends scale 0 and q 0: it dequantises exactly to its value.
// ZERO_POINT_SCALE (wire UINT8, UINT16 or INT8; q in [qmin, qmax], INT8: -128..127):
//   an affine quantiser in which 0.0 is exact: lo = min(min(x), 0), hi = max(max(x), 0),
//   params = (scale, zero_point); scale = (hi - lo) / (qmax - qmin), rounded up as above;
//   zero_point = clamp(round(qmin - lo / scale), qmin, qmax), an integer stored as float32;
//   q = round_half_even(clamp(x * (1 / scale), qmin - zp, qmax - zp)) + zp;
//   x' = (q - zero_point) * scale.
//   A constant block of value c != 0 sends scale |c| and q - zero_point = +-1: exact. An all-zero
//   block sends (0, 0) and q 0.
// Error: |x - x'| <= scale / 2, plus float32 rounding: a few ulp of q (the reciprocal) and of the
// block's largest magnitude. A block that is constant comes back exactly (-0.0 as +0.0).
// Scales are at least 2^-126 (FLT_MIN) for float32-computed sources, so 1 / scale is finite: blocks
// whose whole range is below qmax * 2^-126 (about 3e-36 for 8 bits) are quantised with that step.
//
// Determinism: dequantisation is a pure function of the wire bytes. Because every product q * scale
// and (q - zero_point) * scale is exact, min + q * scale rounds exactly once whether or not a
// compiler fuses it into an FMA, so peers on different CPUs and builds decode the same bits.
// Quantisation is deterministic too (no result depends on FMA contraction or on the SIMD width).
// Like all float code, results involving float32 subnormals depend on FTZ/DAZ being off (default).
//
// Non-finite input: a block holding any NaN or +-Inf is sent as params (NaN, NaN) with the
// canonical quiet NaN 0x7fc00000 and all-zero values, and dequantises to all canonical quiet NaN
// (float 0x7fc00000, double 0x7ff8000000000000, float16 0x7e00, bfloat16 0x7fc0), whatever the op of
// dequantize_reduce. Other blocks are unaffected. A block whose grid cannot be computed in the
// compute type is sent the same way: a block whose range (MIN_MAX: max - min; ZERO_POINT_SCALE:
// hi - lo) exceeds float32's largest value 3.4e38, a MIN_MAX block whose max lies within a relative
// 2^-(24 - bits(q)) of it, or a DOUBLE block beyond float32's range (the parameters are float32).
//
// Sources: FLOAT is computed in float32; FLOAT16 / BFLOAT16 are widened to float32 and rounded once
// (to nearest even) when written, bit for bit as half.hpp's helpers; DOUBLE finds min/max in double,
// sends min rounded down and scale rounded up to float32, and dequantises in double from those
// float32 parameters. A constant DOUBLE block is exact when the constant is a float32 value.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/types.hpp"

namespace pccl::kernels::quant {

// What travels: a source float type quantised to a wire integer type.
struct Format {
    DataType source;                  // FLOAT, DOUBLE, FLOAT16, BFLOAT16
    DataType wire;                    // UINT8, UINT16; INT8 with ZERO_POINT_SCALE only
    QuantizationAlgorithm algorithm;  // MIN_MAX or ZERO_POINT_SCALE
};

// Empty if the combination is supported, else a message that says what is allowed.
// Every other function below requires validate(f).empty(); given an invalid format it writes nothing.
// They are thread-safe, never allocate, and use at most about 33 KiB of stack (staging buffers).
std::string validate(const Format& f);

// One (float32, float32) parameter pair per block of this many elements.
inline constexpr size_t kBlockElements = 256;
inline constexpr size_t kParamBytesPerBlock = 8;

// ceil(n / kBlockElements): the parameter pairs in front of n values.
size_t block_count(size_t n);

// Bytes of n quantised elements on the wire.
size_t wire_bytes(const Format& f, size_t n);

// Quantises n elements of `src` (source type) into `wire` (wire_bytes(f, n) bytes, any alignment).
// `src` and `wire` must not overlap.
void quantize(const Format& f, const void* src, size_t n, uint8_t* wire);

// dst[i] = dequant(wire)[i], written in the source type. `wire` and `dst` must not overlap.
void dequantize(const Format& f, const uint8_t* wire, size_t n, void* dst);

// Fused hop of a ring reduce-scatter: dst[i] = op(dequant(wire)[i], local[i]) in the source type,
// computed in float32 (double for DOUBLE) from the unrounded dequantised value and rounded once when
// written. With divide_by != 0 and op == AVG the result is divided by divide_by (the chunk owner's
// final step); AVG otherwise accumulates as SUM. MAX/MIN propagate NaN as reduce.hpp does.
// dst == local is allowed (in place); any other overlap is not, nor may `wire` overlap `dst`.
void dequantize_reduce(const Format& f, ReduceOp op, const uint8_t* wire, const void* local, size_t n, void* dst,
                       uint32_t divide_by);

}  // namespace pccl::kernels::quant
