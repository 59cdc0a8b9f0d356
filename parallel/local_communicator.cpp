#include "parallel/local_communicator.h"

#include <cstring>

#include "runtime/error.h"
#if defined(TANDEM_HAVE_CUDA)
#include "kernels/cuda/cuda.h"
#endif

namespace tandem {

void LocalCommunicator::copy(void* dst, const void* src, size_t bytes) const {
  if (dst == src || bytes == 0) return;
  if (device_.is_cpu()) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if defined(TANDEM_HAVE_CUDA)
  cuda::copy(dst, src, bytes, 2);
#else
  throw Error(cat("communicator ", name_, " is on ", device_.str(),
                  ", but this build has no CUDA backend"));
#endif
}

Collective LocalCommunicator::all_reduce_async(void*, size_t, DType dtype, ReduceOp op, void*) {
  require(op != ReduceOp::kAvg || is_floating(dtype), "all_reduce on group ", name_,
          ": averaging needs a floating dtype, not ", dtype_name(dtype));
  return {};
}

Collective LocalCommunicator::reduce_scatter_async(const void* send, void* recv, size_t recv_count,
                                                   DType dtype, ReduceOp op, void*) {
  require(op != ReduceOp::kAvg || is_floating(dtype), "reduce_scatter on group ", name_,
          ": averaging needs a floating dtype, not ", dtype_name(dtype));
  copy(recv, send, recv_count * dtype_size(dtype));
  return {};
}

Collective LocalCommunicator::all_gather_async(const void* send, void* recv, size_t send_count,
                                               DType dtype, void*) {
  copy(recv, send, send_count * dtype_size(dtype));
  return {};
}

Collective LocalCommunicator::broadcast_async(void*, size_t, DType, int root, void*) {
  require(root == 0, "broadcast on group ", name_, ": root ", root, " is outside [0, 1)");
  return {};
}

}  // namespace tandem
