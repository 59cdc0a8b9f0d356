// MpiCommunicator: the Communicator engine over Open MPI, for host buffers.
//
// Collectives are MPI's non-blocking ones (MPI_Iallreduce, MPI_Ireduce_scatter_block,
// MPI_Iallgather, MPI_Ibcast, MPI_Ibarrier). Open MPI progresses them only inside MPI calls: while
// any is in flight, a progress thread (when MPI provides MPI_THREAD_MULTIPLE) enters MPI every
// ~100 us, and Collective::test() progresses them too (the gradient reducer calls it from the
// backward hook). kAvg is a sum followed by a multiply by 1/size() on
// completion (F32). MPI errors come back as tandem::Error naming the collective, the group and
// the rank (the communicators use MPI_ERRORS_RETURN).
//
// Every collective is registered with the shared Watchdog while in flight.
//
// Process-wide context (documented, the one global here): MPI is initialised once per process
// by mpi_initialize() (MPI_THREAD_MULTIPLE requested, so the watchdog thread may call MPI_Abort)
// and finalised at exit. mpi_abort_job() ends every rank of the job.
//
// Test hook: the environment variable TANDEM_TEST_STALL_COLLECTIVE="<rank>:<n>" makes the n-th
// collective (1-based, counted over all groups) that world rank <rank> issues never start: it is
// registered with the watchdog and its handle never completes, as a hung peer would look.
#pragma once

#include <memory>
#include <string>

#include "parallel/watchdog.h"
#include "runtime/communicator.h"

namespace tandem {

// True when this process was started by mpirun/mpiexec (Open MPI or PMIx environment).
bool launched_under_mpi();
// Initialises MPI once (later calls do nothing); MPI_Finalize runs at exit.
void mpi_initialize();
bool mpi_is_initialized();
// Rank and size in MPI_COMM_WORLD (MPI must be initialised).
int mpi_world_rank();
int mpi_world_size();
// "Open MPI v4.1.4, ..." (MPI_Get_library_version), or "" when MPI was not built in.
std::string mpi_library_version();
// Writes `message` (one line, unless empty) to stderr and ends every rank of the job with exit code
// `code` (MPI_Abort on MPI_COMM_WORLD). Without an initialised MPI, exits this process.
[[noreturn]] void mpi_abort_job(const std::string& message, int code = 1);
// For a command's top-level error handler. In a job of several ranks: writes
// "tandem: rank R of N failed: <message>" and aborts every rank (so a failing rank never leaves
// the others hanging in a collective). Otherwise writes "tandem: <message>" and returns `code`.
int report_failure_and_end_job(const std::string& message, int code);

class MpiCommunicator final : public Communicator {
 public:
  // MPI_COMM_WORLD (duplicated), named "world"; initialises MPI. The watchdog watches every
  // collective of this communicator and of the groups split from it.
  static std::unique_ptr<MpiCommunicator> world(std::shared_ptr<Watchdog> watchdog);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  // MPI_Comm_split: ranks passing the same color form one group, ordered by key. Collective
  // over this communicator.
  std::unique_ptr<MpiCommunicator> split(int color, int key, const std::string& name) const;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::cpu(); }
  Watchdog& watchdog() const;

  Collective all_reduce_async(void* buffer, size_t count, DType dtype, ReduceOp op,
                              void* stream = nullptr) override;
  Collective reduce_scatter_async(const void* send, void* recv, size_t recv_count, DType dtype,
                                  ReduceOp op, void* stream = nullptr) override;
  Collective all_gather_async(const void* send, void* recv, size_t send_count, DType dtype,
                              void* stream = nullptr) override;
  Collective broadcast_async(void* buffer, size_t count, DType dtype, int root,
                             void* stream = nullptr) override;
  Collective barrier_async() override;

  struct Shared;  // watchdog, stall hook, world rank (shared by a world and its splits)

 private:
  struct Handle;  // MPI_Comm, kept out of this header
  MpiCommunicator(std::unique_ptr<Handle> comm, std::string name, std::shared_ptr<Shared> shared);

  std::unique_ptr<Handle> comm_;
  std::string name_;
  std::shared_ptr<Shared> shared_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace tandem
