// ONNX Runtime glue: registers IceKNNAttention (domain ai.iceformer), builds a kernel
// from the node's attributes, and runs each call (ort_inputs.h reads it, attention_call.h
// runs it) on the session's intra-op thread pool. Every failure becomes an OrtStatus;
// nothing throws across the C boundary.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <functional>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_call.h"
#include "contract.h"
#include "index_factory.h"
#include "ort_inputs.h"

namespace ice {
namespace {

// Highest API version the library needs (the headers' own): ORT 1.21 and later.
constexpr uint32_t kApiVersion = 21;
static_assert(kApiVersion <= ORT_API_VERSION, "headers older than the API requested");

// --- threads ---------------------------------------------------------------------

// ORT's ParallelFor takes a C callback: carry the body and the first failure.
struct ParallelJob {
  const std::function<void(int64_t)>* body;
  std::once_flag failed;
  std::exception_ptr error;
};

ParallelFor ort_parallel_for(const Ort::KernelContext& ctx) {
  return [&ctx](int64_t n, const std::function<void(int64_t)>& body) {
    if (n <= 0) return;
    ParallelJob job{&body, {}, nullptr};
    if (n == 1) {
      body(0);
      return;
    }
    ctx.ParallelFor(
        [](void* data, size_t i) {
          auto* job = static_cast<ParallelJob*>(data);
          try {
            (*job->body)(static_cast<int64_t>(i));
          } catch (...) {
            std::call_once(job->failed, [job] { job->error = std::current_exception(); });
          }
        },
        static_cast<size_t>(n), 0, &job);
    if (job.error) std::rethrow_exception(job.error);
  };
}

// --- the kernel and the op -------------------------------------------------------

struct IceKnnKernel {
  AttentionParams params;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    const OrtApi& api = Ort::GetApi();
    try {
      Ort::KernelContext ctx(context);
      AttentionProblem problem = read_problem(ctx, params);
      const std::vector<int64_t> key_lengths = read_key_lengths(ctx, problem.shape);
      const AttentionShape& sh = problem.shape;
      Ort::UnownedValue y = ctx.GetOutput(0, {sh.batch, sh.q_heads, sh.q_len, sh.v_dim});
      problem.y = y.GetTensorMutableData<float>();
      run_call(problem, key_lengths, params, ort_parallel_for(ctx));
      return nullptr;
    } catch (const InvalidArgument& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), (where() + e.what()).c_str());
    } catch (const std::bad_alloc&) {
      return api.CreateStatus(ORT_FAIL, (where() + "out of memory").c_str());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (where() + e.what()).c_str());
    } catch (...) {
      return api.CreateStatus(ORT_FAIL, (where() + "unknown error").c_str());
    }
  }
};

struct IceKnnOp : Ort::CustomOpBase<IceKnnOp, IceKnnKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      AttentionParams params = read_params(api, info);
      std::string problem = validate(params);
      if (problem.empty()) problem = index_unavailable_reason(params.index);
      if (!problem.empty()) return api.CreateStatus(ORT_INVALID_ARGUMENT, (where() + problem).c_str());
      *kernel = new IceKnnKernel{std::move(params)};
      return nullptr;
    } catch (const InvalidArgument& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (where() + e.what()).c_str());
    }
  }

  const char* GetName() const { return kOpType; }
  size_t GetInputTypeCount() const { return kInputCount; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    // The mask may be bool or float, key_lengths int32 or int64: checked at run time.
    return index >= static_cast<size_t>(kInputMask) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                                                    : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= static_cast<size_t>(kInputMask) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace
}  // namespace ice

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ice::kApiVersion);
  if (api == nullptr) {  // a runtime older than the headers: report it with the oldest API
    const OrtApi* oldest = api_base->GetApi(1);
    return oldest->CreateStatus(ORT_FAIL, "libice_onnx_ops needs ONNX Runtime 1.21 or newer");
  }
  Ort::InitApi(api);
  try {
    // Session options only borrow the op and its domain: one of each for the whole
    // process, shared by every registration (the domain is read-only once built), so
    // registering again and again holds nothing more.
    static ice::IceKnnOp op;
    static Ort::CustomOpDomain domain = [] {
      Ort::CustomOpDomain built(ice::kDomain);
      built.Add(&op);
      return built;
    }();
    Ort::UnownedSessionOptions(options).Add(domain);
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}
