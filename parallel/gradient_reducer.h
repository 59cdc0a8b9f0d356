// GradientReducer: data-parallel gradient reduction in buckets, overlapped with backward.
//
// The flat gradient buffer is cut into buckets of about bucket_numel elements walked from the END
// of the buffer (the last layer's gradients are final first): bucket 0 is the last bucket_numel
// elements, the lowest bucket holds what remains at offset 0. Bucket lengths are multiples of the
// group size (but the lowest), so each bucket splits into size() equal pieces.
//
// Per optimizer step: arm(scale) before the backward of the LAST micro-batch (earlier micro-batches
// only accumulate locally); connect on_gradients_ready() to Transformer's gradients-ready hook;
// every bucket the watermark has passed is multiplied by `scale` (1 / (grad_accum * dp): the mean
// over micro-batches and ranks) and its collective starts at once, while backward goes on; each
// call also tests the collectives in flight (MPI progresses only inside MPI calls). finish()
// starts what is left and waits for everything.
//
// Modes:
//  - kAllReduce: every rank ends with the full mean gradient (plain data parallelism).
//  - kReduceScatter (ZeRO): rank r ends with the mean gradient of piece r of every bucket; the
//    other pieces of its buffer hold meaningless partial sums. owned_ranges() lists its pieces;
//    after each rank updated its pieces, all_gather_owned() makes the buffer whole everywhere.
//
// Results do not depend on the bucket size or on timing: each element is scaled once and reduced
// once by the group's collective. Not thread-safe; buffers stay owned by the caller.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "runtime/communicator.h"
#include "runtime/tensor.h"

namespace tandem {

// One bucket's all-gather in `buffer` (flat F32 on the group's device): [begin, end) is cut into
// group.size() pieces of `piece` elements (the last one short when the bucket does not split
// evenly); each rank's piece i holds its values, and afterwards every rank holds all of them.
// An even bucket is gathered in place and asynchronously (wait on the handle); an uneven one
// goes through `scratch` (at least piece * size floats on the device) before this returns.
// Shared by GradientReducer and ShardedGradients (ZeRO-2).
Collective all_gather_bucket(Communicator& group, Tensor& buffer, int64_t begin, int64_t end,
                             int64_t piece, Tensor& scratch);

class GradientReducer {
 public:
  enum class Mode { kAllReduce, kReduceScatter };
  struct Bucket {
    int64_t begin = 0, end = 0;  // flat offsets
    int64_t piece = 0;           // elements per rank: ceil((end - begin) / size)
  };

  // `grads` is the model's flat F32 gradient buffer on the group's device.
  GradientReducer(Communicator& group, Tensor grads, int64_t bucket_numel, Mode mode);

  Mode mode() const { return mode_; }
  Communicator& group() const { return group_; }
  const std::vector<Bucket>& buckets() const { return buckets_; }
  // This rank's pieces [begin, end) of the flat buffer, ascending (kReduceScatter; in kAllReduce
  // mode the whole buffer).
  std::vector<std::pair<int64_t, int64_t>> owned_ranges() const;
  int64_t owned_numel() const;

  void arm(float scale);
  bool armed() const { return armed_; }
  void on_gradients_ready(int64_t watermark);
  void finish();

  // `buffer` (a flat buffer laid out like the gradients, on the group's device) holds this rank's
  // values in its owned pieces; afterwards every rank holds every piece (in-place all-gathers,
  // bucket by bucket). Used for parameters after a ZeRO step and for optimizer moments on save.
  void all_gather_owned(Tensor& buffer);

  // Seconds spent blocked in finish() (communication not hidden behind backward), and buckets
  // started, since construction.
  double exposed_seconds() const { return exposed_seconds_; }
  long buckets_reduced() const { return buckets_reduced_; }

 private:
  void start(size_t index);
  bool padded(const Bucket& b) const { return b.piece * size_ != b.end - b.begin; }

  Communicator& group_;
  Tensor grads_;
  Mode mode_;
  int size_, rank_;
  std::vector<Bucket> buckets_;
  Tensor scratch_;  // size * piece of the lowest bucket, when it does not split evenly
  std::vector<Collective> in_flight_;
  size_t next_ = 0;  // next bucket to start
  bool armed_ = false;
  float scale_ = 1.0f;
  double exposed_seconds_ = 0.0;
  long buckets_reduced_ = 0;
};

}  // namespace tandem
