#include "training/data_parallel.h"

#include <algorithm>
#include <cmath>

#include "parallel/rank_ordered_sum.h"
#include "runtime/error.h"
#include "runtime/ops.h"

namespace tandem {

DataParallel::DataParallel(Transformer& model, Communicator& grads_group, Communicator& host_group,
                           const DataParallelOptions& options)
    : model_(model), grads_group_(grads_group), host_(host_group), options_(options) {
  require(options.zero >= 0 && options.zero <= 2, "parallel.zero = ", options.zero,
          ": the stages are 0 (replicated optimizer), 1 (sharded AdamW moments) and 2 (sharded "
          "moments and gradients)");
  require(options.bucket_mb > 0, "parallel.bucket_mb must be > 0, got ", options.bucket_mb);
  require(grads_group.size() == host_group.size() && grads_group.rank() == host_group.rank(),
          "data parallel: the device and host dp groups differ");
  const auto bucket_numel = static_cast<int64_t>(options.bucket_mb * 1024 * 1024 / sizeof(float));
  if (options.zero == 2) {
    sharded_ = std::make_unique<ShardedGradients>(grads_group, model.gradient_segments(),
                                                  model.num_parameters(),
                                                  std::max<int64_t>(1, bucket_numel), model.device());
    model_.set_gradient_sink(
        [this](int64_t begin, int64_t end) { return sharded_->segment(begin, end); });
    model_.set_gradients_ready_hook(
        [this](int64_t watermark) { sharded_->on_gradients_ready(watermark); });
    return;
  }
  reducer_ = std::make_unique<GradientReducer>(
      grads_group, model.grads(), std::max<int64_t>(1, bucket_numel),
      options.zero >= 1 ? GradientReducer::Mode::kReduceScatter
                        : GradientReducer::Mode::kAllReduce);
  model_.set_gradients_ready_hook(
      [this](int64_t watermark) { reducer_->on_gradients_ready(watermark); });
}

DataParallel::~DataParallel() {
  model_.set_gradients_ready_hook(nullptr);
  model_.set_gradient_sink(nullptr);
}

GradientReducer& DataParallel::reducer() {
  require(reducer_ != nullptr, "data parallel: ZeRO-2 has no gradient reducer (see sharded())");
  return *reducer_;
}

size_t DataParallel::num_buckets() const {
  return sharded_ ? sharded_->buckets().size() : reducer_->buckets().size();
}

double DataParallel::exposed_seconds() const {
  return sharded_ ? sharded_->exposed_seconds() : reducer_->exposed_seconds();
}

float DataParallel::compute_gradients(const int32_t* inputs, const int32_t* targets, int K, int B,
                                      int T) {
  double total = 0.0;
  const size_t per_micro = static_cast<size_t>(B) * T;
  const float scale = 1.0f / static_cast<float>(K * dp());
  if (sharded_) {
    // Stage 2: every micro-batch's gradient is reduced into the shard as backward produces it.
    sharded_->zero();
    for (int k = 0; k < K; ++k) {
      total += model_.forward(inputs + k * per_micro, targets + k * per_micro, B, T);
      sharded_->arm(scale);
      model_.backward();
      sharded_->finish();
    }
    return static_cast<float>(mean_over_dp(total / K));
  }
  model_.zero_grad();
  for (int k = 0; k < K; ++k) {
    total += model_.forward(inputs + k * per_micro, targets + k * per_micro, B, T);
    if (k == K - 1) reducer_->arm(scale);
    model_.backward();
  }
  reducer_->finish();
  return static_cast<float>(mean_over_dp(total / K));
}

std::vector<DataParallel::GradientPiece> DataParallel::gradient_pieces() {
  std::vector<GradientPiece> pieces;
  if (sharded_) {
    float* owned = sharded_->owned().data<float>();
    int64_t at = 0;
    for (const auto& [b, e] : sharded_->owned_ranges()) {
      pieces.push_back({b, e, owned + at});
      at += e - b;
    }
    return pieces;
  }
  float* g = model_.grads().data<float>();
  for (const auto& [b, e] : reducer_->owned_ranges()) pieces.push_back({b, e, g + b});
  return pieces;
}

float DataParallel::clip_gradients(float max_norm) {
  const Ops& ops = ops_for(model_.device());
  const std::vector<GradientPiece> pieces = gradient_pieces();
  double squares = 0.0;
  if (model_.tp_size() == 1) {
    for (const GradientPiece& p : pieces) {
      squares += ops.sum_squares(p.data, static_cast<size_t>(p.end - p.begin));
    }
  } else {
    // Tensor parallelism: a split parameter's gradient is spread over the tp ranks, a
    // replicated one (norms, row-parallel biases) is whole on each: counted on tp rank 0 only.
    for (const ParamSpec& s : model_.layout().specs()) {
      if (Transformer::replicated(s) && model_.tp_rank() != 0) continue;
      for (const GradientPiece& p : pieces) {
        const int64_t lo = std::max(p.begin, s.offset), hi = std::min(p.end, s.offset + s.numel);
        if (lo < hi) squares += ops.sum_squares(p.data + (lo - p.begin), static_cast<size_t>(hi - lo));
      }
    }
  }
  // All-reduce mode: every rank holds the whole (identical) gradient, no communication needed.
  if (options_.zero >= 1) squares = sum_in_rank_order(host_, squares);
  if (model_.tp_size() > 1) squares = sum_in_rank_order(*model_.tp_group(), squares);
  const auto norm = static_cast<float>(std::sqrt(squares));
  if (max_norm > 0.0f && norm > max_norm) {
    const float s = max_norm / (norm + 1e-6f);
    for (const GradientPiece& p : pieces) ops.scale(p.data, s, static_cast<size_t>(p.end - p.begin));
  }
  return norm;
}

std::unique_ptr<AdamW> DataParallel::make_optimizer(const AdamWConfig& config) const {
  if (options_.zero == 0) return std::make_unique<AdamW>(model_.layout(), config, model_.device());
  return std::make_unique<AdamW>(model_.layout(), config, model_.device(),
                                 sharded_ ? sharded_->owned_ranges() : reducer_->owned_ranges());
}

void DataParallel::optimizer_step(AdamW& optimizer, float lr) {
  if (sharded_) {
    optimizer.step_compact(model_.params().data<float>(), sharded_->owned().data<float>(), lr);
    sharded_->all_gather_owned(model_.params());
    return;
  }
  optimizer.step(model_.params().data<float>(), model_.grads().data<float>(), lr);
  if (options_.zero >= 1) reducer_->all_gather_owned(model_.params());
}

std::unique_ptr<AdamW> DataParallel::gather_optimizer(const AdamW& mine,
                                                      const AdamWConfig& config) {
  auto full = std::make_unique<AdamW>(model_.layout(), config, model_.device());
  mine.export_moments(*full);
  if (sharded_) {
    sharded_->all_gather_owned(full->exp_avg());
    sharded_->all_gather_owned(full->exp_avg_sq());
  } else if (options_.zero >= 1) {
    reducer_->all_gather_owned(full->exp_avg());
    reducer_->all_gather_owned(full->exp_avg_sq());
  }
  return full;
}

double DataParallel::mean_over_dp(double value) {
  return dp() == 1 ? value : sum_in_rank_order(host_, value) / dp();
}

}  // namespace tandem
