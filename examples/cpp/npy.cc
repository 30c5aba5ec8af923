#include "npy.h"

#include <cstring>
#include <fstream>
#include <map>
#include <numeric>
#include <sstream>
#include <stdexcept>

namespace {

struct DType {
  const char* descr;
  ONNXTensorElementDataType type;
  size_t size;
};

const DType kTypes[] = {
    {"<f4", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 4}, {"<i8", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 8},
    {"<i4", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, 4}, {"|b1", ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, 1},
};

const DType& by_descr(const std::string& descr) {
  for (const auto& t : kTypes)
    if (descr == t.descr) return t;
  throw std::runtime_error("unsupported .npy dtype " + descr + " (float32, int64, int32, bool)");
}

const DType& by_type(ONNXTensorElementDataType type) {
  for (const auto& t : kTypes)
    if (type == t.type) return t;
  throw std::runtime_error("cannot save element type " + std::to_string(type) + " as .npy");
}

// The value of 'key': in the header dict, e.g. "'<f4'" or "(2, 3)".
std::string field(const std::string& header, const std::string& key) {
  auto at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("npy header lacks " + key);
  at = header.find(':', at) + 1;
  while (header[at] == ' ') ++at;
  const char close = header[at] == '(' ? ')' : header[at] == '\'' ? '\'' : ',';
  auto end = header.find(close, at + 1);
  return header.substr(at, end - at + 1);
}

}  // namespace

NpyArray read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not a .npy file");
  uint32_t header_len = 0;
  unsigned char len_bytes[4] = {0, 0, 0, 0};
  in.read(reinterpret_cast<char*>(len_bytes), magic[6] == 1 ? 2 : 4);
  for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);

  if (field(header, "fortran_order").rfind("True", 0) == 0) throw std::runtime_error(path + ": Fortran order");
  std::string descr = field(header, "descr");
  const DType& dtype = by_descr(descr.substr(1, descr.size() - 2));

  NpyArray array;
  array.type = dtype.type;
  std::string dims = field(header, "shape");
  std::stringstream ss(dims.substr(1, dims.size() - 2));
  for (std::string item; std::getline(ss, item, ',');)
    if (item.find_first_not_of(' ') != std::string::npos) array.shape.push_back(std::stoll(item));
  const int64_t count = std::accumulate(array.shape.begin(), array.shape.end(), int64_t{1}, std::multiplies<>());
  array.bytes.resize(static_cast<size_t>(count) * dtype.size);
  in.read(array.bytes.data(), static_cast<std::streamsize>(array.bytes.size()));
  if (!in) throw std::runtime_error(path + " is truncated");
  return array;
}

void write_npy(const std::string& path, const Ort::Value& tensor) {
  auto info = tensor.GetTensorTypeAndShapeInfo();
  const DType& dtype = by_type(info.GetElementType());
  std::string shape = "(";
  for (int64_t d : info.GetShape()) shape += std::to_string(d) + ",";
  shape += ")";
  std::string header = "{'descr': '" + std::string(dtype.descr) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header += '\n';

  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  const uint16_t len = static_cast<uint16_t>(header.size());
  const char len_bytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  out.write(len_bytes, 2);
  out << header;
  out.write(static_cast<const char*>(tensor.GetTensorRawData()),
            static_cast<std::streamsize>(info.GetElementCount() * dtype.size));
  if (!out) throw std::runtime_error("cannot write " + path);
}
