// Reading an IceKNNAttention node for the kernel: attributes once per kernel, inputs
// once per call. Shared by the ORT binding only.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_problem.h"
#include "contract.h"

namespace ice {

// A user-facing problem with the inputs or attributes (becomes ORT_INVALID_ARGUMENT).
struct InvalidArgument : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The prefix of every message the op returns.
inline std::string where() { return std::string(kOpType) + ": "; }

// The node's attributes (a missing one takes the contract's default; a wrong type is an error).
AttentionParams read_params(const OrtApi& api, const OrtKernelInfo* info);

// Q, K, V and the optional mask of one call, checked against each other; Y unset.
AttentionProblem read_problem(Ort::KernelContext& ctx, const AttentionParams& params);

// key_lengths [B] (int32 or int64), each in [0, Sk]; empty when the input is absent.
std::vector<int64_t> read_key_lengths(Ort::KernelContext& ctx, const AttentionShape& sh);

}  // namespace ice
