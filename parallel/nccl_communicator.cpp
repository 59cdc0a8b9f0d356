#include "parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>

#include "runtime/error.h"

namespace tandem {

bool nccl_built() {
  return true;
}

std::string nccl_version() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "";
  // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
  return cat(v / 10000, ".", (v / 100) % 100, ".", v % 100);
}

struct NcclCommunicator::State {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
};

namespace {

ncclDataType_t nccl_type(DType dtype, const std::string& what) {
  switch (dtype) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kF16:
      return ncclFloat16;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    case DType::kU16:
      break;
  }
  throw Error(cat(what, ": NCCL has no ", dtype_name(dtype), " type"));
}

void check_cuda(cudaError_t code, const std::string& what, int rank) {
  if (code != cudaSuccess) {
    throw Error(cat(what, " failed at rank ", rank, ": CUDA error ", cudaGetErrorString(code)));
  }
}

void check_nccl(ncclResult_t code, const std::string& what, int rank, ncclComm_t comm) {
  if (code == ncclSuccess) return;
  const char* detail = comm ? ncclGetLastError(comm) : nullptr;
  throw Error(cat(what, " failed at rank ", rank, ": NCCL error ", ncclGetErrorString(code),
                  detail && *detail ? cat(" (", detail, ")") : std::string()));
}

class NcclPending final : public PendingCollective {
 public:
  NcclPending(std::string what, int rank, cudaEvent_t done, cudaStream_t caller,
              std::shared_ptr<Watchdog> watchdog, uint64_t watch_id)
      : what_(std::move(what)),
        rank_(rank),
        done_(done),
        caller_(caller),
        watchdog_(std::move(watchdog)),
        watch_id_(watch_id) {}
  ~NcclPending() override {
    if (done_) cudaEventDestroy(done_);
    if (watch_id_) watchdog_->end(watch_id_);
  }

  bool test() override {
    const cudaError_t code = cudaEventQuery(done_);
    if (code == cudaErrorNotReady) return false;
    check_cuda(code, what_, rank_);
    complete();
    return true;
  }
  void wait() override {
    check_cuda(cudaEventSynchronize(done_), what_, rank_);
    complete();
  }

 private:
  void complete() {
    check_cuda(cudaStreamWaitEvent(caller_, done_, 0), what_, rank_);
    watchdog_->end(watch_id_);
    watch_id_ = 0;
  }
  std::string what_;
  int rank_;
  cudaEvent_t done_;
  cudaStream_t caller_;
  std::shared_ptr<Watchdog> watchdog_;
  uint64_t watch_id_;
};

}  // namespace

NcclCommunicator::NcclCommunicator(std::unique_ptr<State> state, std::string name, Device device,
                                   int rank, int size, std::shared_ptr<Watchdog> watchdog)
    : state_(std::move(state)),
      name_(std::move(name)),
      device_(device),
      rank_(rank),
      size_(size),
      watchdog_(std::move(watchdog)) {}

NcclCommunicator::~NcclCommunicator() {
  if (scratch_) cudaFree(scratch_);
  if (state_->comm) ncclCommDestroy(state_->comm);
  if (state_->stream) cudaStreamDestroy(state_->stream);
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::create(Communicator& bootstrap, Device device,
                                                           std::shared_ptr<Watchdog> watchdog) {
  const std::string what = cat("NCCL communicator for group ", bootstrap.name());
  require(!device.is_cpu(), what, ": needs a CUDA device, got ", device.str());
  require(bootstrap.device().is_cpu(), what, ": the bootstrap group must use host buffers");
  const int rank = bootstrap.rank();
  check_cuda(cudaSetDevice(device.index), what, rank);
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (rank == 0) check_nccl(ncclGetUniqueId(&id), what, rank, nullptr);
  static_assert(sizeof(id) % sizeof(int32_t) == 0);
  bootstrap.broadcast(&id, sizeof(id) / sizeof(int32_t), DType::kI32, 0);
  auto state = std::make_unique<State>();
  check_cuda(cudaStreamCreateWithFlags(&state->stream, cudaStreamNonBlocking), what, rank);
  check_nccl(ncclCommInitRank(&state->comm, bootstrap.size(), id, rank), what, rank, nullptr);
  auto comm = std::unique_ptr<NcclCommunicator>(new NcclCommunicator(
      std::move(state), bootstrap.name(), device, rank, bootstrap.size(), std::move(watchdog)));
  check_cuda(cudaMalloc(&comm->scratch_, sizeof(float)), what, rank);
  check_cuda(cudaMemset(comm->scratch_, 0, sizeof(float)), what, rank);
  return comm;
}

template <typename Issue>
Collective NcclCommunicator::start(const std::string& collective, size_t count, DType dtype,
                                   void* stream, Issue issue) {
  const std::string what =
      cat(collective, " on group ", name_, " (", count, " x ", dtype_name(dtype), ", NCCL)");
  auto caller = static_cast<cudaStream_t>(stream);
  cudaEvent_t ready = nullptr, done = nullptr;
  check_cuda(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), what, rank_);
  check_cuda(cudaEventRecord(ready, caller), what, rank_);
  check_cuda(cudaStreamWaitEvent(state_->stream, ready, 0), what, rank_);
  cudaEventDestroy(ready);  // the wait above is already queued
  const uint64_t id = watchdog_->begin(what);
  try {
    check_nccl(issue(state_->comm, state_->stream), what, rank_, state_->comm);
    check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), what, rank_);
    check_cuda(cudaEventRecord(done, state_->stream), what, rank_);
  } catch (...) {
    watchdog_->end(id);
    if (done) cudaEventDestroy(done);
    throw;
  }
  auto pending = std::make_unique<NcclPending>(what, rank_, done, caller, watchdog_, id);
  return Collective(std::move(pending));
}

Collective NcclCommunicator::all_reduce_async(void* buffer, size_t count, DType dtype, ReduceOp op,
                                              void* stream) {
  const ncclDataType_t t = nccl_type(dtype, "all_reduce");
  return start(op == ReduceOp::kAvg ? "all_reduce(avg)" : "all_reduce(sum)", count, dtype, stream,
               [&](ncclComm_t c, cudaStream_t s) {
                 return ncclAllReduce(buffer, buffer, count, t,
                                      op == ReduceOp::kAvg ? ncclAvg : ncclSum, c, s);
               });
}

Collective NcclCommunicator::reduce_scatter_async(const void* send, void* recv, size_t recv_count,
                                                  DType dtype, ReduceOp op, void* stream) {
  const ncclDataType_t t = nccl_type(dtype, "reduce_scatter");
  return start(op == ReduceOp::kAvg ? "reduce_scatter(avg)" : "reduce_scatter(sum)", recv_count,
               dtype, stream, [&](ncclComm_t c, cudaStream_t s) {
                 return ncclReduceScatter(send, recv, recv_count, t,
                                          op == ReduceOp::kAvg ? ncclAvg : ncclSum, c, s);
               });
}

Collective NcclCommunicator::all_gather_async(const void* send, void* recv, size_t send_count,
                                              DType dtype, void* stream) {
  const ncclDataType_t t = nccl_type(dtype, "all_gather");
  return start("all_gather", send_count, dtype, stream, [&](ncclComm_t c, cudaStream_t s) {
    return ncclAllGather(send, recv, send_count, t, c, s);
  });
}

Collective NcclCommunicator::broadcast_async(void* buffer, size_t count, DType dtype, int root,
                                             void* stream) {
  require(root >= 0 && root < size_, "broadcast on group ", name_, ": root ", root,
          " is outside [0, ", size_, ")");
  const ncclDataType_t t = nccl_type(dtype, "broadcast");
  return start(cat("broadcast(root ", root, ")"), count, dtype, stream,
               [&](ncclComm_t c, cudaStream_t s) {
                 return ncclBroadcast(buffer, buffer, count, t, root, c, s);
               });
}

Collective NcclCommunicator::barrier_async() {
  // NCCL has no barrier: an all-reduce of one float orders every rank behind the others.
  return start("barrier", 1, DType::kF32, nullptr, [&](ncclComm_t c, cudaStream_t s) {
    return ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, c, s);
  });
}

}  // namespace tandem
