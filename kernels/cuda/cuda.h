// CUDA backend entry points (built when TANDEM_HAVE_CUDA is defined).
//
// Device memory management and kernels with the same shapes as their CPU twins in
// kernels/cpu/kernels.h. All calls throw std::runtime_error naming the CUDA call that failed.
// Stream arguments are cudaStream_t passed as void* so that CPU-only code can include this header.
#pragma once

#include <cstddef>

namespace tandem::cuda {

// Number of usable CUDA devices; 0 (never an error) when there is no driver or no GPU.
int device_count();
void set_device(int device);
void* malloc_device(size_t bytes);
void free_device(void* ptr) noexcept;
// kind: 0 host->device, 1 device->host, 2 device->device.
void copy(void* dst, const void* src, size_t bytes, int kind);
void synchronize();

// y[i] += alpha * x[i] for device pointers.
void axpy(float* y, const float* x, float alpha, size_t n, void* stream = nullptr);
// x[i] = value for a device pointer.
void fill(float* x, float value, size_t n, void* stream = nullptr);

}  // namespace tandem::cuda
