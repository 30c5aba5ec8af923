// Just enough of the .npy format (version 1/2, little-endian, C order) to feed a
// model's inputs and save its outputs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <onnxruntime_cxx_api.h>

struct NpyArray {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  std::vector<char> bytes;  // shape-product elements of `type`, C order
};

NpyArray read_npy(const std::string& path);  // throws std::runtime_error
void write_npy(const std::string& path, const Ort::Value& tensor);
