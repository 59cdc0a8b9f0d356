#include "parallel/mpi_communicator.h"

#include <mpi.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include "runtime/error.h"

namespace tandem {

bool launched_under_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMIX_RANK") != nullptr ||
         std::getenv("PMI_RANK") != nullptr;
}

bool mpi_is_initialized() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

int mpi_world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int mpi_world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

void mpi_initialize() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return;
  int provided = 0;
  if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided) != MPI_SUCCESS) {
    throw Error("MPI_Init_thread failed (is this build's Open MPI the one mpirun runs?)");
  }
  std::atexit([] {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  });
}

std::string mpi_library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING];
  int length = 0;
  MPI_Get_library_version(text, &length);
  std::string s(text, static_cast<size_t>(length));
  const size_t cut = s.find_first_of(",\n");  // "Open MPI v4.1.4, package: ..." -> first part
  return cut == std::string::npos ? s : s.substr(0, cut);
}

void mpi_abort_job(const std::string& message, int code) {
  if (!message.empty()) std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  if (mpi_is_initialized()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

int report_failure_and_end_job(const std::string& message, int code) {
  if (mpi_is_initialized() && mpi_world_size() > 1) {
    mpi_abort_job(cat("tandem: rank ", mpi_world_rank(), " of ", mpi_world_size(),
                      " failed: ", message, " (aborting every rank)"),
                  code);
  }
  std::fprintf(stderr, "tandem: %s\n", message.c_str());
  return code;
}

struct MpiCommunicator::Handle {
  MPI_Comm comm = MPI_COMM_NULL;
};

// Open MPI moves a non-blocking collective forward only inside MPI calls. While any is in
// flight, a progress thread makes such a call (MPI_Iprobe on a private communicator, which runs
// the progress engine without touching anyone's requests) every ~100 us, so buckets travel
// while backward computes instead of when the next hook or wait comes. It sleeps otherwise.
// Needs MPI_THREAD_MULTIPLE; without it the callers' test() calls are the only progress.
class ProgressThread {
 public:
  explicit ProgressThread(MPI_Comm world) {
    MPI_Comm_dup(world, &comm_);
    thread_ = std::thread([this] { run(); });
  }
  ~ProgressThread() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    thread_.join();
    if (mpi_is_initialized()) MPI_Comm_free(&comm_);
  }
  void started() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++active_;
    }
    wake_.notify_all();
  }
  void finished() {
    std::lock_guard<std::mutex> lock(mutex_);
    --active_;
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      wake_.wait(lock, [this] { return stop_ || active_ > 0; });
      if (stop_) return;
      lock.unlock();
      int flag = 0;
      MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm_, &flag, MPI_STATUS_IGNORE);
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      lock.lock();
    }
  }
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::mutex mutex_;
  std::condition_variable wake_;
  int active_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

struct MpiCommunicator::Shared {
  std::shared_ptr<Watchdog> watchdog;
  int world_rank = 0;
  long issued = 0;     // collectives issued by this process, for the stall hook
  long stall_at = -1;  // 1-based index of the collective that never starts, -1 = none
  std::unique_ptr<ProgressThread> progress;  // null without MPI_THREAD_MULTIPLE
};

namespace {

MPI_Datatype mpi_type(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return MPI_FLOAT;
    case DType::kI32:
      return MPI_INT32_T;
    case DType::kI64:
      return MPI_INT64_T;
    case DType::kBF16:
    case DType::kF16:
    case DType::kU16:
      return MPI_UINT16_T;
  }
  return MPI_BYTE;
}

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS)
    return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<size_t>(length));
}

class MpiPending final : public PendingCollective {
 public:
  MpiPending(std::string what, int rank, std::shared_ptr<MpiCommunicator::Shared> shared,
             uint64_t watch_id, bool stalled, std::function<void()> on_complete)
      : what_(std::move(what)),
        rank_(rank),
        shared_(std::move(shared)),
        watch_id_(watch_id),
        stalled_(stalled),
        on_complete_(std::move(on_complete)) {}
  MPI_Request* request() { return &request_; }

  bool test() override {
    if (stalled_) return false;
    int flag = 0;
    check(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    if (flag) complete();
    return flag != 0;
  }
  void wait() override {
    while (stalled_) std::this_thread::sleep_for(std::chrono::seconds(1));  // until the watchdog
    check(MPI_Wait(&request_, MPI_STATUS_IGNORE));
    complete();
  }

 private:
  void check(int code) {
    if (code == MPI_SUCCESS) return;
    shared_->watchdog->end(watch_id_);
    if (shared_->progress) shared_->progress->finished();
    throw Error(cat(what_, " failed at rank ", rank_, ": ", mpi_error_text(code)));
  }
  void complete() {
    shared_->watchdog->end(watch_id_);
    if (shared_->progress) shared_->progress->finished();
    if (on_complete_) on_complete_();
  }

  std::string what_;
  int rank_;
  std::shared_ptr<MpiCommunicator::Shared> shared_;
  uint64_t watch_id_;
  bool stalled_;
  std::function<void()> on_complete_;
  MPI_Request request_ = MPI_REQUEST_NULL;
};

// Starts one collective: registers it, applies the stall hook, issues it through `issue`.
template <typename Issue>
Collective start(const std::string& collective, const std::string& group, int rank, size_t count,
                 DType dtype, const std::shared_ptr<MpiCommunicator::Shared>& shared, Issue issue,
                 std::function<void()> on_complete = {}) {
  const std::string what =
      cat(collective, " on group ", group, " (", count, " x ", dtype_name(dtype), ")");
  const uint64_t id = shared->watchdog->begin(what);
  const bool stalled = ++shared->issued == shared->stall_at;
  auto pending =
      std::make_unique<MpiPending>(what, rank, shared, id, stalled, std::move(on_complete));
  if (!stalled) {
    const int code = issue(pending->request());
    if (code == MPI_SUCCESS && shared->progress) shared->progress->started();
    if (code != MPI_SUCCESS) {
      shared->watchdog->end(id);
      throw Error(cat(what, " failed to start at rank ", rank, ": ", mpi_error_text(code)));
    }
  }
  return Collective(std::move(pending));
}

void require_count(size_t count, const char* collective) {
  require(count <= static_cast<size_t>(std::numeric_limits<int>::max()), collective, ": ", count,
          " elements exceed MPI's int count; split the buffer");
}

MPI_Op reduce_op(DType dtype, ReduceOp op, const char* collective) {
  require(dtype == DType::kF32 || dtype == DType::kI32 || dtype == DType::kI64, collective,
          ": MPI reductions take F32, I32 or I64, not ", dtype_name(dtype));
  require(op != ReduceOp::kAvg || dtype == DType::kF32, collective, ": averaging needs F32, not ",
          dtype_name(dtype));
  return MPI_SUM;
}

std::function<void()> scale_on_complete(void* buffer, size_t count, ReduceOp op, int size) {
  if (op != ReduceOp::kAvg || size == 1) return {};
  return [buffer, count, size] {
    float* x = static_cast<float*>(buffer);
    const float s = 1.0f / static_cast<float>(size);
    for (size_t i = 0; i < count; ++i) x[i] *= s;
  };
}

}  // namespace

MpiCommunicator::MpiCommunicator(std::unique_ptr<Handle> comm, std::string name,
                                 std::shared_ptr<Shared> shared)
    : comm_(std::move(comm)), name_(std::move(name)), shared_(std::move(shared)) {
  MPI_Comm_set_errhandler(comm_->comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm_->comm, &rank_);
  MPI_Comm_size(comm_->comm, &size_);
}

Watchdog& MpiCommunicator::watchdog() const {
  return *shared_->watchdog;
}

MpiCommunicator::~MpiCommunicator() {
  if (comm_ && comm_->comm != MPI_COMM_NULL && mpi_is_initialized()) MPI_Comm_free(&comm_->comm);
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::world(std::shared_ptr<Watchdog> watchdog) {
  mpi_initialize();
  auto handle = std::make_unique<Handle>();
  MPI_Comm_dup(MPI_COMM_WORLD, &handle->comm);
  auto shared = std::make_shared<Shared>();
  shared->watchdog = std::move(watchdog);
  MPI_Comm_rank(MPI_COMM_WORLD, &shared->world_rank);
  int thread_level = 0;
  MPI_Query_thread(&thread_level);
  if (thread_level == MPI_THREAD_MULTIPLE) {
    shared->progress = std::make_unique<ProgressThread>(MPI_COMM_WORLD);
  }
  if (const char* stall = std::getenv("TANDEM_TEST_STALL_COLLECTIVE")) {
    int rank = -1;
    long n = -1;
    require(std::sscanf(stall, "%d:%ld", &rank, &n) == 2 && n >= 1,
            "TANDEM_TEST_STALL_COLLECTIVE must be <rank>:<n> (n >= 1), got '", stall, "'");
    if (rank == shared->world_rank) shared->stall_at = n;
  }
  return std::unique_ptr<MpiCommunicator>(
      new MpiCommunicator(std::move(handle), "world", std::move(shared)));
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::split(int color, int key,
                                                        const std::string& name) const {
  auto handle = std::make_unique<Handle>();
  const int code = MPI_Comm_split(comm_->comm, color, key, &handle->comm);
  require(code == MPI_SUCCESS, "MPI_Comm_split of group ", name_, " into ", name, " at rank ",
          rank_, " failed: ", mpi_error_text(code));
  return std::unique_ptr<MpiCommunicator>(new MpiCommunicator(std::move(handle), name, shared_));
}

Collective MpiCommunicator::all_reduce_async(void* buffer, size_t count, DType dtype, ReduceOp op,
                                             void*) {
  require_count(count, "all_reduce");
  const MPI_Op mop = reduce_op(dtype, op, "all_reduce");
  MPI_Comm comm = comm_->comm;
  return start(
      op == ReduceOp::kAvg ? "all_reduce(avg)" : "all_reduce(sum)", name_, rank_, count, dtype,
      shared_,
      [&](MPI_Request* r) {
        return MPI_Iallreduce(MPI_IN_PLACE, buffer, static_cast<int>(count), mpi_type(dtype), mop,
                              comm, r);
      },
      scale_on_complete(buffer, count, op, size_));
}

Collective MpiCommunicator::reduce_scatter_async(const void* send, void* recv, size_t recv_count,
                                                 DType dtype, ReduceOp op, void*) {
  require_count(recv_count * size_, "reduce_scatter");
  const MPI_Op mop = reduce_op(dtype, op, "reduce_scatter");
  MPI_Comm comm = comm_->comm;
  const size_t bytes = recv_count * dtype_size(dtype);
  // MPI's in-place form leaves the result at the front of the buffer, not at this rank's slice,
  // and send and recv may not overlap otherwise: receive into scratch and copy on completion.
  auto scratch = std::make_shared<std::vector<char>>(bytes);
  auto done = [scratch, recv, bytes,
               on_scale = scale_on_complete(scratch->data(), recv_count, op, size_)] {
    if (on_scale) on_scale();
    if (bytes > 0) std::memcpy(recv, scratch->data(), bytes);
  };
  return start(
      op == ReduceOp::kAvg ? "reduce_scatter(avg)" : "reduce_scatter(sum)", name_, rank_,
      recv_count, dtype, shared_,
      [&](MPI_Request* r) {
        return MPI_Ireduce_scatter_block(send, scratch->data(), static_cast<int>(recv_count),
                                         mpi_type(dtype), mop, comm, r);
      },
      done);
}

Collective MpiCommunicator::all_gather_async(const void* send, void* recv, size_t send_count,
                                             DType dtype, void*) {
  require_count(send_count * size_, "all_gather");
  MPI_Comm comm = comm_->comm;
  const bool in_place =
      send == static_cast<const char*>(recv) + rank_ * send_count * dtype_size(dtype);
  return start("all_gather", name_, rank_, send_count, dtype, shared_, [&](MPI_Request* r) {
    return MPI_Iallgather(in_place ? MPI_IN_PLACE : send, static_cast<int>(send_count),
                          mpi_type(dtype), recv, static_cast<int>(send_count), mpi_type(dtype),
                          comm, r);
  });
}

Collective MpiCommunicator::broadcast_async(void* buffer, size_t count, DType dtype, int root,
                                            void*) {
  require_count(count, "broadcast");
  require(root >= 0 && root < size_, "broadcast on group ", name_, ": root ", root,
          " is outside [0, ", size_, ")");
  MPI_Comm comm = comm_->comm;
  return start(cat("broadcast(root ", root, ")"), name_, rank_, count, dtype, shared_,
               [&](MPI_Request* r) {
                 return MPI_Ibcast(buffer, static_cast<int>(count), mpi_type(dtype), root, comm, r);
               });
}

Collective MpiCommunicator::barrier_async() {
  MPI_Comm comm = comm_->comm;
  return start("barrier", name_, rank_, 0, DType::kF32, shared_,
               [&](MPI_Request* r) { return MPI_Ibarrier(comm, r); });
}

}  // namespace tandem
