// Reading one IceKNNAttention node: its attributes into AttentionParams, a call's
// inputs into an AttentionProblem, with every shape, type and value check the
// contract asks for (failures are InvalidArgument, with the shapes in the message).
#include "ort_inputs.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "contract.h"

namespace ice {
namespace {

// --- attributes ------------------------------------------------------------------

// A failed attribute read: the node does not set it (ORT's "No attribute with name"),
// or sets it with another type, which is the caller's error, never a silent default.
bool attribute_absent(const OrtApi& api, OrtStatus* status, const char* name, const char* type) {
  const std::string message = api.GetErrorMessage(status);
  api.ReleaseStatus(status);
  if (message.find("No attribute") != std::string::npos) return true;
  throw InvalidArgument(where() + "attribute '" + name + "' must be " + type);
}

// An attribute's value, or `fallback` when the node does not set it.
template <typename T>
T attribute_or(const OrtApi& api, const OrtKernelInfo* info, const char* name, T fallback);

// A number through the API's getter for its type.
template <typename T, auto Get>
T number_or(const OrtApi& api, const OrtKernelInfo* info, const char* name, T fallback, const char* type) {
  T value{};
  OrtStatus* status = (api.*Get)(info, name, &value);
  if (status == nullptr) return value;
  attribute_absent(api, status, name, type);
  return fallback;
}

template <>
int64_t attribute_or(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t fallback) {
  return number_or<int64_t, &OrtApi::KernelInfoGetAttribute_int64>(api, info, name, fallback, "an int");
}

template <>
float attribute_or(const OrtApi& api, const OrtKernelInfo* info, const char* name, float fallback) {
  return number_or<float, &OrtApi::KernelInfoGetAttribute_float>(api, info, name, fallback, "a float");
}

template <>
std::string attribute_or(const OrtApi& api, const OrtKernelInfo* info, const char* name, std::string fallback) {
  size_t size = 0;
  OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (status != nullptr) {
    attribute_absent(api, status, name, "a string");
    return fallback;
  }
  std::string value(size, '\0');
  status = api.KernelInfoGetAttribute_string(info, name, value.data(), &size);
  if (status != nullptr) {
    attribute_absent(api, status, name, "a string");
    return fallback;
  }
  value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return value;
}

}  // namespace

AttentionParams read_params(const OrtApi& api, const OrtKernelInfo* info) {
  AttentionParams d;  // the defaults
  AttentionParams p;
  p.scale = attribute_or(api, info, attr::kScale, d.scale);
  p.causal = attribute_or<int64_t>(api, info, attr::kIsCausal, d.causal) != 0;
  p.softcap = attribute_or(api, info, attr::kSoftcap, d.softcap);
  p.sliding_window = attribute_or(api, info, attr::kSlidingWindow, d.sliding_window);
  p.empty_rows = attribute_or(api, info, attr::kEmptyRows, d.empty_rows);
  p.top_k = attribute_or(api, info, attr::kTopK, d.top_k);
  p.exact_below = attribute_or(api, info, attr::kExactBelow, d.exact_below);
  p.seed = attribute_or(api, info, attr::kSeed, d.seed);
  p.compensate = attribute_or<int64_t>(api, info, attr::kCompensate, d.compensate) != 0;
  p.index = attribute_or(api, info, attr::kIndex, d.index);
  p.clusters = attribute_or(api, info, attr::kClusters, d.clusters);
  p.kmeans_iters = attribute_or(api, info, attr::kKmeansIters, d.kmeans_iters);
  p.scan_fraction = attribute_or(api, info, attr::kScanFraction, d.scan_fraction);
  p.scan_min = attribute_or(api, info, attr::kScanMin, d.scan_min);
  p.tail_clusters = attribute_or(api, info, attr::kTailClusters, d.tail_clusters);
  p.sinks = attribute_or(api, info, attr::kSinks, d.sinks);
  p.window = attribute_or(api, info, attr::kWindow, d.window);
  p.probe_rows = attribute_or(api, info, attr::kProbeRows, d.probe_rows);
  p.max_error = attribute_or(api, info, attr::kMaxError, d.max_error);
  return p;
}

namespace {

// --- inputs ----------------------------------------------------------------------

std::vector<int64_t> dims_of(const Ort::ConstValue& value) {
  return value.GetTensorTypeAndShapeInfo().GetShape();
}

std::string shape_text(const std::vector<int64_t>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

const float* float_data(const Ort::ConstValue& value, const char* name, const std::vector<int64_t>& dims) {
  if (value.GetTensorTypeAndShapeInfo().GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    throw InvalidArgument(where() + name + " must be float32");
  if (dims.size() != 4)
    throw InvalidArgument(where() + name + " must have rank 4, got shape " + shape_text(dims));
  return value.GetTensorData<float>();
}

// Broadcasts the mask to [B, Hq, Sq, Sk] (numpy rules) as element strides.
MaskView mask_view(const Ort::ConstValue& mask, const AttentionShape& sh) {
  const auto info = mask.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> dims = info.GetShape();
  MaskView view;
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
      view.kind = MaskView::Kind::kBool;
      view.data = mask.GetTensorData<bool>();
      break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      view.kind = MaskView::Kind::kFloat;
      view.data = mask.GetTensorData<float>();
      break;
    default:
      throw InvalidArgument(where() + "attn_mask must be bool or float32");
  }
  if (dims.size() > 4)
    throw InvalidArgument(where() + "attn_mask must have rank <= 4, got shape " + shape_text(dims));
  const int64_t target[4] = {sh.batch, sh.q_heads, sh.q_len, sh.k_len};
  int64_t contiguous = 1;
  for (int axis = 3, m = static_cast<int>(dims.size()) - 1; axis >= 0; --axis, --m) {
    const int64_t size = m >= 0 ? dims[m] : 1;
    if (size != 1 && size != target[axis])
      throw InvalidArgument(where() + "attn_mask of shape " + shape_text(dims) + " does not broadcast to " +
                            shape_text({target[0], target[1], target[2], target[3]}));
    view.stride[axis] = size == 1 ? 0 : contiguous;
    contiguous *= size;
  }
  return view;
}

}  // namespace

AttentionProblem read_problem(Ort::KernelContext& ctx, const AttentionParams& params) {
  const Ort::ConstValue q = ctx.GetInput(kInputQ), k = ctx.GetInput(kInputK), v = ctx.GetInput(kInputV);
  const std::vector<int64_t> qd = dims_of(q), kd = dims_of(k), vd = dims_of(v);
  AttentionProblem p;
  p.q = float_data(q, "Q", qd);
  p.k = float_data(k, "K", kd);
  p.v = float_data(v, "V", vd);
  const std::string shapes = " (Q " + shape_text(qd) + ", K " + shape_text(kd) + ", V " + shape_text(vd) + ")";
  if (kd[0] != qd[0] || vd[0] != qd[0]) throw InvalidArgument(where() + "batch sizes differ" + shapes);
  if (kd[3] != qd[3]) throw InvalidArgument(where() + "Q and K head sizes differ" + shapes);
  if (vd[1] != kd[1]) throw InvalidArgument(where() + "K and V head counts differ" + shapes);
  if (vd[2] != kd[2]) throw InvalidArgument(where() + "K and V sequence lengths differ" + shapes);
  if (kd[1] < 1 || qd[1] % kd[1] != 0)
    throw InvalidArgument(where() + "Q heads must be a multiple of K/V heads" + shapes);
  p.shape = {qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], vd[3]};
  p.kv_capacity = kd[2];
  p.scale = params.scale > 0.0f ? params.scale : 1.0f / std::sqrt(static_cast<float>(std::max<int64_t>(qd[3], 1)));
  p.causal = params.causal;
  p.softcap = params.softcap;
  p.sliding_window = params.sliding_window;
  p.zero_empty_rows = params.empty_rows == kEmptyRowsZero;
  if (ctx.GetInputCount() > static_cast<size_t>(kInputMask)) {
    const Ort::ConstValue mask = ctx.GetInput(kInputMask);
    if (mask) p.mask = mask_view(mask, p.shape);
  }
  return p;
}

std::vector<int64_t> read_key_lengths(Ort::KernelContext& ctx, const AttentionShape& sh) {
  if (ctx.GetInputCount() <= static_cast<size_t>(kInputKeyLengths)) return {};
  const Ort::ConstValue input = ctx.GetInput(kInputKeyLengths);
  if (!input) return {};
  const auto info = input.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> dims = info.GetShape();
  if (dims.size() != 1 || dims[0] != sh.batch)
    throw InvalidArgument(where() + "key_lengths must have shape [" + std::to_string(sh.batch) + "] (the batch), got " +
                          shape_text(dims));
  std::vector<int64_t> lengths(sh.batch);
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
      std::copy_n(input.GetTensorData<int32_t>(), sh.batch, lengths.begin());
      break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
      std::copy_n(input.GetTensorData<int64_t>(), sh.batch, lengths.begin());
      break;
    default:
      throw InvalidArgument(where() + "key_lengths must be int32 or int64");
  }
  for (int64_t b = 0; b < sh.batch; ++b)
    if (lengths[b] < 0 || lengths[b] > sh.k_len)
      throw InvalidArgument(where() + "key_lengths[" + std::to_string(b) + "] = " + std::to_string(lengths[b]) +
                            " is outside [0, " + std::to_string(sh.k_len) + "] (the keys K holds)");
  return lengths;
}

}  // namespace ice
