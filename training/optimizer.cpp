#include "training/optimizer.h"

#include <algorithm>
#include <cmath>

#include "runtime/ops.h"
#include "runtime/safetensors.h"

namespace tandem {

AdamW::AdamW(const ParamLayout& layout, const AdamWConfig& config, Device device)
    : AdamW(layout, config, device, {{0, layout.total_numel()}}) {
  sharded_ = false;
}

AdamW::AdamW(const ParamLayout& layout, const AdamWConfig& config, Device device,
             const std::vector<Range>& owned)
    : config_(config),
      numel_(layout.total_numel()),
      sharded_(true),
      owned_(owned),
      ops_(&ops_for(device)) {
  int64_t state = 0, previous_end = 0;
  for (const auto& [begin, end] : owned) {
    require(begin >= previous_end && end > begin && end <= numel_, "AdamW: owned range [", begin,
            ", ", end, ") is not ascending within [0, ", numel_, ")");
    previous_end = end;
    for (const ParamSpec& s : layout.specs()) {
      const int64_t b = std::max(begin, s.offset), e = std::min(end, s.offset + s.numel);
      if (e <= b) continue;
      const float wd = decay_for(s);
      Segment* last = segments_.empty() ? nullptr : &segments_.back();
      if (last && last->weight_decay == wd && last->offset + last->numel == b) {
        last->numel += e - b;
      } else {
        segments_.push_back({b, e - b, wd, state});
      }
      state += e - b;
    }
  }
  m_ = Tensor::zeros({state}, DType::kF32, device);
  v_ = Tensor::zeros({state}, DType::kF32, device);
}

void AdamW::copy_owned(const Tensor& full, const Tensor& mine, bool to_full) const {
  for (const Segment& s : segments_) {
    Tensor f = full.flat_view(s.offset, {s.numel});
    Tensor m = mine.flat_view(s.state_offset, {s.numel});
    if (to_full) {
      f.copy_from(m);
    } else {
      m.copy_from(f);
    }
  }
}

void AdamW::export_moments(AdamW& full) const {
  require(!full.sharded_ && full.numel_ == numel_,
          "AdamW: export_moments needs an unsharded optimizer of the same layout");
  copy_owned(full.m_, m_, true);
  copy_owned(full.v_, v_, true);
  full.step_ = step_;
}

void AdamW::import_moments(const AdamW& full) {
  require(!full.sharded_ && full.numel_ == numel_,
          "AdamW: import_moments needs an unsharded optimizer of the same layout");
  copy_owned(full.m_, m_, false);
  copy_owned(full.v_, v_, false);
  step_ = full.step_;
}

float AdamW::decay_for(const ParamSpec& spec) const {
  switch (spec.kind) {
    case ParamKind::kMatrix:
      return config_.weight_decay;
    case ParamKind::kEmbedding:
      return config_.decay_embeddings ? config_.weight_decay : 0.0f;
    default:
      return config_.decay_norms_and_biases ? config_.weight_decay : 0.0f;
  }
}

void AdamW::step(float* params, const float* grads, float lr) {
  ++step_;
  float* m = m_.data<float>();
  float* v = v_.data<float>();
  for (const Segment& s : segments_) {
    ops_->adamw_step(params + s.offset, grads + s.offset, m + s.state_offset, v + s.state_offset,
                     static_cast<size_t>(s.numel), lr, config_.beta1, config_.beta2, config_.eps,
                     s.weight_decay, step_);
  }
}

void AdamW::step_compact(float* params, const float* owned_grads, float lr) {
  require(sharded_, "AdamW: step_compact is for a sharded optimizer");
  ++step_;
  float* m = m_.data<float>();
  float* v = v_.data<float>();
  for (const Segment& s : segments_) {
    ops_->adamw_step(params + s.offset, owned_grads + s.state_offset, m + s.state_offset,
                     v + s.state_offset, static_cast<size_t>(s.numel), lr, config_.beta1,
                     config_.beta2, config_.eps, s.weight_decay, step_);
  }
}

void AdamW::save(const std::string& path) const {
  require(!sharded_,
          "AdamW: a sharded optimizer is saved through an unsharded one (export_moments)");
  const Tensor m = m_.to(Device::cpu()), v = v_.to(Device::cpu());  // no copy on the CPU
  write_safetensors(path,
                    {{"exp_avg", DType::kF32, {numel_}, m.raw_data()},
                     {"exp_avg_sq", DType::kF32, {numel_}, v.raw_data()}},
                    {{"step", std::to_string(step_)}, {"optimizer", "adamw"}});
}

void AdamW::load(const std::string& path) {
  require(!sharded_,
          "AdamW: a sharded optimizer is loaded through an unsharded one (import_moments)");
  const SafetensorsFile f = SafetensorsFile::open(path);
  Tensor m = m_.host_mirror(), v = v_.host_mirror();
  f.read_f32("exp_avg", {numel_}, m.data<float>());
  f.read_f32("exp_avg_sq", {numel_}, v.data<float>());
  // A moment that overflowed would poison every later step: such a file is damaged. (The
  // second moment is a square: negative values are impossible too.)
  const Ops& cpu_ops = ops_for(Device::cpu());
  require(std::isfinite(cpu_ops.sum_squares(m.data<float>(), static_cast<size_t>(numel_))), path,
          ": exp_avg holds non-finite values (NaN or infinity)");
  require(std::isfinite(cpu_ops.sum_squares(v.data<float>(), static_cast<size_t>(numel_))), path,
          ": exp_avg_sq holds non-finite values (NaN or infinity)");
  m_.copy_from(m);
  v_.copy_from(v);
  auto it = f.metadata().find("step");
  require(it != f.metadata().end(), path, ": missing metadata 'step'");
  try {
    step_ = std::stol(it->second);
  } catch (const std::exception&) {
    throw Error(cat(path, ": metadata 'step' is not a number: ", it->second));
  }
  require(step_ >= 0, path, ": metadata 'step' is negative");
}

const char* lr_decay_name(LrDecay decay) {
  switch (decay) {
    case LrDecay::kCosine:
      return "cosine";
    case LrDecay::kLinear:
      return "linear";
    case LrDecay::kConstant:
      return "constant";
  }
  return "?";
}

std::optional<LrDecay> lr_decay_from_name(std::string_view name) {
  for (LrDecay d : {LrDecay::kCosine, LrDecay::kLinear, LrDecay::kConstant}) {
    if (name == lr_decay_name(d)) return d;
  }
  return std::nullopt;
}

float LrSchedule::at(long step) const {
  if (warmup_steps > 0 && step < warmup_steps) {
    return max_lr * static_cast<float>(step + 1) / static_cast<float>(warmup_steps);
  }
  if (decay == LrDecay::kConstant || total_steps <= warmup_steps) return max_lr;
  double ratio =
      static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
  ratio = ratio < 0.0 ? 0.0 : (ratio > 1.0 ? 1.0 : ratio);
  const double coeff =
      decay == LrDecay::kCosine ? 0.5 * (1.0 + std::cos(M_PI * ratio)) : 1.0 - ratio;
  return static_cast<float>(min_lr + coeff * (max_lr - min_lr));
}

float clip_grad_norm(float* grads, size_t n, float max_norm, Device device) {
  const Ops& ops = ops_for(device);
  const float norm = static_cast<float>(std::sqrt(ops.sum_squares(grads, n)));
  if (max_norm > 0.0f && norm > max_norm) ops.scale(grads, max_norm / (norm + 1e-6f), n);
  return norm;
}

}  // namespace tandem
