#include "runtime/transformer.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/kernels.h"
#include "runtime/ops.h"
#include "runtime/random.h"
#include "runtime/transformer_dims.h"

namespace tandem {

using detail::Dims;

namespace {
// The slices of one layer's saved activations.
struct LayerActs {
  float *x, *x_mid, *x_out, *ln1, *ln2, *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd;
  float *qkv, *att, *lse, *fc_pre, *fc_act;
};
}  // namespace

// Activations saved by forward for backward, plus backward scratch. Sized for one (B, T).
struct Transformer::Activations {
  LayerActs layer(int l, const Dims& d) const {
    const size_t N = static_cast<size_t>(B) * T, NC = N * d.C;
    return {residual.data<float>() + l * NC,
            residual_mid.data<float>() + l * NC,
            residual.data<float>() + (l + 1) * NC,
            ln1.data<float>() + l * NC,
            ln2.data<float>() + l * NC,
            ln1_mean.data<float>() + l * N,
            ln1_rstd.data<float>() + l * N,
            ln2_mean.data<float>() + l * N,
            ln2_rstd.data<float>() + l * N,
            qkv.data<float>() + l * N * d.QKV,
            att.data<float>() + l * N * d.HD,
            att_lse.data<float>() + l * N * d.H,
            fc_pre.data<float>() + l * N * d.UP,
            fc_act.data<float>() + l * N * d.F};
  }

  int B = 0, T = 0;
  Tensor tokens, targets, positions;  // I32 [B*T] on the model's device
  bool has_targets = false;
  int num_targets = 0;
  Tensor residual;      // [L+1, N, C]: input of each layer, then the final residual stream
  Tensor residual_mid;  // [L, N, C]: after attention
  Tensor ln1, ln2;      // [L, N, C]
  Tensor ln1_mean, ln1_rstd, ln2_mean, ln2_rstd;  // [L, N]
  Tensor qkv;                                     // [L, N, (H + 2 KV) D] (q and k after RoPE)
  Tensor att;                                     // [L, N, H D]
  Tensor att_lse;                                 // [L, B, H, T]
  Tensor fc_pre;                   // [L, N, F] (GPT-2) or [L, N, 2F] (gate|up, Llama)
  Tensor fc_act;                   // [L, N, F]
  Tensor lnf, lnf_mean, lnf_rstd;  // [N, C], [N], [N]
  Tensor logits;                   // [N, V]; holds dlogits after backward
  Tensor ce_lse, losses;           // [N]
  // Backward scratch, reused across layers.
  Tensor d_residual, d_ln, d_qkv, d_att, d_fc_pre, d_fc_act, scratch;
};

struct Transformer::ActivationBuffer {
  Tensor Activations::*member;
  Shape shape;
  DType dtype;
};

Transformer::Transformer(const ModelConfig& config, Device device, Communicator* tp)
    : config_(config), tp_(tp), device_(device), ops_(&ops_for(device)) {
  config_.validate();
  if (tp_ != nullptr) {
    tp_size_ = tp_->size();
    tp_rank_ = tp_->rank();
  }
  if (tp_size_ > 1) {
    check_tensor_parallel(config_, tp_size_);
    require(device_.is_cpu() && tp_->device().is_cpu(),
            "tensor parallelism runs on CPU models over a host tp group (got the model on ",
            device_.str(), ")");
  }
  build_layout();
  params_ = Tensor::zeros({layout_.total_numel()}, DType::kF32, device_);
  if (config_.is_llama()) {
    const int half = config_.head_dim() / 2;
    Tensor cos_table = Tensor::empty({static_cast<int64_t>(config_.max_seq_len) * half});
    Tensor sin_table = Tensor::empty(cos_table.shape());
    cpu::rope_tables(cos_table.data<float>(), sin_table.data<float>(), config_.max_seq_len,
                     config_.head_dim(), config_.rope_theta);
    rope_cos_ = cos_table.to(device_);
    rope_sin_ = sin_table.to(device_);
  }
}

void Transformer::check_tensor_parallel(const ModelConfig& c, int tp) {
  require(tp >= 1, "tensor parallelism: parallel.tp must be >= 1, got ", tp);
  require(c.n_head % tp == 0, "tensor parallelism: n_head = ", c.n_head,
          " does not divide by parallel.tp = ", tp);
  require(c.n_kv_head % tp == 0, "tensor parallelism: n_kv_head = ", c.n_kv_head,
          " does not divide by parallel.tp = ", tp);
  require(c.ffn_hidden % tp == 0, "tensor parallelism: ffn_hidden = ", c.ffn_hidden,
          " does not divide by parallel.tp = ", tp);
}

Transformer::Transformer(const ModelConfig& config, LayoutOnly, int tp)
    : config_(config), tp_size_(tp), device_(Device::cpu()), ops_(nullptr) {
  config_.validate();
  check_tensor_parallel(config_, tp);
  build_layout();
}

ParamLayout Transformer::hf_layout(const ModelConfig& config) {
  return Transformer(config, LayoutOnly{}, 1).full_layout();
}

int64_t Transformer::parameter_count(const ModelConfig& config, int tp) {
  return Transformer(config, LayoutOnly{}, tp).num_parameters();
}

std::vector<std::pair<int64_t, int64_t>> Transformer::gradient_segments(const ModelConfig& config,
                                                                        int tp) {
  return Transformer(config, LayoutOnly{}, tp).gradient_segments();
}

int64_t Transformer::activation_bytes(const ModelConfig& config, int B, int T, int tp) {
  const int64_t V = Transformer(config, LayoutOnly{}, tp).vocab_local();
  int64_t bytes = 0;
  for (const ActivationBuffer& b : activation_buffers(config, tp, V, B, T)) {
    bytes += shape_numel(b.shape) * static_cast<int64_t>(dtype_size(b.dtype));
  }
  return bytes;
}

void Transformer::build_layout() {
  const ModelConfig& c = config_;
  const int64_t C = c.n_embd, V = c.vocab_size, F = c.ffn_hidden, D = c.head_dim();
  const int64_t Q = c.n_head * D, KVD = c.n_kv_head * D;
  const int tp = tp_size_;
  // The vocabulary is padded only when tp does not divide it (to a multiple of tp * 64, the
  // Megatron rule, so every slice stays a multiple of 64).
  const int64_t padded = V % tp == 0 ? V : (V + tp * 64 - 1) / (tp * 64) * (tp * 64);
  vocab_local_ = static_cast<int>(padded / tp);
  // Adds a parameter given its global shape to both tables; a split dimension is divided by tp
  // (the vocabulary's padded extent for embeddings and the LM head).
  auto add = [&](const std::string& name, const Shape& global, ParamKind kind, int split = -1,
                 int blocks = 1) {
    full_layout_.add(name, global, kind, split, global, blocks);
    Shape local = global;
    if (split >= 0)
      local[split] = (global[split] == V && split == 0 &&
                      (kind == ParamKind::kEmbedding || name == "lm_head.weight"))
                         ? vocab_local_
                         : global[split] / tp;
    layout_.add(name, local, kind, split, global, blocks);
  };
  auto off = [&](const std::string& name) { return layout_.at(name).offset; };
  layers_.resize(c.n_layer);
  if (!c.is_llama()) {
    add("transformer.wte.weight", {V, C}, ParamKind::kEmbedding, 0);
    add("transformer.wpe.weight", {c.max_seq_len, C}, ParamKind::kEmbedding);
    for (int l = 0; l < c.n_layer; ++l) {
      const std::string p = "transformer.h." + std::to_string(l) + ".";
      add(p + "ln_1.weight", {C}, ParamKind::kNorm);
      add(p + "ln_1.bias", {C}, ParamKind::kBias);
      // [in, out]: c_attn's columns are q|k|v, each split by heads.
      add(p + "attn.c_attn.weight", {C, 3 * C}, ParamKind::kMatrix, 1, 3);
      add(p + "attn.c_attn.bias", {3 * C}, ParamKind::kBias, 0, 3);
      add(p + "attn.c_proj.weight", {C, C}, ParamKind::kMatrix, 0);
      add(p + "attn.c_proj.bias", {C}, ParamKind::kBias);
      add(p + "ln_2.weight", {C}, ParamKind::kNorm);
      add(p + "ln_2.bias", {C}, ParamKind::kBias);
      add(p + "mlp.c_fc.weight", {C, F}, ParamKind::kMatrix, 1);
      add(p + "mlp.c_fc.bias", {F}, ParamKind::kBias, 0);
      add(p + "mlp.c_proj.weight", {F, C}, ParamKind::kMatrix, 0);
      add(p + "mlp.c_proj.bias", {C}, ParamKind::kBias);
      layers_[l] = {
          off(p + "ln_1.weight"),      off(p + "ln_1.bias"),          off(p + "attn.c_attn.weight"),
          off(p + "attn.c_attn.bias"), off(p + "attn.c_proj.weight"), off(p + "attn.c_proj.bias"),
          off(p + "ln_2.weight"),      off(p + "ln_2.bias"),          off(p + "mlp.c_fc.weight"),
          off(p + "mlp.c_fc.bias"),    off(p + "mlp.c_proj.weight"),  off(p + "mlp.c_proj.bias")};
    }
    add("transformer.ln_f.weight", {C}, ParamKind::kNorm);
    add("transformer.ln_f.bias", {C}, ParamKind::kBias);
    wte_ = off("transformer.wte.weight");
    wpe_ = off("transformer.wpe.weight");
    lnf_w_ = off("transformer.ln_f.weight");
    lnf_b_ = off("transformer.ln_f.bias");
  } else {
    add("model.embed_tokens.weight", {V, C}, ParamKind::kEmbedding, 0);
    for (int l = 0; l < c.n_layer; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      add(p + "input_layernorm.weight", {C}, ParamKind::kNorm);
      // q, k, v (and gate, up) are adjacent so the forward runs them as one fused GEMM; each is
      // split by rows ([out, in]), so a rank's slices stay adjacent too.
      add(p + "self_attn.q_proj.weight", {Q, C}, ParamKind::kMatrix, 0);
      add(p + "self_attn.k_proj.weight", {KVD, C}, ParamKind::kMatrix, 0);
      add(p + "self_attn.v_proj.weight", {KVD, C}, ParamKind::kMatrix, 0);
      add(p + "self_attn.o_proj.weight", {C, Q}, ParamKind::kMatrix, 1);
      add(p + "post_attention_layernorm.weight", {C}, ParamKind::kNorm);
      add(p + "mlp.gate_proj.weight", {F, C}, ParamKind::kMatrix, 0);
      add(p + "mlp.up_proj.weight", {F, C}, ParamKind::kMatrix, 0);
      add(p + "mlp.down_proj.weight", {C, F}, ParamKind::kMatrix, 1);
      layers_[l] = {off(p + "input_layernorm.weight"),
                    -1,
                    off(p + "self_attn.q_proj.weight"),
                    -1,
                    off(p + "self_attn.o_proj.weight"),
                    -1,
                    off(p + "post_attention_layernorm.weight"),
                    -1,
                    off(p + "mlp.gate_proj.weight"),
                    -1,
                    off(p + "mlp.down_proj.weight"),
                    -1};
    }
    add("model.norm.weight", {C}, ParamKind::kNorm);
    wte_ = off("model.embed_tokens.weight");
    lnf_w_ = off("model.norm.weight");
  }
  if (c.tie_embeddings) {
    lm_head_ = wte_;
  } else {
    add("lm_head.weight", {V, C}, ParamKind::kMatrix, 0);
    lm_head_ = off("lm_head.weight");
  }
}

namespace {
// Copies between a rank's slice (`local`, laid out as spec.shape) and the whole tensor (`full`,
// spec.global_shape) of rank `rank` of `tp`. to_full: local -> full (padding dropped); else
// full -> local (padding zeroed).
void copy_slice(const ParamSpec& spec, int rank, int tp, float* full, float* local, bool to_full) {
  if (spec.tp_split_dim < 0 || tp == 1) {
    if (to_full) {
      std::memcpy(full, local, sizeof(float) * spec.numel);
    } else {
      std::memcpy(local, full, sizeof(float) * spec.numel);
    }
    return;
  }
  const int s = spec.tp_split_dim;
  const Shape& g = spec.global_shape;
  // View both as [rows, cols]; along s the local extent is `lext` of `blocks` blocks.
  const int64_t lrows = spec.shape[0], lcols = spec.shape.size() > 1 ? spec.shape[1] : 1;
  const int64_t gcols = g.size() > 1 ? g[1] : 1;
  const int64_t lext = spec.shape[s], gext = g[s], lb = lext / spec.tp_blocks;
  const int64_t gb = lb * tp;  // a block's (padded) global extent
  auto global_index = [&](int64_t j) {
    return (j / lb) * gb + static_cast<int64_t>(rank) * lb + j % lb;  // may be >= gext (padding)
  };
  if (s == 0) {
    for (int64_t i = 0; i < lrows; ++i) {
      const int64_t gi = global_index(i);
      float* l = local + i * lcols;
      if (gi >= gext) {
        if (!to_full) std::fill(l, l + lcols, 0.0f);
        continue;
      }
      float* f = full + gi * gcols;
      if (to_full) {
        std::memcpy(f, l, sizeof(float) * lcols);
      } else {
        std::memcpy(l, f, sizeof(float) * lcols);
      }
    }
  } else {
    for (int64_t i = 0; i < lrows; ++i) {
      for (int64_t j = 0; j < lcols; ++j) {
        const int64_t gj = global_index(j);
        float& l = local[i * lcols + j];
        if (gj >= gext) {
          if (!to_full) l = 0.0f;
          continue;
        }
        float& f = full[i * gcols + gj];
        if (to_full) {
          f = l;
        } else {
          l = f;
        }
      }
    }
  }
}
}  // namespace

Tensor Transformer::gather_full(const Tensor& local) const {
  require(local.numel() == layout_.total_numel(), "gather_full: a buffer of ", local.numel(),
          " elements is not a flat buffer of this model (", layout_.total_numel(), ")");
  const Tensor host = local.to(Device::cpu());
  Tensor full = Tensor::empty({full_layout_.total_numel()});
  if (tp_size_ == 1) {
    std::memcpy(full.raw_data(), host.raw_data(), host.nbytes());
    return full;
  }
  const int64_t n = layout_.total_numel();
  std::vector<float> all(static_cast<size_t>(n) * tp_size_);
  tp_->all_gather(host.raw_data(), all.data(), static_cast<size_t>(n), DType::kF32);
  for (const ParamSpec& s : layout_.specs()) {
    const ParamSpec& f = full_layout_.at(s.name);
    const int ranks = replicated(s) ? 1 : tp_size_;  // replicated: rank 0's copy
    for (int r = 0; r < ranks; ++r) {
      copy_slice(s, r, tp_size_, full.data<float>() + f.offset, all.data() + r * n + s.offset,
                 true);
    }
  }
  return full;
}

void Transformer::scatter_full(const float* full, Tensor& local) const {
  require(local.numel() == layout_.total_numel(), "scatter_full: a buffer of ", local.numel(),
          " elements is not a flat buffer of this model (", layout_.total_numel(), ")");
  Tensor host = local.host_mirror();
  for (const ParamSpec& s : layout_.specs()) {
    const ParamSpec& f = full_layout_.at(s.name);
    copy_slice(s, tp_rank_, tp_size_, const_cast<float*>(full) + f.offset,
               host.data<float>() + s.offset, false);
  }
  local.copy_from(host);
}

void Transformer::tp_all_reduce(float* buffer, size_t count) const {
  if (tp_size_ > 1) tp_->all_reduce(buffer, count, DType::kF32, ReduceOp::kSum);
}

Tensor& Transformer::grads() {
  if (!grads_.defined()) grads_ = Tensor::zeros({layout_.total_numel()}, DType::kF32, device_);
  return grads_;
}

Tensor Transformer::param(const std::string& name) const {
  const ParamSpec& s = layout_.at(name);
  return params_.flat_view(s.offset, s.shape);
}

Tensor Transformer::grad(const std::string& name) {
  const ParamSpec& s = layout_.at(name);
  return grads().flat_view(s.offset, s.shape);
}

void Transformer::init_weights(uint64_t seed) {
  // The whole tensors are drawn in the full layout's order, then each rank keeps its slice, so
  // every tp starts from the same weights.
  Rng rng(seed);
  const float residual_std = config_.init_std / std::sqrt(2.0f * config_.n_layer);
  Tensor full = Tensor::empty({full_layout_.total_numel()});
  float* p = full.data<float>();
  for (const ParamSpec& s : full_layout_.specs()) {
    float* w = p + s.offset;
    switch (s.kind) {
      case ParamKind::kNorm:
        std::fill(w, w + s.numel, 1.0f);
        break;
      case ParamKind::kBias:
        std::fill(w, w + s.numel, 0.0f);
        break;
      default: {
        const bool residual_out =
            s.name.ends_with("attn.c_proj.weight") || s.name.ends_with("mlp.c_proj.weight") ||
            s.name.ends_with("o_proj.weight") || s.name.ends_with("down_proj.weight");
        rng.fill_normal(w, s.numel, 0.0f, residual_out ? residual_std : config_.init_std);
      }
    }
  }
  scatter_full(p, params_);
}

std::vector<Transformer::ActivationBuffer> Transformer::activation_buffers(const ModelConfig& c,
                                                                           int tp, int64_t V, int B,
                                                                           int T) {
  const Dims d(c, tp);
  const int64_t N = static_cast<int64_t>(B) * T, L = c.n_layer;
  const int64_t C = d.C, QKV = d.QKV, HD = d.HD, UP = d.UP, F = d.F;
  const DType f32 = DType::kF32, i32 = DType::kI32;
  using A = Activations;
  return {
      {&A::positions, {N}, i32},
      {&A::tokens, {N}, i32},
      {&A::targets, {N}, i32},
      {&A::residual, {L + 1, N, C}, f32},
      {&A::residual_mid, {L, N, C}, f32},
      {&A::ln1, {L, N, C}, f32},
      {&A::ln2, {L, N, C}, f32},
      {&A::ln1_mean, {L, N}, f32},
      {&A::ln1_rstd, {L, N}, f32},
      {&A::ln2_mean, {L, N}, f32},
      {&A::ln2_rstd, {L, N}, f32},
      {&A::qkv, {L, N, QKV}, f32},
      {&A::att, {L, N, HD}, f32},
      {&A::att_lse, {L, B, d.H, T}, f32},
      {&A::fc_pre, {L, N, UP}, f32},
      {&A::fc_act, {L, N, F}, f32},
      {&A::lnf, {N, C}, f32},
      {&A::lnf_mean, {N}, f32},
      {&A::lnf_rstd, {N}, f32},
      {&A::logits, {N, V}, f32},
      {&A::ce_lse, {N}, f32},
      {&A::losses, {N}, f32},
      {&A::d_residual, {N, C}, f32},
      {&A::d_ln, {N, C}, f32},
      {&A::d_qkv, {N, QKV}, f32},
      {&A::d_att, {N, HD}, f32},
      {&A::d_fc_pre, {N, UP}, f32},
      {&A::d_fc_act, {N, F}, f32},
      {&A::scratch, {N, C}, f32},
  };
}

void Transformer::ensure_activations(int B, int T) {
  if (acts_ && acts_->B == B && acts_->T == T) return;
  acts_.reset();  // free the old set before allocating the new one
  auto a = std::make_shared<Activations>();
  a->B = B;
  a->T = T;
  for (const ActivationBuffer& b : activation_buffers(config_, tp_size_, vocab_local_, B, T)) {
    (*a).*(b.member) = Tensor::empty(b.shape, b.dtype, device_);
  }
  Tensor positions = a->positions.host_mirror();
  const int64_t N = static_cast<int64_t>(B) * T;
  for (int64_t i = 0; i < N; ++i) positions.data<int32_t>()[i] = static_cast<int32_t>(i % T);
  a->positions.copy_from(positions);
  acts_ = std::move(a);
}

void Transformer::norm_forward(float* out, float* mean, float* rstd, const float* inp,
                               const float* p, int64_t w, int64_t b, int N) const {
  if (config_.is_llama()) {
    ops_->rmsnorm_forward(out, rstd, inp, p + w, N, config_.n_embd, config_.norm_eps);
  } else {
    ops_->layernorm_forward(out, mean, rstd, inp, p + w, p + b, N, config_.n_embd,
                            config_.norm_eps);
  }
}

void Transformer::norm_backward(float* dinp, const float* dout, const float* inp, const float* mean,
                                const float* rstd, int64_t w, float* dw, float* db, int N) {
  const float* p = params_.data<float>();
  if (config_.is_llama()) {
    ops_->rmsnorm_backward(dinp, dw, dout, inp, p + w, rstd, N, config_.n_embd);
  } else {
    ops_->layernorm_backward(dinp, dw, db, dout, inp, p + w, mean, rstd, N, config_.n_embd);
  }
}

namespace {
// Copies dst.numel() int32 values from host memory into dst (on any device).
void upload(Tensor& dst, const int32_t* src) {
  Tensor host = dst.host_mirror();
  std::memcpy(host.raw_data(), src, dst.nbytes());
  dst.copy_from(host);
}
}  // namespace

float Transformer::forward(const int32_t* tokens, const int32_t* targets, int B, int T) {
  const ModelConfig& c = config_;
  require(B > 0 && T > 0, "forward: batch size and sequence length must be > 0 (got B=", B,
          ", T=", T, ")");
  require(T <= c.max_seq_len, "forward: sequence length ", T, " exceeds the model's maximum ",
          c.max_seq_len);
  const int N = B * T;
  for (int i = 0; i < N; ++i) {
    require(tokens[i] >= 0 && tokens[i] < c.vocab_size, "forward: token id ", tokens[i],
            " at position ", i, " is outside the vocabulary [0, ", c.vocab_size, ")");
    if (targets != nullptr) {
      require(targets[i] >= -1 && targets[i] < c.vocab_size, "forward: target id ", targets[i],
              " at position ", i, " is outside the vocabulary [0, ", c.vocab_size,
              ") (-1 = ignore)");
    }
  }
  ensure_activations(B, T);
  Activations& a = *acts_;
  upload(a.tokens, tokens);
  a.has_targets = targets != nullptr;
  if (a.has_targets) upload(a.targets, targets);

  const Dims d(c, tp_size_);
  const int C = d.C, H = d.H, KV = d.KV, D = d.D, QKV = d.QKV, HD = d.HD, F = d.F, UP = d.UP;
  const bool llama = d.llama;
  const WeightLayout wl = d.layout;
  const float* p = params_.data<float>();
  auto bias = [&](int64_t off) { return off >= 0 ? p + off : nullptr; };
  // A row-parallel GEMM's bias is added by one rank, before the all-reduce.
  auto row_bias = [&](int64_t off) { return tp_rank_ == 0 ? bias(off) : nullptr; };
  const size_t NC = static_cast<size_t>(N) * C;

  if (tp_size_ > 1) {
    tp_embedding_forward(a.residual.data<float>(), tokens, a.positions.data<int32_t>(), N);
  } else {
    ops_->embedding_forward(a.residual.data<float>(), a.tokens.data<int32_t>(),
                            a.positions.data<int32_t>(), p + wte_, llama ? nullptr : p + wpe_, N,
                            C);
  }
  for (int l = 0; l < c.n_layer; ++l) {
    const LayerOffsets& o = layers_[l];
    const LayerActs la = a.layer(l, d);
    float *x = la.x, *x_mid = la.x_mid, *x_out = la.x_out, *ln1 = la.ln1, *ln2 = la.ln2;
    float *qkv = la.qkv, *att = la.att, *lse = la.lse, *fc_pre = la.fc_pre, *fc_act = la.fc_act;
    float* scratch = a.scratch.data<float>();

    norm_forward(ln1, la.ln1_mean, la.ln1_rstd, x, p, o.ln1_w, o.ln1_b, N);
    ops_->matmul_forward(qkv, ln1, p + o.qkv_w, bias(o.qkv_b), N, C, QKV, wl);
    if (llama) {
      ops_->rope_forward(qkv, a.positions.data<int32_t>(), rope_cos_.data<float>(),
                         rope_sin_.data<float>(), N, H, D, QKV);
      ops_->rope_forward(qkv + HD, a.positions.data<int32_t>(), rope_cos_.data<float>(),
                         rope_sin_.data<float>(), N, KV, D, QKV);
    }
    ops_->attention_forward(att, lse, qkv, B, T, H, KV, D);
    ops_->matmul_forward(scratch, att, p + o.attn_out_w, row_bias(o.attn_out_b), N, HD, C, wl);
    tp_all_reduce(scratch, NC);
    ops_->add(x_mid, x, scratch, NC);

    norm_forward(ln2, la.ln2_mean, la.ln2_rstd, x_mid, p, o.ln2_w, o.ln2_b, N);
    ops_->matmul_forward(fc_pre, ln2, p + o.up_w, bias(o.up_b), N, C, UP, wl);
    if (llama) {
      ops_->swiglu_forward(fc_act, fc_pre, N, F);
    } else {
      ops_->gelu_forward(fc_act, fc_pre, static_cast<size_t>(N) * F);
    }
    ops_->matmul_forward(scratch, fc_act, p + o.down_w, row_bias(o.down_b), N, F, C, wl);
    tp_all_reduce(scratch, NC);
    ops_->add(x_out, x_mid, scratch, NC);
  }
  const float* x_final = a.residual.data<float>() + c.n_layer * NC;
  norm_forward(a.lnf.data<float>(), a.lnf_mean.data<float>(), a.lnf_rstd.data<float>(), x_final, p,
               lnf_w_, lnf_b_, N);
  ops_->matmul_forward(a.logits.data<float>(), a.lnf.data<float>(), p + lm_head_, nullptr, N, C,
                       vocab_local_, WeightLayout::kOutIn);
  if (!a.has_targets) {
    a.num_targets = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  a.num_targets = tp_size_ > 1
                      ? tp_cross_entropy_forward(N)
                      : ops_->cross_entropy_forward(a.losses.data<float>(), a.ce_lse.data<float>(),
                                                    a.logits.data<float>(),
                                                    a.targets.data<int32_t>(), N, c.vocab_size);
  if (a.num_targets == 0) return std::numeric_limits<float>::quiet_NaN();
  double total = 0.0;
  const Tensor host_losses = a.losses.to(Device::cpu());
  const float* losses = host_losses.data<float>();
  for (int i = 0; i < N; ++i) total += losses[i];
  return static_cast<float>(total / a.num_targets);
}

void Transformer::backward() {
  require(acts_ && acts_->has_targets, "backward: call forward with targets first");
  Activations& a = *acts_;
  const ModelConfig& c = config_;
  const int B = a.B, T = a.T, N = B * T;
  const Dims d(c, tp_size_);
  const int C = d.C, H = d.H, KV = d.KV, D = d.D, QKV = d.QKV, HD = d.HD, F = d.F, UP = d.UP;
  const bool llama = d.llama;
  const WeightLayout wl = d.layout;
  const size_t NC = static_cast<size_t>(N) * C;
  const float* p = params_.data<float>();
  // The gradient memory of one segment (see set_gradient_sink): grads() or the sink's.
  struct Segment {
    int64_t begin = 0;
    float* data = nullptr;
    float* at(int64_t off) const { return off >= 0 ? data + (off - begin) : nullptr; }
  };
  float* const whole = gradient_sink_ ? nullptr : grads().data<float>();
  auto segment = [&](int64_t begin, int64_t end) {
    return Segment{begin, whole != nullptr ? whole + begin : gradient_sink_(begin, end)};
  };
  const int64_t total = layout_.total_numel();
  const int64_t embeddings_end = layers_.empty() ? lnf_w_ : layers_[0].ln1_w;
  const Segment head = segment(lnf_w_, total);
  // A tied LM head writes into wte's gradient now; the embeddings finish it at the end.
  const Segment embeddings = c.tie_embeddings ? segment(0, embeddings_end) : Segment{};
  const Segment& lm_head_grad = lm_head_ >= lnf_w_ ? head : embeddings;

  float* dlogits = a.logits.data<float>();  // overwritten in place
  const float dloss = a.num_targets > 0 ? 1.0f / a.num_targets : 0.0f;
  if (tp_size_ > 1) {
    tp_cross_entropy_backward(dloss, N);
  } else {
    ops_->cross_entropy_backward(dlogits, a.logits.data<float>(), a.ce_lse.data<float>(),
                                 a.targets.data<int32_t>(), dloss, N, c.vocab_size);
  }
  float* d_ln = a.d_ln.data<float>();
  float* d_res = a.d_residual.data<float>();
  // Column-parallel GEMMs (the LM head, QKV, the MLP's up): each rank's input gradient is a
  // partial sum over its columns, all-reduced before it flows on.
  ops_->matmul_backward(d_ln, lm_head_grad.at(lm_head_), nullptr, dlogits, a.lnf.data<float>(),
                        p + lm_head_, N, C, vocab_local_, WeightLayout::kOutIn);
  tp_all_reduce(d_ln, NC);
  a.d_residual.zero();
  norm_backward(d_res, d_ln, a.residual.data<float>() + c.n_layer * NC, a.lnf_mean.data<float>(),
                a.lnf_rstd.data<float>(), lnf_w_, head.at(lnf_w_), head.at(lnf_b_), N);
  // The final norm (and an untied LM head) sit after the last layer in the flat buffer.
  if (gradients_ready_) gradients_ready_(lnf_w_);

  float* d_qkv = a.d_qkv.data<float>();
  float* d_att = a.d_att.data<float>();
  float* d_fc_pre = a.d_fc_pre.data<float>();
  float* d_fc_act = a.d_fc_act.data<float>();
  for (int l = c.n_layer - 1; l >= 0; --l) {
    const LayerOffsets& o = layers_[l];
    const Segment g = segment(o.ln1_w, l + 1 < c.n_layer ? layers_[l + 1].ln1_w : lnf_w_);
    const LayerActs la = a.layer(l, d);
    const float *x = la.x, *x_mid = la.x_mid, *ln1 = la.ln1, *ln2 = la.ln2, *qkv = la.qkv;
    const float *att = la.att, *lse = la.lse, *fc_pre = la.fc_pre, *fc_act = la.fc_act;

    // MLP block: x_out = x_mid + down(act(up(norm2(x_mid)))); d_res holds d x_out.
    ops_->matmul_backward(d_fc_act, g.at(o.down_w), g.at(o.down_b), d_res, fc_act, p + o.down_w,
                          N, F, C, wl);
    if (llama) {
      ops_->swiglu_backward(d_fc_pre, d_fc_act, fc_pre, N, F);
    } else {
      ops_->gelu_backward(d_fc_pre, fc_pre, d_fc_act, static_cast<size_t>(N) * F);
    }
    ops_->matmul_backward(d_ln, g.at(o.up_w), g.at(o.up_b), d_fc_pre, ln2, p + o.up_w, N, C, UP,
                          wl);
    tp_all_reduce(d_ln, NC);
    norm_backward(d_res, d_ln, x_mid, la.ln2_mean, la.ln2_rstd, o.ln2_w, g.at(o.ln2_w),
                  g.at(o.ln2_b), N);

    // Attention block: x_mid = x + out_proj(attention(rope(qkv(norm1(x))))).
    ops_->matmul_backward(d_att, g.at(o.attn_out_w), g.at(o.attn_out_b), d_res, att,
                          p + o.attn_out_w, N, HD, C, wl);
    ops_->attention_backward(d_qkv, d_att, qkv, att, lse, B, T, H, KV, D);
    if (llama) {
      ops_->rope_backward(d_qkv, a.positions.data<int32_t>(), rope_cos_.data<float>(),
                          rope_sin_.data<float>(), N, H, D, QKV);
      ops_->rope_backward(d_qkv + HD, a.positions.data<int32_t>(), rope_cos_.data<float>(),
                          rope_sin_.data<float>(), N, KV, D, QKV);
    }
    ops_->matmul_backward(d_ln, g.at(o.qkv_w), g.at(o.qkv_b), d_qkv, ln1, p + o.qkv_w, N, C, QKV,
                          wl);
    tp_all_reduce(d_ln, NC);
    norm_backward(d_res, d_ln, x, la.ln1_mean, la.ln1_rstd, o.ln1_w, g.at(o.ln1_w), g.at(o.ln1_b),
                  N);
    if (gradients_ready_) gradients_ready_(o.ln1_w);  // a layer's first parameter
  }
  const Segment e = c.tie_embeddings ? embeddings : segment(0, embeddings_end);
  if (tp_size_ > 1) {
    tp_embedding_backward(e.at(wte_), e.at(wpe_), d_res, a.tokens.data<int32_t>(),
                          a.positions.data<int32_t>(), N);
  } else {
    ops_->embedding_backward(e.at(wte_), llama ? nullptr : e.at(wpe_), d_res,
                             a.tokens.data<int32_t>(), a.positions.data<int32_t>(), N, C);
  }
  if (gradients_ready_) gradients_ready_(0);
  a.has_targets = false;  // the logits buffer now holds gradients
}

std::vector<std::pair<int64_t, int64_t>> Transformer::gradient_segments() const {
  std::vector<std::pair<int64_t, int64_t>> segments;
  segments.emplace_back(lnf_w_, layout_.total_numel());
  for (int l = config_.n_layer - 1; l >= 0; --l) {
    segments.emplace_back(layers_[l].ln1_w,
                          l + 1 < config_.n_layer ? layers_[l + 1].ln1_w : lnf_w_);
  }
  segments.emplace_back(0, layers_.empty() ? lnf_w_ : layers_[0].ln1_w);
  return segments;
}

void Transformer::zero_grad() {
  ops_->zero(grads().data<float>(), static_cast<size_t>(grads_.numel()));
}

Tensor Transformer::logits() const {
  require(acts_ != nullptr, "logits: no forward pass has run");
  return acts_->logits;
}

Tensor Transformer::gather_logits() const {
  require(acts_ != nullptr, "gather_logits: no forward pass has run");
  const int64_t N = static_cast<int64_t>(acts_->B) * acts_->T, V = config_.vocab_size;
  const int64_t VL = vocab_local_;
  const Tensor local = acts_->logits.to(Device::cpu());
  if (tp_size_ == 1) return local.clone();
  std::vector<float> all(static_cast<size_t>(N * VL) * tp_size_);
  tp_->all_gather(local.raw_data(), all.data(), static_cast<size_t>(N * VL), DType::kF32);
  Tensor full = Tensor::empty({N, V});
  for (int r = 0; r < tp_size_; ++r) {
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t j = 0; j < VL && r * VL + j < V; ++j) {
        full.data<float>()[i * V + r * VL + j] = all[(r * N + i) * VL + j];
      }
    }
  }
  return full;
}

// --- Tensor-parallel pieces (host loops: a tp model is on the CPU) ---

void Transformer::tp_embedding_forward(float* out, const int32_t* tokens, const int32_t* positions,
                                       int N) {
  // Each rank looks up the tokens of its vocabulary slice (zero rows for the others); the sum
  // over ranks is then the lookup (x + 0 = x: exact), and the replicated wpe is added after.
  const int C = config_.n_embd;
  const int64_t first = static_cast<int64_t>(tp_rank_) * vocab_local_;
  const float* wte = params_.data<float>() + wte_;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    float* o = out + static_cast<size_t>(n) * C;
    const int64_t t = tokens[n] - first;
    if (t >= 0 && t < vocab_local_) {
      std::memcpy(o, wte + t * C, sizeof(float) * C);
    } else {
      std::fill(o, o + C, 0.0f);
    }
  }
  tp_all_reduce(out, static_cast<size_t>(N) * C);
  if (wpe_ >= 0) {
    const float* wpe = params_.data<float>() + wpe_;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      float* o = out + static_cast<size_t>(n) * C;
      const float* e = wpe + static_cast<size_t>(positions[n]) * C;
      for (int c = 0; c < C; ++c) o[c] += e[c];
    }
  }
}

void Transformer::tp_embedding_backward(float* dwte, float* dwpe, const float* dout,
                                        const int32_t* tokens, const int32_t* positions, int N) {
  // Rows in row order (deterministic); a rank accumulates only its vocabulary slice.
  const int C = config_.n_embd;
  const int64_t first = static_cast<int64_t>(tp_rank_) * vocab_local_;
  for (int n = 0; n < N; ++n) {
    const float* g = dout + static_cast<size_t>(n) * C;
    const int64_t t = tokens[n] - first;
    if (t >= 0 && t < vocab_local_) {
      float* e = dwte + t * C;
      for (int c = 0; c < C; ++c) e[c] += g[c];
    }
    if (dwpe != nullptr) {
      float* e = dwpe + static_cast<size_t>(positions[n]) * C;
      for (int c = 0; c < C; ++c) e[c] += g[c];
    }
  }
}

int Transformer::tp_cross_entropy_forward(int N) {
  // Vocab-parallel cross-entropy: each rank reduces its slice of a row to (max, sum of exp
  // relative to that max, the target's logit if it holds the target); one all-gather brings
  // every rank's triple, merged in rank order (the same result on every rank).
  Activations& a = *acts_;
  const int V = config_.vocab_size, VL = vocab_local_;
  const int64_t first = static_cast<int64_t>(tp_rank_) * VL;
  const int valid = static_cast<int>(std::min<int64_t>(VL, std::max<int64_t>(0, V - first)));
  const float* logits = a.logits.data<float>();
  const int32_t* targets = a.targets.data<int32_t>();
  std::vector<float> mine(static_cast<size_t>(N) * 3);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* x = logits + static_cast<size_t>(n) * VL;
    float m = -std::numeric_limits<float>::infinity(), sum = 0.0f, target = 0.0f;
    for (int v = 0; v < valid; ++v) m = x[v] > m ? x[v] : m;
    for (int v = 0; v < valid; ++v) sum += std::exp(x[v] - m);
    const int64_t t = targets[n] - first;
    if (targets[n] >= 0 && t >= 0 && t < valid) target = x[t];
    mine[3 * n] = m;
    mine[3 * n + 1] = sum;
    mine[3 * n + 2] = target;
  }
  std::vector<float> all(mine.size() * tp_size_);
  tp_->all_gather(mine.data(), all.data(), mine.size(), DType::kF32);
  float* lse = a.ce_lse.data<float>();
  float* losses = a.losses.data<float>();
  int count = 0;
  for (int n = 0; n < N; ++n) {
    float m = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < tp_size_; ++r) m = std::max(m, all[(r * static_cast<size_t>(N) + n) * 3]);
    float sum = 0.0f;
    for (int r = 0; r < tp_size_; ++r) {
      const float* e = &all[(r * static_cast<size_t>(N) + n) * 3];
      if (e[1] > 0.0f) sum += e[1] * std::exp(e[0] - m);
    }
    lse[n] = m + std::log(sum);
    if (targets[n] >= 0) {
      const int owner = static_cast<int>(targets[n] / VL);
      losses[n] = lse[n] - all[(owner * static_cast<size_t>(N) + n) * 3 + 2];
      ++count;
    } else {
      losses[n] = 0.0f;
    }
  }
  return count;
}

void Transformer::tp_cross_entropy_backward(float dloss, int N) {
  Activations& a = *acts_;
  const int V = config_.vocab_size, VL = vocab_local_;
  const int64_t first = static_cast<int64_t>(tp_rank_) * VL;
  const int valid = static_cast<int>(std::min<int64_t>(VL, std::max<int64_t>(0, V - first)));
  float* x = a.logits.data<float>();  // becomes dlogits in place
  const float* lse = a.ce_lse.data<float>();
  const int32_t* targets = a.targets.data<int32_t>();
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    float* row = x + static_cast<size_t>(n) * VL;
    if (targets[n] < 0) {
      std::fill(row, row + VL, 0.0f);
      continue;
    }
    for (int v = 0; v < valid; ++v) row[v] = std::exp(row[v] - lse[n]) * dloss;
    std::fill(row + valid, row + VL, 0.0f);  // padding: never predicted
    const int64_t t = targets[n] - first;
    if (t >= 0 && t < valid) row[t] -= dloss;
  }
}

double Transformer::flops_per_step(int B, int T) const {
  const ModelConfig& c = config_;
  // Parameters that take part in matmuls: everything but norms, biases and position embeddings;
  // the tied embedding counts once (as the LM head; the lookup is not a matmul).
  double matmul_params = 0;
  for (const ParamSpec& s : layout_.specs()) {
    if (s.kind == ParamKind::kMatrix) matmul_params += static_cast<double>(s.numel);
  }
  // (Under tensor parallelism: this rank's slices, its vocabulary rows and its heads.)
  if (c.tie_embeddings) matmul_params += static_cast<double>(vocab_local_) * c.n_embd;
  const double tokens = static_cast<double>(B) * T;
  // Causal attention: QK^T and PV, each 2*T*T/2*D per head per sequence forward; x3 with backward.
  const double t = T;
  const double attention = 3.0 * 2.0 * 2.0 * B * c.n_layer * (c.n_head / tp_size_) *
                           (t * (t + 1.0) / 2.0) * c.head_dim();
  return 6.0 * matmul_params * tokens + attention;
}

}  // namespace tandem
