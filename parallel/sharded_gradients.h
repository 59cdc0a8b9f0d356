// ShardedGradients: ZeRO stage 2, the gradients held as this rank's shard only.
//
// Backward writes each gradient segment (Transformer::gradient_segments: the final norm and an
// untied head, each layer, the embeddings) into a transient buffer this class hands out through
// the Transformer's gradient sink; once the gradients-ready hook says a segment is final, its
// buckets (the segment cut from its start into pieces of about bucket_numel, a multiple of the
// group size) are scaled and reduce-scattered at once, overlapping the rest of backward, and
// this rank's piece of each bucket is ADDED into owned() (received straight into it on the
// first micro-batch when the piece is whole): the reduced gradient of its shard,
// compact (owned_ranges() back to back, ascending), the one persistent gradient buffer (about
// 1/dp of the parameters). A segment's buffer goes back to a pool when its buckets are done, and
// at most kMaxSegmentsInFlight segments are being reduced at once (backward waits for the
// oldest beyond that), so backward holds the embeddings (a tied wte is written first and last),
// the segment being written and those in flight, never the whole flat gradient.
//
// Per optimizer step: zero(); then for each micro-batch arm(scale) before its backward and
// finish() after it (every micro-batch communicates: the price of not keeping a whole gradient
// buffer, as in DeepSpeed's stage 2). After the update, all_gather_owned() makes a flat buffer
// (parameters, moments) whole from every rank's pieces. The element-wise results equal plain
// data parallelism's: each gradient element is scaled once per micro-batch and reduced by the
// group's collective, the micro-batches then summed in order.
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "runtime/communicator.h"
#include "runtime/tensor.h"

namespace tandem {

class ShardedGradients {
 public:
  struct Bucket {
    int64_t begin = 0, end = 0;  // flat offsets
    int64_t piece = 0;           // elements per rank: ceil((end - begin) / size)
    size_t segment = 0;          // index into segments()
    int64_t owned_begin = 0, owned_end = 0;  // this rank's piece, flat (may be empty)
    int64_t owned_offset = 0;                // where it sits in owned()
  };
  struct Segment {
    int64_t begin = 0, end = 0;
    int64_t padded = 0;  // floats allocated (the last bucket padded to size * piece)
  };

  // `segments`: disjoint [begin, end) ranges covering [0, total) (any order);
  // group: the dp group, communicating buffers on `device`.
  ShardedGradients(Communicator& group, std::vector<std::pair<int64_t, int64_t>> segments,
                   int64_t total, int64_t bucket_numel, Device device);
  ~ShardedGradients();
  ShardedGradients(const ShardedGradients&) = delete;
  ShardedGradients& operator=(const ShardedGradients&) = delete;

  const std::vector<Bucket>& buckets() const { return buckets_; }
  std::vector<std::pair<int64_t, int64_t>> owned_ranges() const;
  int64_t owned_numel() const { return owned_.numel(); }
  Tensor& owned() { return owned_; }

  void zero();
  void arm(float scale);
  // The gradient sink (Transformer::set_gradient_sink): the buffer of segment [begin, end),
  // zeroed on first use in a backward.
  float* segment(int64_t begin, int64_t end);
  void on_gradients_ready(int64_t watermark);
  void finish();
  // `buffer` (flat, total floats, on the group's device) holds this rank's values in its owned
  // ranges; afterwards every rank holds every range.
  void all_gather_owned(Tensor& buffer);

  // Floats of transient buffers (segments, receive pieces) allocated so far: the pool keeps
  // them for reuse, so this is what the transient side costs in memory.
  int64_t transient_numel() const { return allocated_; }
  double exposed_seconds() const { return exposed_seconds_; }

 private:
  struct InFlight {
    Collective collective;
    size_t bucket;
    Tensor received;  // piece floats
  };
  Tensor take(int64_t numel, bool zeroed = true);  // from the pool
  void give_back(Tensor t);
  void start_segment(size_t index);
  void complete(InFlight& f);
  void poll(bool wait);
  int segments_in_flight() const;
  static constexpr int kMaxSegmentsInFlight = 2;

  Communicator& group_;
  Device device_;
  int size_, rank_;
  int64_t total_;
  std::vector<Segment> segments_;
  std::map<int64_t, size_t> segment_at_;  // begin -> index
  std::vector<Bucket> buckets_;
  std::vector<std::vector<size_t>> buckets_of_;  // per segment
  Tensor owned_;
  Tensor scratch_;  // all_gather_owned's uneven buckets

  // Per backward.
  bool armed_ = false;
  bool accumulated_ = false;  // owned() holds an earlier micro-batch's sum
  float scale_ = 1.0f;
  std::vector<Tensor> live_;        // per segment: its buffer while in use
  std::vector<int> pending_;        // per segment: buckets not yet completed (-1: not started)
  std::vector<InFlight> in_flight_;
  std::multimap<int64_t, Tensor> pool_;
  int64_t allocated_ = 0;
  double exposed_seconds_ = 0.0;
};

}  // namespace tandem
