// ParallelContext: this process's place in a distributed job, and the groups it talks in.
//
// Under mpirun (launched_under_mpi()) the world is MPI_COMM_WORLD, laid out as a ProcessMesh of
// dp x tp; the dp and tp groups are MPI_Comm_split of the world. A process started without
// mpirun is a world of one with LocalCommunicators, so training takes the same code path.
// Gradients travel on dp_device(): NCCL over the dp group when the model is on a CUDA device
// (CUDA builds), else the host dp group. Small host values (losses, flags, norms) use dp() and
// world(). One Watchdog (parallel.timeout_s) watches every collective of every group; on
// timeout it aborts the whole job.
#pragma once

#include <memory>

#include "parallel/process_mesh.h"
#include "parallel/watchdog.h"
#include "runtime/communicator.h"

namespace tandem {

struct ParallelOptions {
  int tp = 1;
  double timeout_s = 600;
  Device device;  // where the gradients live
};

// The ranks of this job on this node (OMPI_COMM_WORLD_LOCAL_SIZE; 1 without mpirun).
int local_ranks_on_node();
// Threads for one rank when none are asked for under mpirun: the node's cores shared by the
// ranks on it; all the cores without mpirun.
int default_threads_per_rank();

class ParallelContext {
 public:
  // Throws tandem::Error when tp does not divide the world size, or MPI/NCCL fail to start.
  static std::unique_ptr<ParallelContext> create(const ParallelOptions& options);
  ~ParallelContext();

  const ProcessMesh& mesh() const { return mesh_; }
  int rank() const { return rank_; }
  int world_size() const { return mesh_.world_size; }
  int dp_rank() const { return mesh_.dp_rank(rank_); }
  int tp_rank() const { return mesh_.tp_rank(rank_); }
  bool distributed() const { return mesh_.world_size > 1; }

  Communicator& world() { return *world_; }
  Communicator& dp() { return *dp_; }  // host buffers
  Communicator& tp() { return *tp_; }  // host buffers
  Communicator& dp_device() { return dp_device_ ? *dp_device_ : *dp_; }
  Watchdog& watchdog() { return *watchdog_; }

 private:
  ParallelContext() = default;
  ProcessMesh mesh_;
  int rank_ = 0;
  std::shared_ptr<Watchdog> watchdog_;
  std::unique_ptr<Communicator> world_, dp_, tp_, dp_device_;
};

}  // namespace tandem
