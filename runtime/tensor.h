// Tensor: a typed, strided view into reference-counted device or host memory.
//
// Storage is allocated by `Tensor::empty/zeros` (host memory 64-byte aligned for AVX-512 loads;
// CUDA memory through cudaMalloc when the build has CUDA) and freed when the last view goes.
// Views (`slice`, `view`, `flat_view`) share storage and never copy. Tensors are not thread-safe
// to mutate concurrently; sharing read-only views across threads is fine.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/dtype.h"
#include "runtime/error.h"

namespace tandem {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);
int64_t shape_numel(const Shape& shape);

// Owns one allocation. Host memory is aligned to kHostAlignment bytes and zero-initialised.
class Storage {
 public:
  static constexpr size_t kHostAlignment = 64;
  Storage(size_t bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
};

class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(const Shape& shape, DType dtype = DType::kF32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::kF32, Device device = Device::cpu());

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t size(int dim) const;
  int dim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::cpu(); }
  bool is_contiguous() const;

  void* raw_data() const;
  // Typed pointer; throws if T does not match dtype().
  template <typename T>
  T* data() const;

  // Same elements, new shape (must be contiguous; one dim may be -1).
  Tensor view(const Shape& shape) const;
  // Elements [start, end) along dim, sharing storage.
  Tensor slice(int dim, int64_t start, int64_t end) const;
  // A contiguous tensor's elements [offset, offset + numel(shape)) reshaped to `shape`.
  Tensor flat_view(int64_t offset, const Shape& shape) const;

  Tensor contiguous() const;  // self if already contiguous, else a packed copy
  Tensor clone() const;       // always a new packed copy
  Tensor to(Device device) const;
  Tensor to_dtype(DType dtype) const;  // floating conversions on the CPU
  // Host memory to fill for this tensor: itself on the CPU, else a new host tensor of the same
  // shape and dtype. Fill it, then copy_from it (a no-op when it is this tensor).
  Tensor host_mirror() const;
  void copy_from(const Tensor& src);  // same shape and dtype; any devices
  void fill(float value);             // F32 only
  void zero();

 private:
  std::shared_ptr<Storage> storage_;
  int64_t offset_ = 0;  // in elements
  Shape shape_;
  Shape strides_;
  DType dtype_ = DType::kF32;
};

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<int32_t> {
  static constexpr DType value = DType::kI32;
};
template <>
struct DTypeOf<int64_t> {
  static constexpr DType value = DType::kI64;
};
template <>
struct DTypeOf<uint16_t> {
  static constexpr DType value = DType::kU16;
};

template <typename T>
T* Tensor::data() const {
  if (DTypeOf<T>::value != dtype_ && !(sizeof(T) == 2 && dtype_size(dtype_) == 2)) {
    throw Error(cat("tensor has dtype ", dtype_name(dtype_), ", accessed as ",
                    dtype_name(DTypeOf<T>::value)));
  }
  return static_cast<T*>(raw_data());
}

}  // namespace tandem
