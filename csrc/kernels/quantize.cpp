#include "kernels/quantize.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels/half.hpp"

// float16 spans use the F16C conversion instructions where the CPU has them (chosen at run time;
// a build may define PCCL_QUANT_NO_F16C to test the portable path).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PCCL_QUANT_NO_F16C)
#define PCCL_QUANT_F16C 1
#include <immintrin.h>
#endif

// The span kernels are compiled twice on x86-64 with glibc, for x86-64-v3 (AVX2, FMA, F16C) and for
// the baseline, and the loader picks one per CPU (ifunc). Both give the same bits: every operation is
// an IEEE operation and no result depends on FMA contraction (see quantize.hpp); a build with
// -march=x86-64-v3 -ffp-contract=fast everywhere gives the same bits too. Elsewhere (aarch64, clang,
// musl) they are compiled once for the build's target.
// A build may define PCCL_QUANT_CLONES itself (empty: one baseline version, e.g. to compare clones).
#ifndef PCCL_QUANT_CLONES
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define PCCL_QUANT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PCCL_QUANT_CLONES
#endif
#endif
// Helpers of the span kernels: inlined so that each clone compiles them for its own target.
#define PCCL_QUANT_INLINE __attribute__((always_inline)) inline

namespace pccl::kernels::quant {
namespace {

using Algorithm = QuantizationAlgorithm;

// Bits of a float32 significand (with the implicit one). A scale with at most this many bits minus
// the bits of the quantised integer makes every product q * scale exact in float32.
constexpr int kFloatSignificandBits = 24;
// Half-precision inputs and the dequantised operand of a reduce are staged in a stack buffer of this
// many elements (16 KiB of float32 / 32 KiB of double, cache-resident), a whole number of blocks.
constexpr size_t kSpanBlocks = 16;
constexpr size_t kSpanElements = kSpanBlocks * kBlockElements;
static_assert(kSpanBlocks <= 32, "the non-finite block mask of a span is a uint32_t");

constexpr uint32_t kCanonicalNaNBits = 0x7fc00000u;  // float32 quiet NaN: params of a non-finite block

// ---- value types -------------------------------------------------------------------------------

// The integers a wire type carries. kBits: bits of (kMax - kMin), the largest |q - zero_point|.
template <class Q> struct WireRange;
template <> struct WireRange<uint8_t> { static constexpr int32_t kMin = 0, kMax = 255; static constexpr int kBits = 8; };
template <> struct WireRange<int8_t> { static constexpr int32_t kMin = -128, kMax = 127; static constexpr int kBits = 8; };
template <> struct WireRange<uint16_t> { static constexpr int32_t kMin = 0, kMax = 65535; static constexpr int kBits = 16; };

// A source type: how its elements are stored (Elem) and the float type they are computed in.
struct F32Source {
    using Elem = float;
    using Compute = float;
    static float widen(float x) { return x; }
    static float narrow(float x) { return x; }
};
struct F64Source {
    using Elem = double;
    using Compute = double;
    static double widen(double x) { return x; }
    static double narrow(double x) { return x; }
};
// float16 <-> float32, branch-free so that span loops vectorise: GCC 12 converts _Float16 (what
// half.hpp uses) one element at a time, and through libgcc calls without F16C. Bit-identical to
// half.hpp's f16_to_f32 / f32_to_f16 and to the F16C instructions for every one of the 2^16 and 2^32
// inputs, NaN payloads included (round to nearest even; NaN comes out quiet). FTZ/DAZ modes cannot
// change them: no float32 subnormal is produced, and one read rounds to a float16 zero either way.
constexpr uint32_t kF16ExponentRebias = (127 - 15) << 23;  // float16 exponent bias -> float32's
constexpr float kF16SubnormalUnit = 0x1p-24f;                // value of float16 mantissa bit 0 at exponent 0
constexpr uint32_t kF16MinNormalAsF32 = 0x38800000u;         // 2^-14
constexpr uint32_t kF16OverflowAsF32 = 0x47800000u;          // 2^16: from here on +-Inf
constexpr uint32_t kF32HalfBits = 0x3f000000u;               // 0.5f: adding it rounds to units of 2^-24

// a where c holds, else b, as bit masks: GCC turns ?: chains with constant arms into jumps, and a
// loop with jumps does not vectorise.
PCCL_QUANT_INLINE uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
    const uint32_t mask = 0u - static_cast<uint32_t>(c);
    return (a & mask) | (b & ~mask);
}

PCCL_QUANT_INLINE float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t magnitude = h & 0x7fffu;
    const uint32_t exponent = magnitude >> 10;
    const uint32_t normal = (magnitude << 13) + kF16ExponentRebias;
    const uint32_t quiet = select_bits(magnitude > 0x7c00u, 0x00400000u, 0u);
    const uint32_t special = (normal + kF16ExponentRebias) | quiet;  // exponent 31: Inf, NaN
    // Exponent 0: magnitude * 2^-24, exact (a signed conversion: SSE2 has no unsigned one).
    const float tiny = static_cast<float>(static_cast<int32_t>(magnitude)) * kF16SubnormalUnit;
    uint32_t bits = select_bits(exponent == 0x1fu, special, normal);
    bits = select_bits(exponent == 0u, std::bit_cast<uint32_t>(tiny), bits);
    return std::bit_cast<float>(bits | sign);
}

PCCL_QUANT_INLINE uint16_t f32_to_f16_bits(float f) {
    const uint32_t bits = std::bit_cast<uint32_t>(f);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t magnitude = bits & 0x7fffffffu;
    // Normal range: rebias and round the 13 dropped bits to nearest even; a carry out of the
    // mantissa bumps the exponent, up to Inf from 65520 on.
    const uint32_t normal = (magnitude - kF16ExponentRebias + 0x0fffu + ((magnitude >> 13) & 1u)) >> 13;
    // Below 2^-14: adding 0.5 rounds to whole units of 2^-24, which are the float16 bits.
    const float aligned = std::bit_cast<float>(magnitude) + 0.5f;
    const uint32_t subnormal = std::bit_cast<uint32_t>(aligned) - kF32HalfBits;
    const uint32_t nan = 0x7e00u | ((magnitude >> 13) & 0x3ffu);
    uint32_t h = select_bits(magnitude < kF16MinNormalAsF32, subnormal, normal);
    h = select_bits(magnitude >= kF16OverflowAsF32, 0x7c00u, h);
    h = select_bits(magnitude > 0x7f800000u, nan, h);
    return static_cast<uint16_t>(h | sign);
}

struct F16Source {
    using Elem = uint16_t;
    using Compute = float;
    static float widen(uint16_t h) { return f16_bits_to_f32(h); }
    static uint16_t narrow(float x) { return f32_to_f16_bits(x); }
};
struct BF16Source {
    using Elem = uint16_t;
    using Compute = float;
    static float widen(uint16_t h) { return bf16_to_f32(h); }
    static uint16_t narrow(float x) { return f32_to_bf16(x); }
};
// float32 and double are quantised straight from the caller's buffer; halves go through a span buffer.
template <class S> constexpr bool kComputesInPlace = std::is_same_v<typename S::Elem, typename S::Compute>;

// ---- wire access (little endian, any alignment) ------------------------------------------------

// The block's two parameters as they travel. MIN_MAX: (min, scale). ZERO_POINT_SCALE: (scale, zero_point).
struct Params {
    float first;
    float second;
};

Params nan_params() {
    const float nan = std::bit_cast<float>(kCanonicalNaNBits);
    return {nan, nan};
}

bool is_finite(const Params& p) { return std::isfinite(p.first) && std::isfinite(p.second); }

// Params travel as two little-endian float32: a plain copy on little-endian hosts.
constexpr bool kLittleEndianHost = std::endian::native == std::endian::little;

void store_params(uint8_t* out, const Params& p) {
    uint32_t bits[2] = {std::bit_cast<uint32_t>(p.first), std::bit_cast<uint32_t>(p.second)};
    if constexpr (!kLittleEndianHost) {
        for (uint32_t& b : bits) b = __builtin_bswap32(b);
    }
    std::memcpy(out, bits, kParamBytesPerBlock);
}

Params load_params(const uint8_t* in) {
    uint32_t bits[2];
    std::memcpy(bits, in, kParamBytesPerBlock);
    if constexpr (!kLittleEndianHost) {
        for (uint32_t& b : bits) b = __builtin_bswap32(b);
    }
    return {std::bit_cast<float>(bits[0]), std::bit_cast<float>(bits[1])};
}

// 16-bit values (bytes are written and read in place): a plain copy on little-endian hosts.
template <class Q>
PCCL_QUANT_INLINE void store_values(uint8_t* out, const Q* q, size_t n) {
    static_assert(sizeof(Q) == 2);
    if constexpr (kLittleEndianHost) {
        std::memcpy(out, q, n * sizeof(Q));
    } else {
        for (size_t i = 0; i < n; ++i) {
            out[2 * i] = static_cast<uint8_t>(q[i]);
            out[2 * i + 1] = static_cast<uint8_t>(q[i] >> 8);
        }
    }
}

template <class Q>
PCCL_QUANT_INLINE void load_values(Q* q, const uint8_t* in, size_t n) {
    static_assert(sizeof(Q) == 2);
    if constexpr (kLittleEndianHost) {
        std::memcpy(q, in, n * sizeof(Q));
    } else {
        for (size_t i = 0; i < n; ++i) q[i] = static_cast<Q>(in[2 * i] | (in[2 * i + 1] << 8));
    }
}

// The values follow the parameters of all blocks.
uint8_t* values_of(uint8_t* wire, size_t n) { return wire + block_count(n) * kParamBytesPerBlock; }
const uint8_t* values_of(const uint8_t* wire, size_t n) { return wire + block_count(n) * kParamBytesPerBlock; }

// The parameters of the block that starts at element `off`.
template <class Byte>
Byte* params_at(Byte* wire, size_t off) { return wire + (off / kBlockElements) * kParamBytesPerBlock; }

// ---- float32 parameters rounded in a chosen direction (scalar, once per block) -----------------

float next_up(float f) {  // f is neither NaN nor +inf
    if (f == 0.0f) return std::numeric_limits<float>::denorm_min();
    const uint32_t bits = std::bit_cast<uint32_t>(f);
    return std::bit_cast<float>(f > 0.0f ? bits + 1 : bits - 1);
}

// The smallest float32 >= d (+inf when d exceeds float32's range).
float f32_at_least(double d) {
    const float f = static_cast<float>(d);
    return static_cast<double>(f) < d ? next_up(f) : f;
}

// The largest float32 <= d (-inf when d is below float32's range).
float f32_at_most(double d) { return -f32_at_least(-d); }

// The smallest float32 >= s (s >= 0) with at most `bits` significant bits: then q * s is exact for
// every integer q of kFloatSignificandBits - bits bits, whatever the compiler fuses.
float round_up_significand(float s, int bits) {
    const uint32_t dropped = (1u << (kFloatSignificandBits - bits)) - 1u;
    uint32_t u = std::bit_cast<uint32_t>(s);
    if ((u & dropped) != 0) u = (u | dropped) + 1u;  // a carry into the exponent is still correct
    return std::bit_cast<float>(u);
}

template <class C> constexpr double kComputeMax = static_cast<double>(std::numeric_limits<C>::max());

// ---- per-block parameters ----------------------------------------------------------------------

template <class C> struct Extent {
    C lo;
    C hi;
    bool finite;  // no NaN or +-Inf in the block
};

// Floats ordered as signed integers: flipping the magnitude bits of negative values makes integer
// order match float order (-NaN < -Inf < ... < -0 < +0 < ... < +Inf < +NaN). The scan is then an
// integer min/max reduction, which vectorises (a float one needs -ffast-math), and comparing the
// extremes with the keys of +-Inf also catches every NaN. The mapping is its own inverse.
template <class C> using OrderKey = std::conditional_t<sizeof(C) == 4, int32_t, int64_t>;

template <class C>
PCCL_QUANT_INLINE OrderKey<C> order_key(OrderKey<C> bits) {
    using K = OrderKey<C>;
    return bits ^ ((bits >> (8 * sizeof(K) - 1)) & std::numeric_limits<K>::max());
}

template <class C>
PCCL_QUANT_INLINE OrderKey<C> order_key_of(C x) { return order_key<C>(std::bit_cast<OrderKey<C>>(x)); }

template <class C>
PCCL_QUANT_INLINE C from_order_key(OrderKey<C> key) { return std::bit_cast<C>(order_key<C>(key)); }

// min, max and finiteness of x[0..n), n >= 1.
template <class C>
PCCL_QUANT_INLINE Extent<C> scan(const C* __restrict x, size_t n) {
    using K = OrderKey<C>;
    K lo = std::numeric_limits<K>::max();
    K hi = std::numeric_limits<K>::min();
    for (size_t i = 0; i < n; ++i) {
        const K key = order_key_of(x[i]);
        lo = key < lo ? key : lo;
        hi = key > hi ? key : hi;
    }
    const bool finite = lo > order_key_of(-std::numeric_limits<C>::infinity()) &&
                        hi < order_key_of(std::numeric_limits<C>::infinity());
    return {from_order_key<C>(lo), from_order_key<C>(hi), finite};
}

// How a block's elements become integers: q = round(clamp((x - offset) * inverse, lo, hi)) + zero_point.
// A multiply, not a divide, keeps the loop well under memory speed; the reciprocal's rounding moves a
// value across a rounding boundary only when it lies within ~2^-23 * q of it (error: scale/2 + tiny).
template <class C> struct Encoder {
    C offset;
    C inverse;
    C lo;
    C hi;
    int32_t zero_point;
};

// What the builders below decide for one block: the parameters sent and how to encode its values.
template <class C> struct Block {
    Params params;
    Encoder<C> encoder;
};

template <class C>
Block<C> non_finite_block() {
    return {nan_params(), {C(0), C(0), C(0), C(0), 0}};
}

// The smallest scale of a float32-computed block, so that 1 / scale is finite. It only coarsens blocks
// whose whole range is below qmax * 2^-126 (about 3e-36 for 8 bits). DOUBLE computes 1 / scale in
// double, where every float32 scale has a finite inverse.
template <class C> constexpr float kMinScale = std::is_same_v<C, float> ? std::numeric_limits<float>::min() : 0.0f;

// The scale of a block spanning `span` > 0 over `steps` integers: rounded up (the grid covers the
// block), at least kMinScale, with few enough significant bits that q * scale is exact.
template <class C, class Q>
float grid_scale(double span, double steps) {
    const float scale = std::max(f32_at_least(span / steps), kMinScale<C>);
    return round_up_significand(scale, kFloatSignificandBits - WireRange<Q>::kBits);
}

template <class C, class Q>
Block<C> min_max_block(const Extent<C>& e) {
    using R = WireRange<Q>;
    static_assert(R::kMin == 0, "MIN_MAX quantises to unsigned wire types");
    const float lo = f32_at_most(e.lo);  // exact for float32 sources
    const double span = static_cast<double>(e.hi) - static_cast<double>(lo);
    // A constant block keeps scale 0 and q 0: it dequantises to exactly lo.
    const float scale = span > 0.0 ? grid_scale<C, Q>(span, R::kMax) : 0.0f;
    // Every product q * scale and every grid point min + q * scale must be finite in the compute type.
    const double top_step = R::kMax * static_cast<double>(scale);
    const double top = static_cast<double>(lo) + top_step;
    if (!std::isfinite(lo) || top_step > kComputeMax<C> || top > kComputeMax<C>) return non_finite_block<C>();
    const C inverse = scale == 0.0f ? C(0) : C(1) / C(scale);
    return {{lo, scale}, {C(lo), inverse, C(0), C(R::kMax), 0}};
}

// A constant block c: scale |c| and q - zero_point = +-1 reproduce c exactly; 0 is (0, 0) and q 0.
// The encoder ignores x (inverse 0) and pins q - zero_point with lo == hi.
template <class C, class Q>
Block<C> constant_zero_point_block(double c) {
    using R = WireRange<Q>;
    if (c == 0.0) return {{0.0f, 0.0f}, {C(0), C(0), C(0), C(0), 0}};
    const float scale = static_cast<float>(std::fabs(c));
    if (!std::isfinite(scale)) return non_finite_block<C>();
    const int32_t zero_point = c > 0.0 ? R::kMin : R::kMax;
    const C step = c > 0.0 ? C(1) : C(-1);
    return {{scale, static_cast<float>(zero_point)}, {C(0), C(0), step, step, zero_point}};
}

template <class C, class Q>
Block<C> zero_point_block(const Extent<C>& e) {
    using R = WireRange<Q>;
    if (e.lo == e.hi) return constant_zero_point_block<C, Q>(e.lo);
    constexpr double steps = R::kMax - R::kMin;
    const double lo = std::min(static_cast<double>(e.lo), 0.0);
    const double hi = std::max(static_cast<double>(e.hi), 0.0);
    const float scale = grid_scale<C, Q>(hi - lo, steps);
    // Every grid point (q - zero_point) * scale, |q - zero_point| <= steps, must be finite.
    if (!std::isfinite(scale) || steps * static_cast<double>(scale) > kComputeMax<C>) return non_finite_block<C>();
    const double zp = std::clamp(std::nearbyint(R::kMin - lo / scale), double{R::kMin}, double{R::kMax});
    const int32_t zero_point = static_cast<int32_t>(zp);
    return {{scale, static_cast<float>(zero_point)},
            {C(0), C(1) / C(scale), C(R::kMin - zero_point), C(R::kMax - zero_point), zero_point}};
}

// Not inlined into the cloned span kernels: compiled once, so every CPU picks the same parameters.
template <Algorithm A, class C, class Q>
Block<C> plan_block(const Extent<C>& e) {
    if (!e.finite) return non_finite_block<C>();
    if constexpr (A == Algorithm::MIN_MAX) {
        return min_max_block<C, Q>(e);
    } else {
        return zero_point_block<C, Q>(e);
    }
}

// ---- element loops (branch-free, vectorised) -----------------------------------------------------

// Adding and subtracting 1.5 * 2^(significand bits - 1) rounds to the nearest integer, ties to even,
// for |v| < 2^(significand bits - 2), in plain SSE2 (nearbyint would be a libm call there).
template <class C> constexpr C kRoundingMagic = C(1.5) * C(uint64_t{1} << (std::numeric_limits<C>::digits - 1));

template <class C>
PCCL_QUANT_INLINE C round_even(C v) {
    return (v + kRoundingMagic<C>) - kRoundingMagic<C>;
}

template <class C>
PCCL_QUANT_INLINE C clamp_to(C v, C lo, C hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

// Hides a per-block value from the optimiser. Given constant clamp bounds (0 and 255), GCC threads the
// clamp into branches and byte blends instead of one vector min and max. One volatile access a block.
template <class T>
PCCL_QUANT_INLINE T opaque(T value) {
    volatile T hidden = value;
    return hidden;
}

// The clamp sits between the multiply and the rounding's add, so no FMA contraction can change q.
template <class C, class Q>
PCCL_QUANT_INLINE void encode(const C* __restrict x, size_t n, const Encoder<C>& e, Q* __restrict q) {
    const C offset = e.offset;
    const C inverse = e.inverse;
    const C lo = opaque(e.lo);
    const C hi = opaque(e.hi);
    const int32_t zero_point = e.zero_point;
    for (size_t i = 0; i < n; ++i) {
        const C v = round_even(clamp_to<C>((x[i] - offset) * inverse, lo, hi));
        q[i] = static_cast<Q>(static_cast<int32_t>(v) + zero_point);
    }
}

template <class C, class Q>
PCCL_QUANT_INLINE void dequantize_min_max(const Q* __restrict q, size_t n, const Params& p, C* __restrict out) {
    const C lo = p.first;
    const C scale = p.second;
    for (size_t i = 0; i < n; ++i) out[i] = lo + static_cast<C>(q[i]) * scale;  // the product is exact
}

template <class C, class Q>
PCCL_QUANT_INLINE void dequantize_zero_point(const Q* __restrict q, size_t n, const Params& p, C* __restrict out) {
    const C scale = p.first;
    const C zero_point = p.second;
    for (size_t i = 0; i < n; ++i) out[i] = (static_cast<C>(q[i]) - zero_point) * scale;  // exact difference
}

template <class C>
PCCL_QUANT_INLINE void fill_nan(C* out, size_t n) {
    std::fill(out, out + n, std::numeric_limits<C>::quiet_NaN());
}

// ---- span kernels: a whole number of blocks (the last may be short), one ifunc call each -------

template <class C, class Q, Algorithm A>
PCCL_QUANT_CLONES void quantize_span(const C* x, size_t n, uint8_t* params, uint8_t* values) {
    Q staged[kBlockElements];
    for (size_t off = 0; off < n; off += kBlockElements) {
        const size_t len = std::min(kBlockElements, n - off);
        const Block<C> block = plan_block<A, C, Q>(scan(x + off, len));
        store_params(params_at(params, off), block.params);
        // Bytes go straight to the wire; wider integers (unaligned there) through a stack copy.
        Q* q = staged;
        if constexpr (sizeof(Q) == 1) q = reinterpret_cast<Q*>(values + off);
        if (is_finite(block.params)) {
            encode(x + off, len, block.encoder, q);
        } else {
            std::fill(q, q + len, Q{0});  // NaN would not convert to an integer
        }
        if constexpr (sizeof(Q) != 1) store_values(values + off * sizeof(Q), q, len);
    }
}

// Writes dequant(wire) as C into out[0..n); returns a bit per non-finite block (filled with NaN).
template <class C, class Q, Algorithm A>
PCCL_QUANT_CLONES uint32_t dequantize_span(const uint8_t* params, const uint8_t* values, size_t n, C* out) {
    Q staged[kBlockElements];
    uint32_t non_finite = 0;
    for (size_t off = 0; off < n; off += kBlockElements) {
        const size_t len = std::min(kBlockElements, n - off);
        const size_t block = off / kBlockElements;
        const Params p = load_params(params + block * kParamBytesPerBlock);
        if (!is_finite(p)) {
            fill_nan(out + off, len);
            if (block < 32) non_finite |= 1u << block;
            continue;
        }
        // Bytes are read straight from the wire; wider integers (unaligned there) through a stack copy.
        const Q* q = staged;
        if constexpr (sizeof(Q) == 1) {
            q = reinterpret_cast<const Q*>(values + off);
        } else {
            load_values(staged, values + off * sizeof(Q), len);
        }
        if constexpr (A == Algorithm::MIN_MAX) {
            dequantize_min_max(q, len, p, out + off);
        } else {
            dequantize_zero_point(q, len, p, out + off);
        }
    }
    return non_finite;
}

template <class S>
PCCL_QUANT_CLONES void widen_span_portable(const typename S::Elem* __restrict in, size_t n,
                                           typename S::Compute* __restrict out) {
    for (size_t i = 0; i < n; ++i) out[i] = S::widen(in[i]);
}

template <class S>
PCCL_QUANT_CLONES void narrow_span_portable(const typename S::Compute* __restrict in, size_t n,
                                            typename S::Elem* __restrict out) {
    for (size_t i = 0; i < n; ++i) out[i] = S::narrow(in[i]);
}

#if defined(PCCL_QUANT_F16C)
constexpr size_t kF16cLanes = 8;  // one __m256 of float32, one __m128i of float16

// VCVTPH2PS / VCVTPS2PH (round to nearest even): the same bits as F16Source for every input, NaN
// payloads included, several times faster than any portable loop GCC 12 makes.
__attribute__((target("avx,f16c"))) void widen_f16c(const uint16_t* in, size_t n, float* out) {
    size_t i = 0;
    for (; i + kF16cLanes <= n; i += kF16cLanes) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; ++i) out[i] = f16_bits_to_f32(in[i]);
}

__attribute__((target("avx,f16c"))) void narrow_f16c(const float* in, size_t n, uint16_t* out) {
    size_t i = 0;
    for (; i + kF16cLanes <= n; i += kF16cLanes) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
    }
    for (; i < n; ++i) out[i] = f32_to_f16_bits(in[i]);
}

bool cpu_has_f16c() {
    static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
    return has;
}
#endif

// Source elements -> compute type (halves only; float32 and double are used in place).
template <class S>
void widen_span(const typename S::Elem* in, size_t n, typename S::Compute* out) {
#if defined(PCCL_QUANT_F16C)
    if constexpr (std::is_same_v<S, F16Source>) {
        if (cpu_has_f16c()) return widen_f16c(in, n, out);
    }
#endif
    widen_span_portable<S>(in, n, out);
}

template <class S>
void narrow_span(const typename S::Compute* in, size_t n, typename S::Elem* out) {
#if defined(PCCL_QUANT_F16C)
    if constexpr (std::is_same_v<S, F16Source>) {
        if (cpu_has_f16c()) return narrow_f16c(in, n, out);
    }
#endif
    narrow_span_portable<S>(in, n, out);
}

// The reduce of one hop. SUM_DIVIDE is the owner's AVG; the plain hops of AVG are SUM.
enum class Combine : uint8_t { SUM, SUM_DIVIDE, PROD, MAX, MIN };

template <Combine K, class C>
PCCL_QUANT_INLINE C combine(C a, C b, C divisor) {
    if constexpr (K == Combine::SUM) {
        return a + b;
    } else if constexpr (K == Combine::SUM_DIVIDE) {
        return (a + b) / divisor;
    } else if constexpr (K == Combine::PROD) {
        return a * b;
    } else {  // MAX, MIN: NaN wins, as in reduce.cpp (and numpy's maximum / minimum)
        // Three flat selects, not nested ?: (which GCC turns into jumps next to the float16 code).
        C r = K == Combine::MAX ? (a > b ? a : b) : (a < b ? a : b);
        r = b != b ? b : r;
        return a != a ? a : r;
    }
}

// dst[i] = narrow(combine(deq[i], widen(local[i]))); dst and local do not overlap.
template <class S, Combine K>
PCCL_QUANT_CLONES void combine_span(const typename S::Compute* __restrict deq, const typename S::Elem* __restrict local,
                                    typename S::Elem* __restrict dst, size_t n, typename S::Compute divisor) {
    for (size_t i = 0; i < n; ++i) dst[i] = S::narrow(combine<K>(deq[i], S::widen(local[i]), divisor));
}

// The same in place (dst == local), as a separate loop so that neither needs a runtime alias check.
template <class S, Combine K>
PCCL_QUANT_CLONES void combine_span_in_place(const typename S::Compute* __restrict deq, typename S::Elem* __restrict dst,
                                             size_t n, typename S::Compute divisor) {
    for (size_t i = 0; i < n; ++i) dst[i] = S::narrow(combine<K>(deq[i], S::widen(dst[i]), divisor));
}

// ---- drivers over a whole buffer --------------------------------------------------------------


template <class S, class Q, Algorithm A>
void quantize_all(const typename S::Elem* src, size_t n, uint8_t* wire) {
    using C = typename S::Compute;
    uint8_t* values = values_of(wire, n);
    if constexpr (kComputesInPlace<S>) {
        quantize_span<C, Q, A>(src, n, wire, values);
    } else {
        C staged[kSpanElements];
        for (size_t off = 0; off < n; off += kSpanElements) {
            const size_t len = std::min(kSpanElements, n - off);
            widen_span<S>(src + off, len, staged);
            quantize_span<C, Q, A>(staged, len, params_at(wire, off), values + off * sizeof(Q));
        }
    }
}

template <class S, class Q, Algorithm A>
void dequantize_all(const uint8_t* wire, size_t n, typename S::Elem* dst) {
    using C = typename S::Compute;
    const uint8_t* values = values_of(wire, n);
    if constexpr (kComputesInPlace<S>) {
        dequantize_span<C, Q, A>(wire, values, n, dst);
    } else {
        C staged[kSpanElements];
        for (size_t off = 0; off < n; off += kSpanElements) {
            const size_t len = std::min(kSpanElements, n - off);
            dequantize_span<C, Q, A>(params_at(wire, off), values + off * sizeof(Q), len, staged);
            narrow_span<S>(staged, len, dst + off);
        }
    }
}

// Overwrites the blocks of dst flagged in `non_finite` with canonical NaN, whatever the op made of them.
template <class S>
void poison_blocks(uint32_t non_finite, typename S::Elem* dst, size_t n) {
    using C = typename S::Compute;
    for (size_t block = 0; non_finite != 0; ++block, non_finite >>= 1) {
        if ((non_finite & 1u) == 0) continue;
        const size_t off = block * kBlockElements;
        std::fill(dst + off, dst + std::min(n, off + kBlockElements), S::narrow(std::numeric_limits<C>::quiet_NaN()));
    }
}

// dst = op(deq, local) for one span, converting local and dst on the fly; with F16C, float16 is
// instead widened, reduced in float32 and rounded once by the conversion instructions.
template <class S, Combine K>
void reduce_span(const typename S::Compute* deq, const typename S::Elem* local, typename S::Elem* dst, size_t n,
                 typename S::Compute divisor) {
#if defined(PCCL_QUANT_F16C)
    if constexpr (std::is_same_v<S, F16Source>) {
        if (cpu_has_f16c()) {
            float wide[kSpanElements];
            widen_f16c(local, n, wide);
            combine_span_in_place<F32Source, K>(deq, wide, n, divisor);
            return narrow_f16c(wide, n, dst);
        }
    }
#endif
    if (local == dst) return combine_span_in_place<S, K>(deq, dst, n, divisor);
    combine_span<S, K>(deq, local, dst, n, divisor);
}

template <class S, class Q, Algorithm A, Combine K>
void dequantize_reduce_all(const uint8_t* wire, const typename S::Elem* local, size_t n, typename S::Elem* dst,
                           uint32_t divide_by) {
    using C = typename S::Compute;
    const uint8_t* values = values_of(wire, n);
    const C divisor = static_cast<C>(divide_by == 0 ? 1 : divide_by);
    C deq[kSpanElements];
    for (size_t off = 0; off < n; off += kSpanElements) {
        const size_t len = std::min(kSpanElements, n - off);
        const uint32_t non_finite = dequantize_span<C, Q, A>(params_at(wire, off), values + off * sizeof(Q), len, deq);
        reduce_span<S, K>(deq, local + off, dst + off, len, divisor);
        poison_blocks<S>(non_finite, dst + off, len);
    }
}

template <class S, class Q, Algorithm A>
void dequantize_reduce_op(ReduceOp op, const uint8_t* wire, const void* local, size_t n, void* dst, uint32_t divide_by) {
    using E = typename S::Elem;
    const auto* l = static_cast<const E*>(local);
    auto* d = static_cast<E*>(dst);
    switch (op) {
        case ReduceOp::SUM: return dequantize_reduce_all<S, Q, A, Combine::SUM>(wire, l, n, d, 0);
        case ReduceOp::AVG:
            if (divide_by != 0) return dequantize_reduce_all<S, Q, A, Combine::SUM_DIVIDE>(wire, l, n, d, divide_by);
            return dequantize_reduce_all<S, Q, A, Combine::SUM>(wire, l, n, d, 0);
        case ReduceOp::PROD: return dequantize_reduce_all<S, Q, A, Combine::PROD>(wire, l, n, d, 0);
        case ReduceOp::MAX: return dequantize_reduce_all<S, Q, A, Combine::MAX>(wire, l, n, d, 0);
        case ReduceOp::MIN: return dequantize_reduce_all<S, Q, A, Combine::MIN>(wire, l, n, d, 0);
    }
}

// ---- format dispatch -------------------------------------------------------------------------

// Calls fn.template operator()<Source, Wire, Algorithm>() for a validated format.
template <class S, class Q, class Fn>
void with_algorithm(const Format& f, Fn&& fn) {
    if (f.algorithm == Algorithm::ZERO_POINT_SCALE) return fn.template operator()<S, Q, Algorithm::ZERO_POINT_SCALE>();
    if constexpr (WireRange<Q>::kMin == 0) fn.template operator()<S, Q, Algorithm::MIN_MAX>();
}

template <class S, class Fn>
void with_wire(const Format& f, Fn&& fn) {
    switch (f.wire) {
        case DataType::UINT8: return with_algorithm<S, uint8_t>(f, fn);
        case DataType::INT8: return with_algorithm<S, int8_t>(f, fn);
        case DataType::UINT16: return with_algorithm<S, uint16_t>(f, fn);
        default: return;
    }
}

template <class Fn>
void with_format(const Format& f, Fn&& fn) {
    if (!validate(f).empty()) return;
    switch (f.source) {
        case DataType::FLOAT: return with_wire<F32Source>(f, fn);
        case DataType::DOUBLE: return with_wire<F64Source>(f, fn);
        case DataType::FLOAT16: return with_wire<F16Source>(f, fn);
        case DataType::BFLOAT16: return with_wire<BF16Source>(f, fn);
        default: return;
    }
}

bool is_float(DataType t) {
    return t == DataType::FLOAT || t == DataType::DOUBLE || t == DataType::FLOAT16 || t == DataType::BFLOAT16;
}

std::string type_name(DataType t) {
    if (!is_valid(t)) return "data type " + std::to_string(static_cast<int>(t));
    return std::string(to_string(t));
}

}  // namespace

std::string validate(const Format& f) {
    if (!is_float(f.source)) {
        return "quantization needs a floating-point tensor (float16, bfloat16, float32, float64); got " +
               type_name(f.source);
    }
    switch (f.algorithm) {
        case Algorithm::NONE:
            return "quantization algorithm NONE has no wire format: send the data unquantized";
        case Algorithm::MIN_MAX:
            if (f.wire == DataType::UINT8 || f.wire == DataType::UINT16) return {};
            return "MIN_MAX quantization sends uint8 or uint16; got " + type_name(f.wire);
        case Algorithm::ZERO_POINT_SCALE:
            if (f.wire == DataType::UINT8 || f.wire == DataType::UINT16 || f.wire == DataType::INT8) return {};
            return "ZERO_POINT_SCALE quantization sends uint8, uint16 or int8; got " + type_name(f.wire);
    }
    return "unknown quantization algorithm " + std::to_string(static_cast<int>(f.algorithm)) +
           " (NONE=0, MIN_MAX=1, ZERO_POINT_SCALE=2)";
}

size_t block_count(size_t n) { return (n + kBlockElements - 1) / kBlockElements; }

size_t wire_bytes(const Format& f, size_t n) {
    return block_count(n) * kParamBytesPerBlock + n * element_size(f.wire);
}

void quantize(const Format& f, const void* src, size_t n, uint8_t* wire) {
    if (n == 0) return;
    with_format(f, [&]<class S, class Q, Algorithm A>() {
        quantize_all<S, Q, A>(static_cast<const typename S::Elem*>(src), n, wire);
    });
}

void dequantize(const Format& f, const uint8_t* wire, size_t n, void* dst) {
    if (n == 0) return;
    with_format(f, [&]<class S, class Q, Algorithm A>() {
        dequantize_all<S, Q, A>(wire, n, static_cast<typename S::Elem*>(dst));
    });
}

void dequantize_reduce(const Format& f, ReduceOp op, const uint8_t* wire, const void* local, size_t n, void* dst,
                       uint32_t divide_by) {
    if (n == 0 || !is_valid(op)) return;
    with_format(f, [&]<class S, class Q, Algorithm A>() {
        dequantize_reduce_op<S, Q, A>(op, wire, local, n, dst, divide_by);
    });
}

}  // namespace pccl::kernels::quant
