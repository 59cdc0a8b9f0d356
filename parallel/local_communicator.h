// LocalCommunicator: a group of one rank, so a single-process run takes the same code path as a
// distributed one. all_reduce and broadcast leave the buffer as it is (the sum and the mean over
// one rank are the value itself); reduce_scatter and all_gather copy send to recv unless they are
// the same memory. Buffers live on device() (host, or a CUDA device: copies are device copies).
// Collectives complete before the call returns.
#pragma once

#include <string>

#include "runtime/communicator.h"

namespace tandem {

class LocalCommunicator final : public Communicator {
 public:
  explicit LocalCommunicator(std::string name = "world", Device device = Device::cpu())
      : name_(std::move(name)), device_(device) {}

  int rank() const override { return 0; }
  int size() const override { return 1; }
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
  Collective barrier_async() override { return {}; }

 private:
  void copy(void* dst, const void* src, size_t bytes) const;
  std::string name_;
  Device device_;
};

}  // namespace tandem
