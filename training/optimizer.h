// AdamW over the flat parameter buffer, learning-rate schedules and global-norm clipping.
//
// AdamW keeps fp32 first/second moments as two flat buffers laid out like the parameters, so
// ZeRO sharding and checkpointing are slicing. A sharded AdamW (ZeRO) owns only some ranges of
// the flat buffer: its moments hold those ranges back to back, and step() updates only them;
// export_moments/import_moments move the state to and from an unsharded AdamW (checkpoints keep
// the unsharded layout). Weight decay is decoupled (Loshchilov & Hutter)
// and, by default, applies to weight matrices only: not to embeddings, norms or biases.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "runtime/parameters.h"
#include "runtime/tensor.h"

namespace tandem {

struct Ops;

struct AdamWConfig {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
  bool decay_embeddings = false;
  bool decay_norms_and_biases = false;
};

class AdamW {
 public:
  // The moments live on `device`, with the parameters they update.
  AdamW(const ParamLayout& layout, const AdamWConfig& config, Device device = Device::cpu());
  // Sharded: updates only `owned` ([begin, end) flat ranges, ascending, disjoint).
  using Range = std::pair<int64_t, int64_t>;
  AdamW(const ParamLayout& layout, const AdamWConfig& config, Device device,
        const std::vector<Range>& owned);
  // One update with learning rate lr; increments step_count() first (bias correction uses it).
  // params and grads are flat buffers (the whole layout) on the optimizer's device; a sharded
  // AdamW reads and writes only its ranges.
  void step(float* params, const float* grads, float lr);
  // Sharded: the same with the gradients of the owned ranges only, back to back (ZeRO-2's
  // gradient shard, laid out like the moments).
  void step_compact(float* params, const float* owned_grads, float lr);
  long step_count() const { return step_; }
  void set_step_count(long step) { step_ = step; }  // with moments moved in from elsewhere
  // Elements of moment state held (the layout's size, or the owned ranges' total).
  int64_t state_numel() const { return m_.numel(); }
  // Moves the state between this (sharded or not) AdamW and an unsharded one of the same layout:
  // export writes this optimizer's ranges of `full`'s moments (other elements untouched) and its
  // step; import reads them. Throws unless `full` is unsharded with the same layout size.
  void export_moments(AdamW& full) const;
  void import_moments(const AdamW& full);
  Tensor& exp_avg() { return m_; }
  Tensor& exp_avg_sq() { return v_; }
  const AdamWConfig& config() const { return config_; }
  // Weight decay applied to a parameter under this config.
  float decay_for(const ParamSpec& spec) const;

  // optimizer.safetensors: tensors "exp_avg" and "exp_avg_sq" (flat) + metadata "step".
  void save(const std::string& path) const;
  // Throws naming the file if it does not match this optimizer's parameter count or holds
  // non-finite moments.
  void load(const std::string& path);

 private:
  struct Segment {
    int64_t offset, numel;
    float weight_decay;
    int64_t state_offset;  // into m_ and v_
  };
  // Copies the owned elements between an unsharded buffer and this optimizer's state layout.
  void copy_owned(const Tensor& full, const Tensor& mine, bool to_full) const;
  AdamWConfig config_;
  std::vector<Segment> segments_;  // contiguous runs with the same decay
  int64_t numel_ = 0;              // of the whole layout
  bool sharded_ = false;
  std::vector<Range> owned_;
  const Ops* ops_;  // the kernels of the moments' device
  Tensor m_, v_;
  long step_ = 0;
};

enum class LrDecay { kCosine, kLinear, kConstant };

// Linear warmup from max_lr / warmup_steps to max_lr over warmup_steps, then decay to min_lr at
// total_steps (cosine or linear) or stay at max_lr (constant). Steps are 0-based.
struct LrSchedule {
  float max_lr = 3e-4f;
  float min_lr = 0.0f;
  long warmup_steps = 0;
  long total_steps = 1;
  LrDecay decay = LrDecay::kCosine;
  float at(long step) const;
};

// Config spelling of a decay: "cosine", "linear", "constant" (and back; nullopt if unknown).
const char* lr_decay_name(LrDecay decay);
std::optional<LrDecay> lr_decay_from_name(std::string_view name);

// Scales grads (n floats on `device`) so that their global L2 norm is at most max_norm (no-op
// when max_norm <= 0). Returns the norm before clipping.
float clip_grad_norm(float* grads, size_t n, float max_norm, Device device = Device::cpu());

}  // namespace tandem
