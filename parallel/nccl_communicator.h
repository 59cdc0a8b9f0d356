// NcclCommunicator: the Communicator engine over NCCL, for CUDA device buffers (built with the
// CUDA backend; nccl_built() says whether this build has it).
//
// The communicator owns a non-blocking CUDA stream. A collective issued with `stream` first
// waits (cudaStreamWaitEvent) for the work already queued on `stream`, runs on the
// communicator's stream, and records a completion event: test() queries it, wait() blocks the
// host until it and makes `stream` wait for it, so compute queued afterwards sees the result.
// kAvg is ncclAvg. NCCL and CUDA errors come back as tandem::Error naming the collective, the
// group and the rank. Every collective is registered with the watchdog while in flight.
//
// create() is collective over `bootstrap`, a host communicator of the same group (the MPI
// group): rank 0 makes the ncclUniqueId and broadcasts it. NCCL allows one rank per GPU.
#pragma once

#include <memory>
#include <string>

#include "parallel/watchdog.h"
#include "runtime/communicator.h"

namespace tandem {

// True when this build has the NCCL engine (the CUDA backend is built).
bool nccl_built();
// "2.28.3", or "" when NCCL is not built in.
std::string nccl_version();

class NcclCommunicator final : public Communicator {
 public:
  static std::unique_ptr<NcclCommunicator> create(Communicator& bootstrap, Device device,
                                                  std::shared_ptr<Watchdog> watchdog);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  Device device() const override { return device_; }

  Collective all_reduce_async(void* buffer, size_t count, DType dtype, ReduceOp op,
                              void* stream = nullptr) override;
  Collective reduce_scatter_async(const void* send, void* recv, size_t recv_count, DType dtype,
                                  ReduceOp op, void* stream = nullptr) override;
  Collective all_gather_async(const void* send, void* recv, size_t send_count, DType dtype,
                              void* stream = nullptr) override;
  Collective broadcast_async(void* buffer, size_t count, DType dtype, int root,
                             void* stream = nullptr) override;
  Collective barrier_async() override;

  struct State;  // ncclComm_t, the stream, kept out of this header

 private:
  NcclCommunicator(std::unique_ptr<State> state, std::string name, Device device, int rank,
                   int size, std::shared_ptr<Watchdog> watchdog);
  template <typename Issue>
  Collective start(const std::string& collective, size_t count, DType dtype, void* stream,
                   Issue issue);

  std::unique_ptr<State> state_;
  std::string name_;
  Device device_;
  int rank_ = 0;
  int size_ = 1;
  std::shared_ptr<Watchdog> watchdog_;
  void* scratch_ = nullptr;  // one float on the device, for the barrier
};

}  // namespace tandem
