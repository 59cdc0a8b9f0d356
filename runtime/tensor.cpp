#include "runtime/tensor.h"

#include <cstdlib>
#include <cstring>
#include <new>

#ifdef TANDEM_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

namespace tandem {

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    require(d >= 0, "negative dimension in shape ", shape_str(shape));
    require(!__builtin_mul_overflow(n, d, &n), "shape ", shape_str(shape),
            " has too many elements");
  }
  return n;
}

Storage::Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
  if (device.is_cpu()) {
    require(bytes <= SIZE_MAX - kHostAlignment, "cannot allocate ", bytes, " bytes");
    const size_t rounded = (bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    data_ = std::aligned_alloc(kHostAlignment, rounded == 0 ? kHostAlignment : rounded);
    if (data_ == nullptr) {
      throw Error(cat("out of memory: cannot allocate ", bytes, " bytes (", bytes >> 20,
                      " MiB) of host memory"));
    }
    std::memset(data_, 0, rounded);
  } else {
#ifdef TANDEM_HAVE_CUDA
    cuda::set_device(device.index);
    data_ = cuda::malloc_device(bytes == 0 ? 1 : bytes);
#else
    throw Error("this build of Tandem has no CUDA backend (configure with TANDEM_CUDA=ON)");
#endif
  }
}

Storage::~Storage() {
  if (device_.is_cpu()) {
    std::free(data_);
  } else {
#ifdef TANDEM_HAVE_CUDA
    cuda::free_device(data_);
#endif
  }
}

namespace {
Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}
}  // namespace

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  size_t bytes = 0;
  require(
      !__builtin_mul_overflow(static_cast<size_t>(shape_numel(shape)), dtype_size(dtype), &bytes),
      "shape ", shape_str(shape), " of ", dtype_name(dtype), " is too large");
  Tensor t;
  t.storage_ = std::make_shared<Storage>(bytes, device);
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  if (!device.is_cpu()) t.zero();  // host storage is zeroed on allocation
  return t;
}

int64_t Tensor::size(int dim) const {
  if (dim < 0) dim += this->dim();
  require(dim >= 0 && dim < this->dim(), "dimension ", dim, " out of range for shape ",
          shape_str(shape_));
  return shape_[dim];
}

bool Tensor::is_contiguous() const {
  return strides_ == contiguous_strides(shape_);
}

void* Tensor::raw_data() const {
  if (!storage_) return nullptr;
  return static_cast<char*>(storage_->data()) + offset_ * static_cast<int64_t>(dtype_size(dtype_));
}

Tensor Tensor::view(const Shape& shape) const {
  require(is_contiguous(), "view of a non-contiguous tensor; call contiguous() first");
  Shape resolved = shape;
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < resolved.size(); ++i) {
    if (resolved[i] == -1) {
      require(infer < 0, "view: more than one -1 in ", shape_str(shape));
      infer = static_cast<int>(i);
    } else {
      known *= resolved[i];
    }
  }
  if (infer >= 0) resolved[infer] = known == 0 ? 0 : numel() / known;
  require(shape_numel(resolved) == numel(), "view: cannot view ", shape_str(shape_), " as ",
          shape_str(shape));
  Tensor t = *this;
  t.shape_ = resolved;
  t.strides_ = contiguous_strides(resolved);
  return t;
}

Tensor Tensor::slice(int dim, int64_t start, int64_t end) const {
  if (dim < 0) dim += this->dim();
  require(dim >= 0 && dim < this->dim(), "slice: dimension ", dim, " out of range");
  require(0 <= start && start <= end && end <= shape_[dim], "slice [", start, ", ", end,
          ") out of range for dimension ", dim, " of ", shape_str(shape_));
  Tensor t = *this;
  t.offset_ += start * strides_[dim];
  t.shape_[dim] = end - start;
  return t;
}

Tensor Tensor::flat_view(int64_t offset, const Shape& shape) const {
  require(is_contiguous(), "flat_view of a non-contiguous tensor");
  require(offset >= 0 && offset + shape_numel(shape) <= numel(), "flat_view [", offset, ", +",
          shape_numel(shape), ") out of range for ", numel(), " elements");
  Tensor t = *this;
  t.offset_ += offset;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  return t;
}

Tensor Tensor::contiguous() const {
  return is_contiguous() ? *this : clone();
}

namespace {
// Copies a strided host tensor into packed memory, one innermost row at a time.
void pack_host(const Tensor& src, char* dst) {
  const size_t elem = dtype_size(src.dtype());
  const int nd = src.dim();
  if (nd == 0) {
    std::memcpy(dst, src.raw_data(), elem);
    return;
  }
  const int64_t inner = src.shape()[nd - 1];
  const int64_t inner_stride = src.strides()[nd - 1];
  const int64_t rows = src.numel() / (inner == 0 ? 1 : inner);
  std::vector<int64_t> index(nd, 0);
  const char* base = static_cast<const char*>(src.raw_data());
  for (int64_t r = 0; r < rows && inner > 0; ++r) {
    int64_t offset = 0;
    for (int d = 0; d < nd - 1; ++d) offset += index[d] * src.strides()[d];
    for (int64_t i = 0; i < inner; ++i) {
      std::memcpy(dst, base + (offset + i * inner_stride) * static_cast<int64_t>(elem), elem);
      dst += elem;
    }
    for (int d = nd - 2; d >= 0; --d) {
      if (++index[d] < src.shape()[d]) break;
      index[d] = 0;
    }
  }
}
}  // namespace

Tensor Tensor::clone() const {
  Tensor out = empty(shape_, dtype_, device());
  if (is_contiguous()) {
    out.copy_from(*this);
  } else {
    require(device().is_cpu(), "clone of a non-contiguous device tensor is not supported");
    pack_host(*this, static_cast<char*>(out.raw_data()));
  }
  return out;
}

Tensor Tensor::to(Device device) const {
  if (device == this->device()) return *this;
  Tensor src = contiguous();
  Tensor out = empty(shape_, dtype_, device);
  out.copy_from(src);
  return out;
}

Tensor Tensor::to_dtype(DType dtype) const {
  if (dtype == dtype_) return *this;
  require(device().is_cpu(), "to_dtype runs on CPU tensors");
  Tensor src = contiguous();
  Tensor f32 = dtype_ == DType::kF32 ? src : empty(shape_, DType::kF32);
  if (dtype_ != DType::kF32) convert_to_f32(src.raw_data(), dtype_, numel(), f32.data<float>());
  if (dtype == DType::kF32) return f32;
  Tensor out = empty(shape_, dtype);
  convert_from_f32(f32.data<float>(), numel(), out.raw_data(), dtype);
  return out;
}

Tensor Tensor::host_mirror() const {
  return device().is_cpu() ? *this : empty(shape_, dtype_);
}

void Tensor::copy_from(const Tensor& src) {
  require(src.shape_ == shape_ && src.dtype_ == dtype_, "copy_from: shape/dtype mismatch ",
          shape_str(src.shape_), " ", dtype_name(src.dtype_), " -> ", shape_str(shape_), " ",
          dtype_name(dtype_));
  require(is_contiguous() && src.is_contiguous(), "copy_from needs contiguous tensors");
  const size_t bytes = nbytes();
  if (raw_data() == src.raw_data() && device() == src.device()) return;  // a host mirror of itself
  if (device().is_cpu() && src.device().is_cpu()) {
    std::memcpy(raw_data(), src.raw_data(), bytes);
    return;
  }
#ifdef TANDEM_HAVE_CUDA
  const int kind = src.device().is_cpu() ? 0 : (device().is_cpu() ? 1 : 2);
  cuda::copy(raw_data(), src.raw_data(), bytes, kind);
#else
  throw Error("this build of Tandem has no CUDA backend");
#endif
}

void Tensor::fill(float value) {
  require(dtype_ == DType::kF32, "fill needs an F32 tensor");
  require(is_contiguous(), "fill needs a contiguous tensor");
  if (device().is_cpu()) {
    float* p = data<float>();
    for (int64_t i = 0; i < numel(); ++i) p[i] = value;
    return;
  }
#ifdef TANDEM_HAVE_CUDA
  cuda::fill(data<float>(), value, static_cast<size_t>(numel()));
#endif
}

void Tensor::zero() {
  require(is_contiguous(), "zero needs a contiguous tensor");
  if (device().is_cpu()) {
    std::memset(raw_data(), 0, nbytes());
    return;
  }
#ifdef TANDEM_HAVE_CUDA
  require(dtype_ == DType::kF32, "zero on a device tensor needs F32");
  cuda::fill(data<float>(), 0.0f, static_cast<size_t>(numel()));
#endif
}

}  // namespace tandem
