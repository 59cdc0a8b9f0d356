// Safetensors files: an 8-byte little-endian header length N, N bytes of JSON describing each
// tensor ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}),
// then the packed data. https://github.com/huggingface/safetensors
//
// SafetensorsFile::open memory-maps a file read-only and validates everything before any tensor
// is used: header length within the file, JSON well formed, known dtypes, non-negative shapes,
// offsets inside the data section, sizes = numel * dtype size, no overlaps. Every error names the
// file (and the tensor). write_safetensors writes atomically.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace tandem {

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin = 0, end = 0;  // relative to the data section
};

class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const SafetensorsEntry* find(const std::string& name) const;
  const void* data(const SafetensorsEntry& entry) const;
  // Copies a floating tensor into `out` as F32 (converting BF16/F16); checks shape and dtype and
  // throws naming the file and tensor on a mismatch.
  void read_f32(const std::string& name, const Shape& expected_shape, float* out) const;
  // The checks of read_f32 (present, floating, shape) without reading; returns the entry.
  const SafetensorsEntry* check_f32(const std::string& name, const Shape& expected_shape) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const uint8_t* data_section_ = nullptr;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

struct SafetensorsTensor {
  std::string name;
  DType dtype;
  Shape shape;
  const void* data;  // numel * dtype_size bytes, packed
};

void write_safetensors(const std::string& path, const std::vector<SafetensorsTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace tandem
