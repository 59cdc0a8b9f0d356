// Element types and devices of tensors, and conversions between floating-point storage formats.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace tandem {

enum class DType : uint8_t { kF32, kBF16, kF16, kI32, kI64, kU16 };

size_t dtype_size(DType dtype);
// Safetensors spelling: "F32", "BF16", "F16", "I32", "I64", "U16".
std::string_view dtype_name(DType dtype);
std::optional<DType> dtype_from_name(std::string_view name);
bool is_floating(DType dtype);

// Converts n elements of a floating type (F32, BF16, F16) to float32; throws on other dtypes.
void convert_to_f32(const void* src, DType src_dtype, size_t n, float* dst);
// Converts n float32 values to F32, BF16 (round to nearest even) or F16.
void convert_from_f32(const float* src, size_t n, void* dst, DType dst_dtype);

enum class DeviceType : uint8_t { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
  static Device cpu() { return {}; }
  static Device cuda(int index = 0) { return {DeviceType::kCUDA, index}; }
  // "cpu", "cuda" or "cuda:N"; throws tandem::Error otherwise.
  static Device parse(std::string_view text);
  bool is_cpu() const { return type == DeviceType::kCPU; }
  bool operator==(const Device&) const = default;
  std::string str() const;
};

// True when this build has the CUDA backend compiled in (TANDEM_CUDA=AUTO found nvcc, or ON).
bool cuda_built();
// Usable CUDA devices at run time: 0 without a CUDA build, a driver or a GPU.
int cuda_device_count();
// Bytes a new allocation on `device` can use now: for the CPU, the smaller of the kernel's
// MemAvailable and what this process's cgroup memory limit leaves; for a GPU, its free memory.
uint64_t available_memory_bytes(Device device);

}  // namespace tandem
