# Finds the ONNX Runtime C/C++ headers (no pip wheel ships them) and defines the
# INTERFACE target ort::headers. Search order:
#   1. ORT_INCLUDE_DIR (CMake cache variable or environment variable): the folder
#      that holds onnxruntime_c_api.h;
#   2. an installed CMake package `onnxruntime` (e.g. Debian's libonnxruntime-dev);
#   3. the system include path (…/include/onnxruntime/onnxruntime_c_api.h).
# Only headers are used: the library gets the API from ONNX Runtime at load time,
# so it links against no libonnxruntime and loads in any newer runtime.

set(_ort_how_to_get "Install them with `custom_ops/fetch_ort_headers.sh` (Debian: libonnxruntime-dev) \
and/or point ORT_INCLUDE_DIR at the folder containing onnxruntime_c_api.h.")

if(NOT ORT_INCLUDE_DIR AND DEFINED ENV{ORT_INCLUDE_DIR})
  set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}")
endif()

if(ORT_INCLUDE_DIR)
  if(NOT EXISTS "${ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
    message(FATAL_ERROR "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} has no onnxruntime_c_api.h. ${_ort_how_to_get}")
  endif()
  set(_ort_source "ORT_INCLUDE_DIR")
else()
  find_package(onnxruntime CONFIG QUIET)
  if(onnxruntime_FOUND AND TARGET onnxruntime::onnxruntime)
    get_target_property(_ort_dirs onnxruntime::onnxruntime INTERFACE_INCLUDE_DIRECTORIES)
    foreach(_d IN LISTS _ort_dirs)
      foreach(_cand "${_d}" "${_d}/onnxruntime")
        if(NOT ORT_INCLUDE_DIR AND EXISTS "${_cand}/onnxruntime_c_api.h")
          set(ORT_INCLUDE_DIR "${_cand}")
        endif()
      endforeach()
    endforeach()
    set(_ort_source "CMake package onnxruntime")
  endif()
  if(NOT ORT_INCLUDE_DIR)
    find_path(ORT_INCLUDE_DIR onnxruntime_c_api.h PATH_SUFFIXES onnxruntime onnxruntime/core/session)
    set(_ort_source "system include path")
  endif()
endif()

if(NOT ORT_INCLUDE_DIR)
  message(FATAL_ERROR "ONNX Runtime headers not found. ${_ort_how_to_get}")
endif()

file(STRINGS "${ORT_INCLUDE_DIR}/onnxruntime_c_api.h" _ort_api_line REGEX "^#define ORT_API_VERSION [0-9]+")
string(REGEX REPLACE ".* ([0-9]+)$" "\\1" ORT_HEADERS_API_VERSION "${_ort_api_line}")
message(STATUS "ONNX Runtime headers (API ${ORT_HEADERS_API_VERSION}) from ${_ort_source}: ${ORT_INCLUDE_DIR}")

add_library(ort_headers INTERFACE)
target_include_directories(ort_headers SYSTEM INTERFACE "${ORT_INCLUDE_DIR}")
add_library(ort::headers ALIAS ort_headers)
