// Communicator: the collectives a group of ranks runs together (data- and tensor-parallel).
//
// The interface lives in runtime/ because the model's tensor-parallel layers call it; the engines
// live in parallel/ (MpiCommunicator: host buffers over Open MPI; NcclCommunicator: CUDA device
// buffers; LocalCommunicator: a group of one, so single-process runs take the same code path).
//
// Buffers are raw pointers + element counts + a dtype, like the kernels, on the engine's device()
// (host memory for MPI and Local, device memory for NCCL). `stream` is a cudaStream_t passed as
// void* (null = the legacy default stream); host engines ignore it. A device engine orders the
// collective after the work already queued on `stream` and runs it on its own stream.
//
// Every collective is asynchronous and returns a Collective handle: test() drives progress and
// says whether it finished, wait() blocks until it has. Buffers must stay untouched (not read for
// outputs, not written for inputs) until then. The blocking forms are the async call + wait().
// Every rank of the group must issue the same collectives in the same order with the same counts.
//
// Results: all_reduce kSum and kAvg give bit-identical results on every rank of the group
// (the engines use fixed, rank-independent reduction orders), so replicated parameters stay
// identical. kAvg is defined for floating dtypes only.
//
// Failures (an MPI or NCCL error) throw tandem::Error naming the collective, the group and the
// rank. A collective that does not finish within the watchdog's timeout aborts the job (see
// parallel/watchdog.h). Not thread-safe: one thread issues and completes collectives.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "runtime/dtype.h"

namespace tandem {

enum class ReduceOp { kSum, kAvg };

// One in-flight collective of an engine (engine-specific; see Collective).
class PendingCollective {
 public:
  virtual ~PendingCollective() = default;
  // Drives progress; true once the collective has completed (and its outputs are final).
  virtual bool test() = 0;
  virtual void wait() = 0;
};

// Handle to an asynchronous collective. Move-only; a default-constructed or finished handle is
// done. Destroying an unfinished handle waits for it (a collective is never abandoned halfway).
class Collective {
 public:
  Collective() = default;
  explicit Collective(std::unique_ptr<PendingCollective> pending) : pending_(std::move(pending)) {}
  Collective(Collective&&) noexcept = default;
  Collective& operator=(Collective&& other) noexcept {
    if (this != &other) {
      finish_quietly();
      pending_ = std::move(other.pending_);
    }
    return *this;
  }
  ~Collective() { finish_quietly(); }

  bool test() {
    if (pending_ && pending_->test()) pending_.reset();
    return !pending_;
  }
  void wait() {
    if (pending_) pending_->wait();
    pending_.reset();
  }
  bool done() const { return !pending_; }

 private:
  void finish_quietly() noexcept {
    try {
      wait();
    } catch (...) {
    }
  }
  std::unique_ptr<PendingCollective> pending_;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The group's name in messages ("world", "dp", "tp").
  virtual const std::string& name() const = 0;
  // Where the buffers live: host (Device::cpu()) or a CUDA device.
  virtual Device device() const = 0;

  // In place: buffer[count] becomes the sum (or mean) over the group.
  virtual Collective all_reduce_async(void* buffer, size_t count, DType dtype, ReduceOp op,
                                      void* stream = nullptr) = 0;
  // send[size() * recv_count] summed (or averaged) over the group; rank r receives elements
  // [r * recv_count, (r + 1) * recv_count) into recv[recv_count]. In place when
  // recv == send + rank() * recv_count.
  virtual Collective reduce_scatter_async(const void* send, void* recv, size_t recv_count,
                                          DType dtype, ReduceOp op, void* stream = nullptr) = 0;
  // Every rank's send[send_count] lands at recv + rank * send_count (recv holds
  // size() * send_count). In place when send == recv + rank() * send_count.
  virtual Collective all_gather_async(const void* send, void* recv, size_t send_count, DType dtype,
                                      void* stream = nullptr) = 0;
  // buffer[count] of rank `root` is copied to every rank.
  virtual Collective broadcast_async(void* buffer, size_t count, DType dtype, int root,
                                     void* stream = nullptr) = 0;
  virtual Collective barrier_async() = 0;

  void all_reduce(void* buffer, size_t count, DType dtype, ReduceOp op, void* stream = nullptr) {
    all_reduce_async(buffer, count, dtype, op, stream).wait();
  }
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype, ReduceOp op,
                      void* stream = nullptr) {
    reduce_scatter_async(send, recv, recv_count, dtype, op, stream).wait();
  }
  void all_gather(const void* send, void* recv, size_t send_count, DType dtype,
                  void* stream = nullptr) {
    all_gather_async(send, recv, send_count, dtype, stream).wait();
  }
  void broadcast(void* buffer, size_t count, DType dtype, int root, void* stream = nullptr) {
    broadcast_async(buffer, count, dtype, root, stream).wait();
  }
  void barrier() { barrier_async().wait(); }
};

}  // namespace tandem
