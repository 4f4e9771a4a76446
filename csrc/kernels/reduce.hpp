// Element-wise reduction kernels of the ring. Each reduced value is computed exactly once in the
// ring, so these need not be associative for results to be bit-identical across peers.
//
// Semantics: SUM wraps for integers; PROD likewise; MAX/MIN propagate NaN (NaN wins, as numpy's
// maximum/minimum); float16/bfloat16 are computed in float32 and rounded once per hop; AVG is a SUM
// on every hop and divided once by the world size at the chunk's owner (integers truncate toward 0).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/types.hpp"

namespace pccl::kernels {

// dst[i] = op(dst[i], src[i]) for i < n (AVG accumulates as SUM).
void reduce_into(DataType dtype, ReduceOp op, void* dst, const void* src, size_t n);

// As reduce_into, then for AVG divides the result by `world`. Used by a chunk's owner.
void reduce_finalize(DataType dtype, ReduceOp op, void* dst, const void* src, size_t n, uint32_t world);

// In place: `local` holds this peer's input, `received` the bytes that just arrived. Afterwards
// local[i] = op(received[i], local[i]) (world != 0: finalised as reduce_finalize does) and
// received[i] holds the input local[i] had: the copy a restore needs, made in the same pass.
// Results equal reduce_into/reduce_finalize's on the same operands, NaN payloads aside: when both
// operands of a SUM or PROD are NaN, which payload survives is the compiler's and CPU's choice in
// either kernel. Peers still agree bit for bit: each value is computed once and then forwarded.
void reduce_swap(DataType dtype, ReduceOp op, void* local, void* received, size_t n, uint32_t world);

}  // namespace pccl::kernels
