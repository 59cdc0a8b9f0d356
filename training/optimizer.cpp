#include "training/optimizer.h"

#include <cmath>

#include "runtime/ops.h"
#include "runtime/safetensors.h"

namespace tandem {

AdamW::AdamW(const ParamLayout& layout, const AdamWConfig& config, Device device)
    : config_(config), ops_(&ops_for(device)) {
  for (const ParamSpec& s : layout.specs()) {
    const float wd = decay_for(s);
    if (!segments_.empty() && segments_.back().weight_decay == wd &&
        segments_.back().offset + segments_.back().numel == s.offset) {
      segments_.back().numel += s.numel;
    } else {
      segments_.push_back({s.offset, s.numel, wd});
    }
  }
  numel_ = layout.total_numel();
  m_ = Tensor::zeros({numel_}, DType::kF32, device);
  v_ = Tensor::zeros({numel_}, DType::kF32, device);
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
    ops_->adamw_step(params + s.offset, grads + s.offset, m + s.offset, v + s.offset,
                     static_cast<size_t>(s.numel), lr, config_.beta1, config_.beta2, config_.eps,
                     s.weight_decay, step_);
  }
}

void AdamW::save(const std::string& path) const {
  const Tensor m = m_.to(Device::cpu()), v = v_.to(Device::cpu());  // no copy on the CPU
  write_safetensors(path,
                    {{"exp_avg", DType::kF32, {numel_}, m.raw_data()},
                     {"exp_avg_sq", DType::kF32, {numel_}, v.raw_data()}},
                    {{"step", std::to_string(step_)}, {"optimizer", "adamw"}});
}

void AdamW::load(const std::string& path) {
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
