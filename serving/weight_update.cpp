#include "serving/weight_update.h"

#include <xxhash.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <map>
#include <new>
#include <unordered_map>
#include <vector>

#include "runtime/error.h"
#include "serving/generation_service.h"

namespace tandem::serving {

namespace pb = tandem::v1;

// ---- WeightChecksum ---------------------------------------------------------------------------

struct WeightChecksum::State {
  XXH3_state_t* xxh = nullptr;
};

WeightChecksum::WeightChecksum() : state_(std::make_unique<State>()) {
  state_->xxh = XXH3_createState();
  require(state_->xxh != nullptr, "weight checksum: out of memory");
  XXH3_64bits_reset(state_->xxh);
}

WeightChecksum::~WeightChecksum() {
  XXH3_freeState(state_->xxh);
}

namespace {
void put_u64le(XXH3_state_t* xxh, uint64_t v) {
  unsigned char bytes[8];
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<unsigned char>(v >> (8 * i));
  XXH3_64bits_update(xxh, bytes, sizeof bytes);
}
}  // namespace

void WeightChecksum::add(const std::string& name, int64_t offset, const void* data, size_t bytes) {
  put_u64le(state_->xxh, name.size());
  XXH3_64bits_update(state_->xxh, name.data(), name.size());
  put_u64le(state_->xxh, static_cast<uint64_t>(offset));
  put_u64le(state_->xxh, bytes);
  XXH3_64bits_update(state_->xxh, data, bytes);
}

void WeightChecksum::add(const pb::WeightChunk& chunk) {
  add(chunk.name(), chunk.offset(), chunk.data().data(), chunk.data().size());
}

uint64_t WeightChecksum::digest() const {
  return XXH3_64bits_digest(state_->xxh);
}

// ---- Staging ----------------------------------------------------------------------------------

namespace {

grpc::Status invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

std::string hex(uint64_t v) {
  char text[19];
  std::snprintf(text, sizeof text, "0x%016" PRIx64, v);
  return text;
}

// The pushed weights in one host buffer in the model's full layout (allocated at the first
// chunk, freed with the object), and which elements of each tensor have arrived.
class Staging {
 public:
  Staging(const ParamLayout& layout, std::atomic<int64_t>& bytes_gauge)
      : layout_(layout), bytes_gauge_(bytes_gauge) {}
  ~Staging() { bytes_gauge_ = 0; }

  grpc::Status add(const pb::WeightChunk& c) {
    const ParamSpec* spec = layout_.find(c.name());
    if (spec == nullptr) {
      return invalid(cat("tensor '", c.name(), "': not a parameter of this model"));
    }
    const Shape shape(c.shape().begin(), c.shape().end());
    if (shape != spec->shape) {
      return invalid(cat("tensor '", c.name(), "': shape ", shape_str(shape), ", the model's is ",
                         shape_str(spec->shape)));
    }
    if (c.dtype() != "F32") {
      return invalid(cat("tensor '", c.name(), "': dtype '", c.dtype(), "', expected 'F32'"));
    }
    if (c.data().empty() || c.data().size() % sizeof(float) != 0) {
      return invalid(cat("tensor '", c.name(), "': a chunk of ", c.data().size(),
                         " bytes is not a positive number of f32 values"));
    }
    const int64_t n = static_cast<int64_t>(c.data().size() / sizeof(float));
    const int64_t begin = c.offset(), end = begin + n;
    if (begin < 0 || n > spec->numel || begin > spec->numel - n) {
      return invalid(cat("tensor '", c.name(), "': elements [", begin, ", ", end,
                         ") lie outside its ", spec->numel, " elements"));
    }
    // Each element once: ranges received, merged when adjacent.
    std::map<int64_t, int64_t>& ranges = received_[c.name()];
    auto next = ranges.upper_bound(begin);
    if ((next != ranges.end() && next->first < end) ||
        (next != ranges.begin() && std::prev(next)->second > begin)) {
      return invalid(cat("tensor '", c.name(), "': elements [", begin, ", ", end,
                         ") overlap elements already received"));
    }
    if (buffer_.empty()) {
      try {
        buffer_.resize(static_cast<size_t>(layout_.total_numel()));
      } catch (const std::bad_alloc&) {
        return grpc::Status(
            grpc::StatusCode::RESOURCE_EXHAUSTED,
            cat("no host memory to stage ", layout_.total_numel(), " parameters for the update"));
      }
      bytes_gauge_ = static_cast<int64_t>(buffer_.size() * sizeof(float));
    }
    std::memcpy(buffer_.data() + spec->offset + begin, c.data().data(), c.data().size());
    int64_t new_begin = begin, new_end = end;
    if (next != ranges.begin() && std::prev(next)->second == begin) {
      new_begin = std::prev(next)->first;
      ranges.erase(std::prev(next));
    }
    if (next != ranges.end() && next->first == end) {
      new_end = next->second;
      ranges.erase(next);
    }
    ranges[new_begin] = new_end;
    return grpc::Status::OK;
  }

  // Every element of every parameter arrived (each at most once, checked by add()).
  grpc::Status check_complete() const {
    int missing_tensors = 0;
    std::string first;
    for (const ParamSpec& s : layout_.specs()) {
      int64_t got = 0;
      if (auto it = received_.find(s.name); it != received_.end()) {
        for (const auto& [b, e] : it->second) got += e - b;
      }
      if (got == s.numel) continue;
      if (missing_tensors++ == 0) {
        first = cat("tensor '", s.name, "': ", got, " of its ", s.numel, " elements arrived");
      }
    }
    if (missing_tensors == 0) return grpc::Status::OK;
    return invalid(cat("the update is incomplete: ", first,
                       missing_tensors > 1
                           ? cat(" (and ", missing_tensors - 1, " more tensors are incomplete)")
                           : std::string()));
  }

  const float* data() const { return buffer_.data(); }

 private:
  const ParamLayout& layout_;
  std::atomic<int64_t>& bytes_gauge_;
  std::vector<float> buffer_;
  std::unordered_map<std::string, std::map<int64_t, int64_t>> received_;  // begin -> end
};

}  // namespace

// ---- WeightUpdater ----------------------------------------------------------------------------

WeightUpdater::WeightUpdater(Engine& engine, Transformer& model, WeightUpdateOptions options)
    : engine_(engine), model_(model), options_(std::move(options)) {
  require(model_.tp_size() == 1,
          "serve: weight updates (--update-token-file) are for one-process replicas; this one "
          "is tensor-parallel over ",
          model_.tp_size(), " ranks");
  require(!options_.token.empty(), "serve: the update token is empty");
  require(options_.timeout_s > 0, "serve: --update-timeout must be > 0, got ", options_.timeout_s);
}

grpc::Status WeightUpdater::update(grpc::ServerContext& context,
                                   grpc::ServerReaderInterface<pb::UpdateWeightsRequest>& reader,
                                   pb::UpdateWeightsResponse& response) {
  if (grpc::Status s = check_bearer_token(context, options_.token); !s.ok()) {
    return grpc::Status(s.error_code(),
                        cat("UpdateWeights needs the update token: ", s.error_message()));
  }
  std::unique_lock<std::mutex> busy(busy_mu_, std::try_to_lock);
  if (!busy.owns_lock()) {
    return grpc::Status(grpc::StatusCode::ABORTED,
                        "another weight update is in progress; retry when it has ended");
  }
  const std::string before = engine_.weights_version();
  const grpc::Status status = receive_and_swap(context, reader, response);
  if (status.ok()) {
    std::fprintf(stderr, "tandem: serve: weights '%s' replaced by '%s' (%.3f s waiting + swap)\n",
                 before.c_str(), response.version().c_str(), response.swap_wait_seconds());
  } else {
    std::fprintf(stderr, "tandem: serve: weight update refused (%s); weights '%s' keep serving\n",
                 status.error_message().c_str(), engine_.weights_version().c_str());
  }
  return status;
}

grpc::Status WeightUpdater::receive_and_swap(
    grpc::ServerContext& context, grpc::ServerReaderInterface<pb::UpdateWeightsRequest>& reader,
    pb::UpdateWeightsResponse& response) {
  Staging staging(model_.full_layout(), staging_bytes_);  // freed on every return
  WeightChecksum checksum;
  pb::UpdateWeightsRequest message;
  bool committed = false;
  pb::WeightCommit commit;
  while (reader.Read(&message)) {
    if (committed) return invalid("a message after the commit (the commit comes last)");
    if (message.has_chunk()) {
      if (grpc::Status s = staging.add(message.chunk()); !s.ok()) return s;
      checksum.add(message.chunk());
    }
    if (message.has_commit()) {
      committed = true;
      commit = message.commit();
    }
  }
  if (context.IsCancelled()) {
    return grpc::Status(grpc::StatusCode::CANCELLED,
                        "the client went away during the update; nothing changed");
  }
  if (!committed) {
    return invalid(
        "the update ended without a commit (its last message carries the checksum and the "
        "version); nothing changed");
  }
  if (commit.version().empty()) return invalid("commit.version: is empty");
  if (grpc::Status s = staging.check_complete(); !s.ok()) return s;
  if (checksum.digest() != commit.xxh3_64()) {
    return grpc::Status(grpc::StatusCode::DATA_LOSS,
                        cat("checksum mismatch: the chunks received hash to ",
                            hex(checksum.digest()), " but the commit says ", hex(commit.xxh3_64()),
                            " (a chunk was corrupted); nothing changed"));
  }
  const auto t0 = std::chrono::steady_clock::now();
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(options_.timeout_s * 1e3));
  bool swapped = false;
  try {
    swapped = engine_.swap_weights([&] { model_.scatter_full(staging.data(), model_.params()); },
                                   commit.version(), timeout);
  } catch (const std::exception& e) {
    return grpc::Status(grpc::StatusCode::INTERNAL, cat("the weight swap failed: ", e.what()));
  }
  if (!swapped) {
    return grpc::Status(grpc::StatusCode::ABORTED,
                        cat("requests still running after --update-timeout ", options_.timeout_s,
                            " s: the update was refused and weights '", engine_.weights_version(),
                            "' keep serving"));
  }
  response.set_version(commit.version());
  response.set_num_tensors(static_cast<int64_t>(model_.full_layout().specs().size()));
  response.set_num_elements(model_.full_layout().total_numel());
  response.set_swap_wait_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return grpc::Status::OK;
}

}  // namespace tandem::serving
