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
  require(options.zero == 0 || options.zero == 1, "parallel.zero = ", options.zero,
          ": supported stages are 0 (replicated optimizer) and 1 (sharded AdamW moments); "
          "stage 2 would need backward to write a sharded gradient buffer");
  require(options.bucket_mb > 0, "parallel.bucket_mb must be > 0, got ", options.bucket_mb);
  require(grads_group.size() == host_group.size() && grads_group.rank() == host_group.rank(),
          "data parallel: the device and host dp groups differ");
  const auto bucket_numel = static_cast<int64_t>(options.bucket_mb * 1024 * 1024 / sizeof(float));
  reducer_ = std::make_unique<GradientReducer>(
      grads_group, model.grads(), std::max<int64_t>(1, bucket_numel),
      options.zero >= 1 ? GradientReducer::Mode::kReduceScatter
                        : GradientReducer::Mode::kAllReduce);
  model_.set_gradients_ready_hook(
      [this](int64_t watermark) { reducer_->on_gradients_ready(watermark); });
}

DataParallel::~DataParallel() {
  model_.set_gradients_ready_hook(nullptr);
}

float DataParallel::compute_gradients(const int32_t* inputs, const int32_t* targets, int K, int B,
                                      int T) {
  model_.zero_grad();
  double total = 0.0;
  const size_t per_micro = static_cast<size_t>(B) * T;
  for (int k = 0; k < K; ++k) {
    total += model_.forward(inputs + k * per_micro, targets + k * per_micro, B, T);
    if (k == K - 1) reducer_->arm(1.0f / static_cast<float>(K * dp()));
    model_.backward();
  }
  reducer_->finish();
  return static_cast<float>(mean_over_dp(total / K));
}

float DataParallel::clip_gradients(float max_norm) {
  const Ops& ops = ops_for(model_.device());
  float* g = model_.grads().data<float>();
  const auto ranges = reducer_->owned_ranges();
  double squares = 0.0;
  if (model_.tp_size() == 1) {
    for (const auto& [b, e] : ranges) squares += ops.sum_squares(g + b, static_cast<size_t>(e - b));
  } else {
    // Tensor parallelism: a split parameter's gradient is spread over the tp ranks, a
    // replicated one (norms, row-parallel biases) is whole on each: counted on tp rank 0 only.
    for (const ParamSpec& s : model_.layout().specs()) {
      if (Transformer::replicated(s) && model_.tp_rank() != 0) continue;
      for (const auto& [b, e] : ranges) {
        const int64_t lo = std::max(b, s.offset), hi = std::min(e, s.offset + s.numel);
        if (lo < hi) squares += ops.sum_squares(g + lo, static_cast<size_t>(hi - lo));
      }
    }
  }
  // All-reduce mode: every rank holds the whole (identical) gradient, no communication needed.
  if (reducer_->mode() == GradientReducer::Mode::kReduceScatter) {
    squares = sum_in_rank_order(host_, squares);
  }
  if (model_.tp_size() > 1) squares = sum_in_rank_order(*model_.tp_group(), squares);
  const auto norm = static_cast<float>(std::sqrt(squares));
  if (max_norm > 0.0f && norm > max_norm) {
    const float s = max_norm / (norm + 1e-6f);
    for (const auto& [b, e] : ranges) ops.scale(g + b, s, static_cast<size_t>(e - b));
  }
  return norm;
}

std::unique_ptr<AdamW> DataParallel::make_optimizer(const AdamWConfig& config) const {
  if (options_.zero == 0) return std::make_unique<AdamW>(model_.layout(), config, model_.device());
  return std::make_unique<AdamW>(model_.layout(), config, model_.device(),
                                 reducer_->owned_ranges());
}

void DataParallel::optimizer_step(AdamW& optimizer, float lr) {
  optimizer.step(model_.params().data<float>(), model_.grads().data<float>(), lr);
  if (options_.zero >= 1) reducer_->all_gather_owned(model_.params());
}

std::unique_ptr<AdamW> DataParallel::gather_optimizer(const AdamW& mine,
                                                      const AdamWConfig& config) {
  auto full = std::make_unique<AdamW>(model_.layout(), config, model_.device());
  mine.export_moments(*full);
  if (options_.zero >= 1) {
    reducer_->all_gather_owned(full->exp_avg());
    reducer_->all_gather_owned(full->exp_avg_sq());
  }
  return full;
}

double DataParallel::mean_over_dp(double value) {
  return dp() == 1 ? value : sum_in_rank_order(host_, value) / dp();
}

}  // namespace tandem
