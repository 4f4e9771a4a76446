// Value types shared by every layer: data types, reduce ops and result codes.
// The numeric values travel on the wire and through the Python bindings: never renumber them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace pccl {

enum class DataType : uint8_t {
    UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5,
    UINT64 = 6, INT64 = 7, FLOAT16 = 8, BFLOAT16 = 9, FLOAT = 10, DOUBLE = 11,
};
inline constexpr uint8_t kDataTypeCount = 12;

enum class ReduceOp : uint8_t { SUM = 0, AVG = 1, PROD = 2, MAX = 3, MIN = 4 };
inline constexpr uint8_t kReduceOpCount = 5;

enum class QuantizationAlgorithm : uint8_t { NONE = 0, MIN_MAX = 1, ZERO_POINT_SCALE = 2 };
inline constexpr uint8_t kQuantizationAlgorithmCount = 3;

// PCCL 1.0's numeric result codes; users compare against them.
enum class Result : uint8_t {
    SUCCESS = 0,
    NOT_INITIALIZED = 1,
    INTERNAL_ERROR = 2,
    INVALID_ARGUMENT = 3,
    INVALID_USAGE = 4,
    TOO_FEW_PEERS = 5,
    MASTER_CONNECTION_FAILED = 6,
    RANK_CONNECTION_FAILED = 7,
    RANK_CONNECTION_LOST = 8,
    NO_SHARED_STATE_AVAILABLE = 9,
    PENDING_ASYNC_OPS = 10,
    UPDATE_TOPOLOGY_FAILED = 11,
    TOPOLOGY_OPTIMIZATION_FAILED = 12,
};
inline constexpr uint8_t kResultCount = 13;

enum class Attribute : uint8_t {
    GLOBAL_WORLD_SIZE = 0,
    LOCAL_WORLD_SIZE = 1,
    NUM_DISTINCT_PEER_GROUPS = 2,
    LARGEST_PEER_GROUP_WORLD_SIZE = 3,
};

constexpr size_t element_size(DataType t) {
    switch (t) {
        case DataType::UINT8: case DataType::INT8: return 1;
        case DataType::UINT16: case DataType::INT16: case DataType::FLOAT16: case DataType::BFLOAT16: return 2;
        case DataType::UINT32: case DataType::INT32: case DataType::FLOAT: return 4;
        case DataType::UINT64: case DataType::INT64: case DataType::DOUBLE: return 8;
    }
    return 0;
}

constexpr bool is_valid(DataType t) { return static_cast<uint8_t>(t) < kDataTypeCount; }
constexpr bool is_valid(ReduceOp o) { return static_cast<uint8_t>(o) < kReduceOpCount; }
constexpr bool is_valid(QuantizationAlgorithm a) { return static_cast<uint8_t>(a) < kQuantizationAlgorithmCount; }

std::string_view to_string(DataType t);
std::string_view to_string(ReduceOp o);
std::string_view to_string(Result r);

}  // namespace pccl
