// ice_run: run an ONNX model with the ice-onnx custom-op library registered.
//
//   ice_run LIBRARY MODEL [--threads N] [--out DIR] NAME=FILE.npy ...
//
// Prints every output's name, shape and first values; with --out, also saves each
// output as DIR/NAME.npy. The library path comes from `ice-onnx library-path`.
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <onnxruntime_cxx_api.h>

#include "npy.h"

namespace {

int usage() {
  std::cerr << "usage: ice_run LIBRARY MODEL [--threads N] [--out DIR] NAME=FILE.npy ...\n";
  return 2;
}

void print_summary(const std::string& name, const Ort::Value& value) {
  auto info = value.GetTensorTypeAndShapeInfo();
  std::cout << name << " [";
  const auto shape = info.GetShape();
  for (size_t i = 0; i < shape.size(); ++i) std::cout << (i ? ", " : "") << shape[i];
  std::cout << "]";
  if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    const float* data = value.GetTensorData<float>();
    const size_t n = std::min<size_t>(info.GetElementCount(), 6);
    for (size_t i = 0; i < n; ++i) std::cout << (i ? " " : " : ") << data[i];
  }
  std::cout << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage();
  const std::string library = argv[1], model = argv[2];
  std::string out_dir;
  int threads = 0;
  std::vector<std::string> names;
  std::vector<NpyArray> arrays;
  for (int i = 3; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--out" && i + 1 < argc) {
      out_dir = argv[++i];
    } else if (arg == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (auto eq = arg.find('='); eq != std::string::npos) {
      names.push_back(arg.substr(0, eq));
      arrays.push_back(read_npy(arg.substr(eq + 1)));
    } else {
      return usage();
    }
  }

  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "ice_run");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(threads);
    options.RegisterCustomOpsLibrary(library.c_str());
    Ort::Session session(env, model.c_str(), options);

    auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> inputs;
    std::vector<const char*> input_names;
    for (size_t i = 0; i < arrays.size(); ++i) {
      auto& a = arrays[i];
      inputs.push_back(Ort::Value::CreateTensor(memory, a.bytes.data(), a.bytes.size(), a.shape.data(),
                                                a.shape.size(), a.type));
      input_names.push_back(names[i].c_str());
    }
    Ort::AllocatorWithDefaultOptions allocator;
    std::vector<Ort::AllocatedStringPtr> owned_output_names;
    std::vector<const char*> output_names;
    for (size_t i = 0; i < session.GetOutputCount(); ++i) {
      owned_output_names.push_back(session.GetOutputNameAllocated(i, allocator));
      output_names.push_back(owned_output_names.back().get());
    }

    auto outputs = session.Run(Ort::RunOptions{nullptr}, input_names.data(), inputs.data(), inputs.size(),
                               output_names.data(), output_names.size());
    for (size_t i = 0; i < outputs.size(); ++i) {
      print_summary(output_names[i], outputs[i]);
      if (!out_dir.empty()) write_npy(out_dir + "/" + output_names[i] + ".npy", outputs[i]);
    }
  } catch (const std::exception& e) {
    std::cerr << "ice_run: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
