#include "common/types.hpp"

namespace pccl {

std::string_view to_string(DataType t) {
    switch (t) {
        case DataType::UINT8: return "uint8";
        case DataType::INT8: return "int8";
        case DataType::UINT16: return "uint16";
        case DataType::INT16: return "int16";
        case DataType::UINT32: return "uint32";
        case DataType::INT32: return "int32";
        case DataType::UINT64: return "uint64";
        case DataType::INT64: return "int64";
        case DataType::FLOAT16: return "float16";
        case DataType::BFLOAT16: return "bfloat16";
        case DataType::FLOAT: return "float32";
        case DataType::DOUBLE: return "float64";
    }
    return "unknown-dtype";
}

std::string_view to_string(ReduceOp o) {
    switch (o) {
        case ReduceOp::SUM: return "SUM";
        case ReduceOp::AVG: return "AVG";
        case ReduceOp::PROD: return "PROD";
        case ReduceOp::MAX: return "MAX";
        case ReduceOp::MIN: return "MIN";
    }
    return "unknown-op";
}

std::string_view to_string(Result r) {
    switch (r) {
        case Result::SUCCESS: return "SUCCESS";
        case Result::NOT_INITIALIZED: return "NOT_INITIALIZED";
        case Result::INTERNAL_ERROR: return "INTERNAL_ERROR";
        case Result::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
        case Result::INVALID_USAGE: return "INVALID_USAGE";
        case Result::TOO_FEW_PEERS: return "TOO_FEW_PEERS";
        case Result::MASTER_CONNECTION_FAILED: return "MASTER_CONNECTION_FAILED";
        case Result::RANK_CONNECTION_FAILED: return "RANK_CONNECTION_FAILED";
        case Result::RANK_CONNECTION_LOST: return "RANK_CONNECTION_LOST";
        case Result::NO_SHARED_STATE_AVAILABLE: return "NO_SHARED_STATE_AVAILABLE";
        case Result::PENDING_ASYNC_OPS: return "PENDING_ASYNC_OPS";
        case Result::UPDATE_TOPOLOGY_FAILED: return "UPDATE_TOPOLOGY_FAILED";
        case Result::TOPOLOGY_OPTIMIZATION_FAILED: return "TOPOLOGY_OPTIMIZATION_FAILED";
    }
    return "UNKNOWN_RESULT";
}

}  // namespace pccl
