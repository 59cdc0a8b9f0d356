#include "parallel/gradient_reducer.h"

#include <algorithm>
#include <chrono>

#include "runtime/error.h"
#include "runtime/ops.h"

namespace tandem {

GradientReducer::GradientReducer(Communicator& group, Tensor grads, int64_t bucket_numel, Mode mode)
    : group_(group),
      grads_(std::move(grads)),
      mode_(mode),
      size_(group.size()),
      rank_(group.rank()) {
  require(grads_.dtype() == DType::kF32 && grads_.dim() == 1,
          "gradient reducer: needs the flat F32 gradient buffer");
  require(grads_.device() == group.device(), "gradient reducer: gradients on ",
          grads_.device().str(), " but group ", group.name(), " communicates on ",
          group.device().str());
  require(bucket_numel >= 1, "gradient reducer: bucket size must be >= 1 element");
  const int64_t step = (bucket_numel + size_ - 1) / size_ * size_;
  for (int64_t end = grads_.numel(); end > 0; end -= step) {
    const int64_t begin = std::max<int64_t>(0, end - step);
    buckets_.push_back({begin, end, (end - begin + size_ - 1) / size_});
  }
  const Bucket& lowest = buckets_.back();
  if (padded(lowest))
    scratch_ = Tensor::zeros({lowest.piece * size_}, DType::kF32, grads_.device());
}

std::vector<std::pair<int64_t, int64_t>> GradientReducer::owned_ranges() const {
  if (mode_ == Mode::kAllReduce) return {{0, grads_.numel()}};
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (auto it = buckets_.rbegin(); it != buckets_.rend(); ++it) {
    const int64_t b = std::min(it->end, it->begin + rank_ * it->piece);
    const int64_t e = std::min(it->end, b + it->piece);
    if (e > b) ranges.emplace_back(b, e);
  }
  return ranges;
}

int64_t GradientReducer::owned_numel() const {
  int64_t n = 0;
  for (const auto& [b, e] : owned_ranges()) n += e - b;
  return n;
}

void GradientReducer::arm(float scale) {
  require(!armed_ && in_flight_.empty(), "gradient reducer: arm() twice without finish()");
  armed_ = true;
  scale_ = scale;
  next_ = 0;
}

void GradientReducer::start(size_t index) {
  const Bucket& b = buckets_[index];
  float* g = grads_.data<float>() + b.begin;
  const int64_t n = b.end - b.begin;
  if (scale_ != 1.0f) ops_for(grads_.device()).scale(g, scale_, static_cast<size_t>(n));
  ++buckets_reduced_;
  if (mode_ == Mode::kAllReduce) {
    in_flight_.push_back(
        group_.all_reduce_async(g, static_cast<size_t>(n), DType::kF32, ReduceOp::kSum));
    return;
  }
  if (!padded(b)) {
    in_flight_.push_back(group_.reduce_scatter_async(
        g, g + rank_ * b.piece, static_cast<size_t>(b.piece), DType::kF32, ReduceOp::kSum));
    return;
  }
  // The lowest bucket does not split evenly: reduce a zero-padded copy, then copy the piece back.
  scratch_.zero();
  scratch_.flat_view(0, {n}).copy_from(grads_.flat_view(b.begin, {n}));
  float* s = scratch_.data<float>();
  group_.reduce_scatter(s, s + rank_ * b.piece, static_cast<size_t>(b.piece), DType::kF32,
                        ReduceOp::kSum);
  const int64_t own_begin = std::min(n, rank_ * b.piece),
                own_end = std::min(n, own_begin + b.piece);
  if (own_end > own_begin) {
    grads_.flat_view(b.begin + own_begin, {own_end - own_begin})
        .copy_from(scratch_.flat_view(own_begin, {own_end - own_begin}));
  }
}

void GradientReducer::on_gradients_ready(int64_t watermark) {
  if (!armed_) return;
  while (next_ < buckets_.size() && buckets_[next_].begin >= watermark) start(next_++);
  for (Collective& c : in_flight_) c.test();
}

void GradientReducer::finish() {
  require(armed_, "gradient reducer: finish() without arm()");
  const auto t0 = std::chrono::steady_clock::now();
  while (next_ < buckets_.size()) start(next_++);
  for (Collective& c : in_flight_) c.wait();
  in_flight_.clear();
  armed_ = false;
  exposed_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Collective all_gather_bucket(Communicator& group, Tensor& buffer, int64_t begin, int64_t end,
                             int64_t piece, Tensor& scratch) {
  const int size = group.size(), rank = group.rank();
  const int64_t n = end - begin;
  float* x = buffer.data<float>() + begin;
  if (piece * size == n) {
    return group.all_gather_async(x + rank * piece, x, static_cast<size_t>(piece), DType::kF32);
  }
  // Uneven: a zero-padded copy of the bucket, gathered, then copied back.
  const int64_t own_begin = std::min(n, rank * piece), own_end = std::min(n, own_begin + piece);
  scratch.zero();
  if (own_end > own_begin) {
    scratch.flat_view(own_begin, {own_end - own_begin})
        .copy_from(buffer.flat_view(begin + own_begin, {own_end - own_begin}));
  }
  float* s = scratch.data<float>();
  group.all_gather(s + rank * piece, s, static_cast<size_t>(piece), DType::kF32);
  buffer.flat_view(begin, {n}).copy_from(scratch.flat_view(0, {n}));
  return Collective();
}

void GradientReducer::all_gather_owned(Tensor& buffer) {
  require(buffer.dtype() == DType::kF32 && buffer.numel() == grads_.numel() &&
              buffer.device() == grads_.device(),
          "gradient reducer: all_gather_owned needs a flat F32 buffer like the gradients");
  if (size_ == 1) return;
  std::vector<Collective> gathers;
  for (const Bucket& b : buckets_) {
    gathers.push_back(all_gather_bucket(group_, buffer, b.begin, b.end, b.piece, scratch_));
  }
  for (Collective& c : gathers) c.wait();
}

}  // namespace tandem
