// DataParallel: the gradient side of one optimizer step across the data-parallel group.
//
// Every dp rank runs grad_accum micro-batches of its own share of the global batch. The LAST
// micro-batch's backward reduces the gradient bucket by bucket while backward goes on (the
// GradientReducer on the Transformer's gradients-ready hook); earlier micro-batches only
// accumulate. Buckets are scaled by 1 / (grad_accum * dp) before the sum, so the result is the
// mean over all micro-batches of all ranks: the gradient of one batch of dp * grad_accum * B
// sequences. A world of one (LocalCommunicator) takes the same path.
//
// ZeRO (zero >= 1): gradients are reduce-scattered instead of all-reduced; each rank owns a piece
// of every bucket, its AdamW holds moments for those pieces only (about 1/dp of the state) and
// updates them, and the parameters are all-gathered afterwards. Same results as plain AdamW
// (element-wise update; only the gradient norm's partial sums are grouped differently).
// zero = 2 also keeps only the owned gradient pieces (parallel/sharded_gradients.h): backward
// writes each segment into a transient buffer that is reduce-scattered as soon as it is final
// and then released, and the shard is the only persistent gradient buffer; every micro-batch
// communicates.
//
// Determinism: scalars (loss, gradient norm) are combined with sum_in_rank_order; the reductions
// of gradients are the communicator's. Every rank ends a step with identical parameters.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "parallel/gradient_reducer.h"
#include "parallel/sharded_gradients.h"
#include "runtime/communicator.h"
#include "runtime/transformer.h"
#include "training/optimizer.h"

namespace tandem {

struct DataParallelOptions {
  double bucket_mb = 25.0;  // MiB of F32 gradients per bucket
  int zero = 0;             // 0, 1 or 2
};

class DataParallel {
 public:
  // grads_group communicates buffers on the model's device; host_group is the same dp group on
  // host buffers (the same object on the CPU). Hooks itself into model's backward.
  DataParallel(Transformer& model, Communicator& grads_group, Communicator& host_group,
               const DataParallelOptions& options);
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  int dp() const { return host_.size(); }
  int dp_rank() const { return host_.rank(); }
  int zero() const { return options_.zero; }
  // Stages 0 and 1 (tandem::Error under stage 2, which has no whole gradient buffer).
  GradientReducer& reducer();
  size_t num_buckets() const;
  // Seconds blocked waiting for gradient collectives (not hidden behind backward).
  double exposed_seconds() const;
  // ZeRO-2's gradient shard (null below stage 2).
  ShardedGradients* sharded() { return sharded_.get(); }

  // Zeroes the gradients, runs K micro-batches [B, T] (inputs/targets hold K*B*T tokens, this
  // rank's share), reduces. Returns the mean loss over the micro-batches of every dp rank (the
  // same value on each).
  float compute_gradients(const int32_t* inputs, const int32_t* targets, int K, int B, int T);
  // The global L2 norm of the mean gradient, the same on every rank; then scales the gradient
  // (this rank's part of it under ZeRO) so the norm is at most max_norm (<= 0: no clipping).
  float clip_gradients(float max_norm);
  // An AdamW for this rank: sharded over dp under ZeRO, else over the whole layout.
  std::unique_ptr<AdamW> make_optimizer(const AdamWConfig& config) const;
  // The optimizer's update of this rank's part, then (ZeRO) the parameters made whole.
  void optimizer_step(AdamW& optimizer, float lr);

  // Checkpoints keep the unsharded layout. gather: collective; returns an unsharded AdamW with
  // the whole state on every rank. scatter: takes this rank's part of an unsharded state.
  std::unique_ptr<AdamW> gather_optimizer(const AdamW& mine, const AdamWConfig& config);
  void scatter_optimizer(const AdamW& full, AdamW& mine) const { mine.import_moments(full); }

  // The mean over dp ranks of a per-rank value, added in rank order.
  double mean_over_dp(double value);

 private:
  Transformer& model_;
  Communicator& grads_group_;
  Communicator& host_;
  DataParallelOptions options_;
  // This rank's part of the gradient: [begin, end) flat ranges and where each one's values are.
  struct GradientPiece {
    int64_t begin, end;
    float* data;
  };
  std::vector<GradientPiece> gradient_pieces();

  std::unique_ptr<GradientReducer> reducer_;   // stages 0 and 1
  std::unique_ptr<ShardedGradients> sharded_;  // stage 2
};

}  // namespace tandem
