#include "parallel/sharded_gradients.h"

#include <algorithm>
#include <chrono>

#include "parallel/gradient_reducer.h"
#include "runtime/error.h"
#include "runtime/ops.h"

namespace tandem {

ShardedGradients::ShardedGradients(Communicator& group,
                                   std::vector<std::pair<int64_t, int64_t>> segments,
                                   int64_t total, int64_t bucket_numel, Device device)
    : group_(group), device_(device), size_(group.size()), rank_(group.rank()), total_(total) {
  require(group.device() == device, "ZeRO-2: gradients on ", device.str(), " but group ",
          group.name(), " communicates on ", group.device().str());
  require(bucket_numel >= 1, "ZeRO-2: bucket size must be >= 1 element");
  std::sort(segments.begin(), segments.end());
  int64_t expected = 0;
  for (const auto& [b, e] : segments) {
    require(b == expected && e > b, "ZeRO-2: gradient segments must tile [0, ", total, ")");
    expected = e;
  }
  require(expected == total, "ZeRO-2: gradient segments end at ", expected, ", not ", total);
  const int64_t step = (bucket_numel + size_ - 1) / size_ * size_;
  buckets_of_.resize(segments.size());
  for (size_t s = 0; s < segments.size(); ++s) {
    Segment seg{segments[s].first, segments[s].second, 0};
    for (int64_t b = seg.begin; b < seg.end; b += step) {
      Bucket k;
      k.begin = b;
      k.end = std::min(seg.end, b + step);
      k.piece = (k.end - k.begin + size_ - 1) / size_;
      k.segment = s;
      k.owned_begin = std::min(k.end, k.begin + rank_ * k.piece);
      k.owned_end = std::min(k.end, k.owned_begin + k.piece);
      seg.padded = (k.begin - seg.begin) + k.piece * size_;  // the last bucket's sets it
      buckets_of_[s].push_back(buckets_.size());
      buckets_.push_back(k);
    }
    segment_at_[seg.begin] = s;
    segments_.push_back(seg);
  }
  int64_t offset = 0;
  for (Bucket& k : buckets_) {  // ascending: buckets_ follows the sorted segments
    k.owned_offset = offset;
    offset += k.owned_end - k.owned_begin;
  }
  owned_ = Tensor::zeros({std::max<int64_t>(offset, 1)}, DType::kF32, device_)
               .flat_view(0, {offset});
  live_.resize(segments_.size());
  pending_.assign(segments_.size(), -1);
}

ShardedGradients::~ShardedGradients() {
  for (InFlight& f : in_flight_) {
    try {
      f.collective.wait();
    } catch (...) {
    }
  }
}

std::vector<std::pair<int64_t, int64_t>> ShardedGradients::owned_ranges() const {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (const Bucket& k : buckets_) {
    if (k.owned_end <= k.owned_begin) continue;
    if (!ranges.empty() && ranges.back().second == k.owned_begin) {
      ranges.back().second = k.owned_end;
    } else {
      ranges.emplace_back(k.owned_begin, k.owned_end);
    }
  }
  return ranges;
}

void ShardedGradients::zero() {
  if (owned_.numel() > 0) ops_for(device_).zero(owned_.data<float>(), owned_.numel());
  accumulated_ = false;
}

Tensor ShardedGradients::take(int64_t numel, bool zeroed) {
  Tensor t;
  auto it = pool_.find(numel);
  if (it != pool_.end()) {
    t = std::move(it->second);
    pool_.erase(it);
  } else {
    t = Tensor::empty({numel}, DType::kF32, device_);
    allocated_ += numel;  // kept by the pool from here on
  }
  if (zeroed) ops_for(device_).zero(t.data<float>(), static_cast<size_t>(numel));
  return t;
}

void ShardedGradients::give_back(Tensor t) {
  const int64_t n = t.numel();
  pool_.emplace(n, std::move(t));
}

void ShardedGradients::arm(float scale) {
  require(!armed_ && in_flight_.empty(), "ZeRO-2: arm() twice without finish()");
  armed_ = true;
  scale_ = scale;
  std::fill(pending_.begin(), pending_.end(), -1);
}

float* ShardedGradients::segment(int64_t begin, int64_t end) {
  require(armed_, "ZeRO-2: backward ran without arm()");
  auto it = segment_at_.find(begin);
  require(it != segment_at_.end() && segments_[it->second].end == end,
          "ZeRO-2: backward asked for gradient segment [", begin, ", ", end,
          ") that is not one of the model's");
  const size_t s = it->second;
  require(pending_[s] < 0, "ZeRO-2: gradient segment [", begin, ", ", end,
          ") asked for after it was reduced");
  if (!live_[s].defined()) live_[s] = take(segments_[s].padded);
  return live_[s].data<float>();
}

void ShardedGradients::start_segment(size_t s) {
  if (!live_[s].defined()) live_[s] = take(segments_[s].padded);  // untouched: zeros
  const Segment& seg = segments_[s];
  float* data = live_[s].data<float>();
  if (scale_ != 1.0f) ops_for(device_).scale(data, scale_, static_cast<size_t>(seg.end - seg.begin));
  pending_[s] = static_cast<int>(buckets_of_[s].size());
  for (size_t index : buckets_of_[s]) {
    const Bucket& k = buckets_[index];
    InFlight f;
    f.bucket = index;
    float* recv;
    if (!accumulated_ && k.owned_end - k.owned_begin == k.piece) {
      recv = owned_.data<float>() + k.owned_offset;  // the first micro-batch: straight in
    } else {
      f.received = take(k.piece, /*zeroed=*/false);  // the collective writes it all
      recv = f.received.data<float>();
    }
    f.collective = group_.reduce_scatter_async(data + (k.begin - seg.begin), recv,
                                               static_cast<size_t>(k.piece), DType::kF32,
                                               ReduceOp::kSum);
    in_flight_.push_back(std::move(f));
  }
}

void ShardedGradients::complete(InFlight& f) {
  const Bucket& k = buckets_[f.bucket];
  const int64_t n = k.owned_end - k.owned_begin;
  if (f.received.defined()) {
    if (n > 0) {
      float* dst = owned_.data<float>() + k.owned_offset;
      ops_for(device_).add(dst, dst, f.received.data<float>(), static_cast<size_t>(n));
    }
    give_back(std::move(f.received));
  }
  if (--pending_[k.segment] == 0) {  // the segment's buffer is no longer read by any collective
    give_back(std::move(live_[k.segment]));
    live_[k.segment] = Tensor();
  }
}

void ShardedGradients::poll(bool wait) {
  // In issue order: a completed collective's piece is added at once; the adds of one bucket are
  // ordered by micro-batch (finish() waits for everything), so sums are reproducible.
  size_t kept = 0;
  for (size_t i = 0; i < in_flight_.size(); ++i) {
    InFlight& f = in_flight_[i];
    if (wait) f.collective.wait();
    if (f.collective.test()) {
      complete(f);
    } else {
      if (kept != i) in_flight_[kept] = std::move(f);
      ++kept;
    }
  }
  in_flight_.resize(kept);
}

void ShardedGradients::on_gradients_ready(int64_t watermark) {
  if (!armed_) return;
  // Segments whose start the watermark has reached, highest first (the same order on every rank).
  for (auto it = segment_at_.rbegin(); it != segment_at_.rend(); ++it) {
    if (it->first >= watermark && pending_[it->second] < 0) {
      start_segment(it->second);
      // Bound the memory: beyond kMaxSegmentsInFlight reductions in flight, wait for the oldest
      // (where MPI makes no progress of its own, e.g. no spare core, nothing would complete
      // before finish() and every segment would be held at once).
      while (segments_in_flight() > kMaxSegmentsInFlight) {
        in_flight_.front().collective.wait();
        poll(false);
      }
    }
  }
  poll(false);
}

int ShardedGradients::segments_in_flight() const {
  int n = 0;
  for (int p : pending_) n += p > 0 ? 1 : 0;
  return n;
}

void ShardedGradients::finish() {
  require(armed_, "ZeRO-2: finish() without arm()");
  const auto t0 = std::chrono::steady_clock::now();
  on_gradients_ready(0);  // anything not reported yet
  poll(true);
  armed_ = false;
  accumulated_ = true;  // later micro-batches add into the shard
  exposed_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void ShardedGradients::all_gather_owned(Tensor& buffer) {
  require(buffer.dtype() == DType::kF32 && buffer.numel() == total_ && buffer.device() == device_,
          "ZeRO-2: all_gather_owned needs a flat F32 buffer of ", total_, " elements on ",
          device_.str());
  if (size_ == 1) return;
  if (!scratch_.defined()) {  // the largest uneven bucket, padded
    int64_t most = 1;
    for (const Bucket& k : buckets_) most = std::max(most, k.piece * size_);
    scratch_ = Tensor::zeros({most}, DType::kF32, device_);
  }
  std::vector<Collective> gathers;
  for (const Bucket& k : buckets_) {
    gathers.push_back(all_gather_bucket(group_, buffer, k.begin, k.end, k.piece, scratch_));
  }
  for (Collective& c : gathers) c.wait();
}

}  // namespace tandem
