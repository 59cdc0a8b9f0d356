#include "runtime/dtype.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>

#include "runtime/error.h"
#ifdef TANDEM_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

namespace tandem {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
    case DType::kU16:
      return 2;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kI32:
      return "I32";
    case DType::kI64:
      return "I64";
    case DType::kU16:
      return "U16";
  }
  return "?";
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64, DType::kU16}) {
    if (dtype_name(d) == name) return d;
  }
  return std::nullopt;
}

bool is_floating(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16;
}

namespace {
float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      mantissa &= 0x3ffu;
      bits = sign | (exponent << 23) | (mantissa << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // overflow -> inf
  if (abs < 0x38800000u) {                        // subnormal or zero in f16
    if (abs < 0x33000000u) return sign;           // underflow to zero
    const uint32_t exponent = abs >> 23;
    const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    // The 24-bit mantissa is value * 2^(150 - exponent); f16 subnormals count units of 2^-24,
    // so shift right by 126 - exponent (14..24) and round to nearest even.
    const uint32_t amount = 126u - exponent;
    uint32_t result = mantissa >> amount;
    const uint32_t remainder = mantissa & ((1u << amount) - 1u);
    const uint32_t halfway = 1u << (amount - 1u);
    if (remainder > halfway || (remainder == halfway && (result & 1u))) ++result;
    return static_cast<uint16_t>(sign | result);
  }
  uint32_t result = ((abs - 0x38000000u) >> 13);
  const uint32_t remainder = abs & 0x1fffu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (result & 1u))) ++result;
  return static_cast<uint16_t>(sign | result);
}
}  // namespace

void convert_to_f32(const void* src, DType src_dtype, size_t n, float* dst) {
  switch (src_dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::kF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    default:
      throw Error(cat("cannot convert ", dtype_name(src_dtype), " to F32"));
  }
}

void convert_from_f32(const float* src, size_t n, void* dst, DType dst_dtype) {
  switch (dst_dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::kF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    default:
      throw Error(cat("cannot convert F32 to ", dtype_name(dst_dtype)));
  }
}

Device Device::parse(std::string_view text) {
  if (text == "cpu") return cpu();
  if (text == "cuda") return cuda(0);
  if (text.starts_with("cuda:") && text.size() > 5 && text.size() < 9) {
    int index = 0;
    for (char ch : text.substr(5)) {
      require(ch >= '0' && ch <= '9', "device '", text, "' is not cpu, cuda or cuda:N");
      index = index * 10 + (ch - '0');
    }
    return cuda(index);
  }
  throw Error(cat("device '", text, "' is not cpu, cuda or cuda:N"));
}

std::string Device::str() const {
  return type == DeviceType::kCPU ? std::string("cpu") : cat("cuda:", index);
}

bool cuda_built() {
#ifdef TANDEM_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef TANDEM_HAVE_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

namespace {
// A number from a one-line file (cgroup limits); nullopt when missing or "max".
std::optional<uint64_t> read_number_file(const char* path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text) || text == "max") return std::nullopt;
  try {
    return std::stoull(text);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}
}  // namespace

uint64_t available_memory_bytes(Device device) {
  if (!device.is_cpu()) {
#ifdef TANDEM_HAVE_CUDA
    size_t free_bytes = 0, total_bytes = 0;
    cuda::memory_info(device.index, &free_bytes, &total_bytes);
    return free_bytes;
#else
    throw Error(cat("device ", device.str(), " needs a CUDA build"));
#endif
  }
  uint64_t available = UINT64_MAX;
  std::ifstream meminfo("/proc/meminfo");
  for (std::string key; meminfo >> key;) {
    uint64_t kib = 0;
    std::string unit;
    meminfo >> kib >> unit;
    if (key == "MemAvailable:") available = kib * 1024;
  }
  // cgroup v2, then v1: a container's limit can be far below the machine's free memory.
  const auto limit = read_number_file("/sys/fs/cgroup/memory.max");
  const auto used = read_number_file("/sys/fs/cgroup/memory.current");
  if (limit && used) available = std::min(available, *limit > *used ? *limit - *used : 0);
  const auto limit_v1 = read_number_file("/sys/fs/cgroup/memory/memory.limit_in_bytes");
  const auto used_v1 = read_number_file("/sys/fs/cgroup/memory/memory.usage_in_bytes");
  if (limit_v1 && used_v1 && *limit_v1 < (uint64_t{1} << 60)) {
    available = std::min(available, *limit_v1 > *used_v1 ? *limit_v1 - *used_v1 : 0);
  }
  return available;
}

}  // namespace tandem
