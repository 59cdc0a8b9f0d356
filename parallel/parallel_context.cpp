#include "parallel/parallel_context.h"

#include <algorithm>
#include <cstdlib>
#include <thread>

#include "parallel/local_communicator.h"
#include "parallel/mpi_communicator.h"
#include "parallel/nccl_communicator.h"
#include "runtime/error.h"

namespace tandem {

int local_ranks_on_node() {
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  return local ? std::max(1, std::atoi(local)) : 1;
}

int default_threads_per_rank() {
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / local_ranks_on_node());
}

ParallelContext::~ParallelContext() = default;

std::unique_ptr<ParallelContext> ParallelContext::create(const ParallelOptions& options) {
  std::unique_ptr<ParallelContext> ctx(new ParallelContext());
  if (!launched_under_mpi()) {
    ctx->mesh_ = ProcessMesh::create(1, 1);
    require(options.tp == 1, "parallel.tp = ", options.tp,
            " needs that many ranks: start the job with mpirun -np <dp * tp>");
    ctx->watchdog_ = std::make_shared<Watchdog>(0, options.timeout_s, nullptr);
    ctx->world_ = std::make_unique<LocalCommunicator>("world");
    ctx->dp_ = std::make_unique<LocalCommunicator>("dp");
    ctx->tp_ = std::make_unique<LocalCommunicator>("tp");
    if (!options.device.is_cpu()) {
      ctx->dp_device_ = std::make_unique<LocalCommunicator>("dp", options.device);
    }
    return ctx;
  }
  mpi_initialize();
  const int world_rank = mpi_world_rank(), world_size = mpi_world_size();
  ctx->rank_ = world_rank;
  ctx->mesh_ = ProcessMesh::create(world_size, options.tp);
  ctx->watchdog_ = std::make_shared<Watchdog>(world_rank, options.timeout_s,
                                              [](const std::string&) { mpi_abort_job("", 3); });
  auto world = MpiCommunicator::world(ctx->watchdog_);
  const ProcessMesh& m = ctx->mesh_;
  ctx->dp_ = world->split(m.tp_rank(world_rank), m.dp_rank(world_rank), "dp");
  ctx->tp_ = world->split(m.dp_rank(world_rank), m.tp_rank(world_rank), "tp");
  if (!options.device.is_cpu()) {
#if defined(TANDEM_HAVE_CUDA)
    ctx->dp_device_ = NcclCommunicator::create(*ctx->dp_, options.device, ctx->watchdog_);
#else
    throw Error(cat("train.device = ", options.device.str(),
                    ", but this build has no CUDA backend (and no NCCL)"));
#endif
  }
  ctx->world_ = std::move(world);
  return ctx;
}

}  // namespace tandem
