// An error as a value: a PCCL result code plus a message that tells the user what happened.
#pragma once

#include <string>
#include <utility>

#include "common/types.hpp"

namespace pccl {

struct Status {
    Result code = Result::SUCCESS;
    std::string message;

    static Status ok() { return {}; }
    static Status error(Result code, std::string message) { return {code, std::move(message)}; }
    bool is_ok() const { return code == Result::SUCCESS; }
};

}  // namespace pccl
