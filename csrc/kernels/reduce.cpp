#include "kernels/reduce.hpp"

#include <cmath>
#include <type_traits>

#include "kernels/half.hpp"

namespace pccl::kernels {
namespace {

struct F16Tag {};
struct BF16Tag {};

template <typename T>
inline T apply_op(ReduceOp op, T a, T b) {
    switch (op) {
        case ReduceOp::SUM:
        case ReduceOp::AVG:
            if constexpr (std::is_integral_v<T>) {
                // Wrap-around arithmetic without signed-overflow UB.
                using U = std::make_unsigned_t<T>;
                return static_cast<T>(static_cast<U>(static_cast<U>(a) + static_cast<U>(b)));
            } else {
                return a + b;
            }
        case ReduceOp::PROD:
            if constexpr (std::is_integral_v<T> && sizeof(T) < sizeof(int)) {
                return static_cast<T>(static_cast<unsigned>(a) * static_cast<unsigned>(b));
            } else if constexpr (std::is_integral_v<T>) {
                using U = std::make_unsigned_t<T>;
                return static_cast<T>(static_cast<U>(a) * static_cast<U>(b));
            } else {
                return a * b;
            }
        case ReduceOp::MAX:
            if constexpr (std::is_floating_point_v<T>) {
                if (a != a) return a;
                if (b != b) return b;
            }
            return a > b ? a : b;
        case ReduceOp::MIN:
            if constexpr (std::is_floating_point_v<T>) {
                if (a != a) return a;
                if (b != b) return b;
            }
            return a < b ? a : b;
    }
    return a;
}

// Two ways to combine the received value with the local one, always as op(received, local):
// INTO: dst holds the received value, src the local one; dst takes the result.
// SWAP: dst holds the local value, src the received one; dst takes the result and src the local
//       value (in place, this saves the input for a restore in the same pass as the reduction).
enum class Mode { INTO, SWAP };
template <typename T, Mode M>
using Other = std::conditional_t<M == Mode::SWAP, T*, const T*>;

// The op is hoisted out of the loop so each loop body is branch-free and vectorises.
template <typename T, ReduceOp Op, Mode M>
void loop(T* __restrict dst, Other<T, M> __restrict src, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if constexpr (M == Mode::SWAP) {
            const T local = dst[i];
            dst[i] = apply_op<T>(Op, src[i], local);
            src[i] = local;
        } else {
            dst[i] = apply_op<T>(Op, dst[i], src[i]);
        }
    }
}

template <typename T, Mode M>
void reduce_native(ReduceOp op, T* dst, Other<T, M> src, size_t n) {
    switch (op) {
        case ReduceOp::SUM:
        case ReduceOp::AVG: return loop<T, ReduceOp::SUM, M>(dst, src, n);
        case ReduceOp::PROD: return loop<T, ReduceOp::PROD, M>(dst, src, n);
        case ReduceOp::MAX: return loop<T, ReduceOp::MAX, M>(dst, src, n);
        case ReduceOp::MIN: return loop<T, ReduceOp::MIN, M>(dst, src, n);
    }
}

template <typename T>
void divide_native(T* dst, size_t n, uint32_t world) {
    if constexpr (std::is_integral_v<T>) {
        using Wide = std::conditional_t<std::is_signed_v<T>, int64_t, uint64_t>;
        const Wide w = static_cast<Wide>(world);
        for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<Wide>(dst[i]) / w);
    } else {
        const T w = static_cast<T>(world);
        for (size_t i = 0; i < n; ++i) dst[i] = dst[i] / w;
    }
}

template <float (*ToF32)(uint16_t), uint16_t (*FromF32)(float), ReduceOp Op, Mode M>
void loop_half(uint16_t* __restrict dst, Other<uint16_t, M> __restrict src, size_t n, float scale) {
    for (size_t i = 0; i < n; ++i) {
        const uint16_t local = M == Mode::SWAP ? dst[i] : src[i];
        const uint16_t received = M == Mode::SWAP ? src[i] : dst[i];
        float v = apply_op<float>(Op, ToF32(received), ToF32(local));
        if (Op == ReduceOp::AVG) v = v / scale;
        dst[i] = FromF32(v);
        if constexpr (M == Mode::SWAP) src[i] = local;
    }
}

template <float (*ToF32)(uint16_t), uint16_t (*FromF32)(float), Mode M>
void reduce_half(ReduceOp op, uint16_t* dst, Other<uint16_t, M> src, size_t n, uint32_t divide_by) {
    const bool divide = op == ReduceOp::AVG && divide_by != 0;
    switch (op) {
        case ReduceOp::SUM: return loop_half<ToF32, FromF32, ReduceOp::SUM, M>(dst, src, n, 1.0f);
        case ReduceOp::AVG:
            if (divide) return loop_half<ToF32, FromF32, ReduceOp::AVG, M>(dst, src, n, static_cast<float>(divide_by));
            return loop_half<ToF32, FromF32, ReduceOp::SUM, M>(dst, src, n, 1.0f);
        case ReduceOp::PROD: return loop_half<ToF32, FromF32, ReduceOp::PROD, M>(dst, src, n, 1.0f);
        case ReduceOp::MAX: return loop_half<ToF32, FromF32, ReduceOp::MAX, M>(dst, src, n, 1.0f);
        case ReduceOp::MIN: return loop_half<ToF32, FromF32, ReduceOp::MIN, M>(dst, src, n, 1.0f);
    }
}

template <typename T, Mode M>
void reduce_typed(ReduceOp op, void* dst, Other<void, M> src, size_t n, uint32_t divide_by) {
    reduce_native<T, M>(op, static_cast<T*>(dst), static_cast<Other<T, M>>(src), n);
    if (op == ReduceOp::AVG && divide_by != 0) divide_native<T>(static_cast<T*>(dst), n, divide_by);
}

// divide_by == 0: plain hop (AVG accumulates as SUM); otherwise AVG divides by it.
template <Mode M>
void dispatch(DataType dtype, ReduceOp op, void* dst, Other<void, M> src, size_t n, uint32_t divide_by) {
    if (n == 0) return;
    switch (dtype) {
        case DataType::UINT8: return reduce_typed<uint8_t, M>(op, dst, src, n, divide_by);
        case DataType::INT8: return reduce_typed<int8_t, M>(op, dst, src, n, divide_by);
        case DataType::UINT16: return reduce_typed<uint16_t, M>(op, dst, src, n, divide_by);
        case DataType::INT16: return reduce_typed<int16_t, M>(op, dst, src, n, divide_by);
        case DataType::UINT32: return reduce_typed<uint32_t, M>(op, dst, src, n, divide_by);
        case DataType::INT32: return reduce_typed<int32_t, M>(op, dst, src, n, divide_by);
        case DataType::UINT64: return reduce_typed<uint64_t, M>(op, dst, src, n, divide_by);
        case DataType::INT64: return reduce_typed<int64_t, M>(op, dst, src, n, divide_by);
        case DataType::FLOAT: return reduce_typed<float, M>(op, dst, src, n, divide_by);
        case DataType::DOUBLE: return reduce_typed<double, M>(op, dst, src, n, divide_by);
        case DataType::FLOAT16:
            return reduce_half<f16_to_f32, f32_to_f16, M>(op, static_cast<uint16_t*>(dst),
                                                          static_cast<Other<uint16_t, M>>(src), n, divide_by);
        case DataType::BFLOAT16:
            return reduce_half<bf16_to_f32, f32_to_bf16, M>(op, static_cast<uint16_t*>(dst),
                                                            static_cast<Other<uint16_t, M>>(src), n, divide_by);
    }
}

}  // namespace

void reduce_into(DataType dtype, ReduceOp op, void* dst, const void* src, size_t n) {
    dispatch<Mode::INTO>(dtype, op, dst, src, n, 0);
}

void reduce_finalize(DataType dtype, ReduceOp op, void* dst, const void* src, size_t n, uint32_t world) {
    dispatch<Mode::INTO>(dtype, op, dst, src, n, world == 0 ? 1 : world);
}

void reduce_swap(DataType dtype, ReduceOp op, void* local, void* received, size_t n, uint32_t world) {
    dispatch<Mode::SWAP>(dtype, op, local, received, n, world);
}

}  // namespace pccl::kernels
