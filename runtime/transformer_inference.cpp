// Transformer::forward_paged: the inference forward over a flat batch of token rows through the
// paged KV cache (see runtime/kv_cache.h and the top of runtime/transformer.h).
#include <algorithm>
#include <cstring>

#include "kernels/cpu/kernels.h"
#include "runtime/ops.h"
#include "runtime/transformer.h"
#include "runtime/transformer_dims.h"

namespace tandem {

namespace {
// One matrix as the inference kernels read it: f32 [out, in] for sgemm/cuBLAS (it also makes
// OpenBLAS's batch-1 sgemv the fast, non-transposed one), or panels for the batch-invariant CPU
// kernel (cpu::pack_linear_f32), or bf16 (CPU panels, CUDA [out, in]).
struct InferenceMatrix {
  Tensor storage;  // empty when the parameters are read in place
  const float* f32 = nullptr;
  const float* packed = nullptr;
  const uint16_t* bf16 = nullptr;
};
}  // namespace

struct Transformer::InferenceState {
  struct Layer {
    InferenceMatrix qkv, attn_out, up, down;
  };
  InferenceOptions options;
  std::vector<Layer> layers;
  InferenceMatrix lm_head;
  // Buffers for max_batched_tokens rows (R = max_logit_rows).
  Tensor x, ln, mean, rstd, qkv, att, tmp, fc_pre, fc_act;  // [cap, ...]
  Tensor last, lnf, lnf_mean, lnf_rstd, logits;             // [R, ...] (logits: this rank's vocab)
  // Tensor parallelism: every rank's logit slices (all-gathered), and the whole [R, vocab].
  std::vector<float> gathered;
  Tensor full_logits;
  // I32 step arrays on the device: tokens, positions, row_seq, slots [cap]; logit_rows [R].
  Tensor tokens, positions, row_seq, slots, logit_rows;
  Tensor block_tables;  // grown on demand
};

void Transformer::build_inference_weights(InferenceState& s, bool refresh) {
  const InferenceOptions& options = s.options;
  const ModelConfig& c = config_;
  const detail::Dims d(c, tp_size_);
  const int64_t C = d.C, QKV = d.QKV, HD = d.HD, F = d.F, UP = d.UP, V = vocab_local_;
  const Tensor host_params = params_.to(Device::cpu());
  const float* hp = host_params.data<float>();
  // The out x in matrix at `offset`, stored [in, out] (GPT-2's Conv1D) or [out, in], in the
  // form the options ask for. A refresh writes into the storage built before (same shapes, no
  // allocation of the weights' copies).
  const bool packed = device_.is_cpu() && (options.bf16_weights || options.batch_invariant);
  auto matrix = [&](InferenceMatrix& m, int64_t offset, int64_t out, int64_t in,
                    bool stored_in_out) {
    if (!stored_in_out && !packed && device_.is_cpu()) {
      m.f32 = params_.data<float>() + offset;  // already [out, in]: read in place
      return;
    }
    Tensor t = Tensor::empty({out, in});
    float* dst = t.data<float>();
    const float* src = hp + offset;
    if (stored_in_out) {
      for (int64_t i = 0; i < in; ++i)
        for (int64_t o = 0; o < out; ++o) dst[o * in + i] = src[i * out + o];
    } else {
      std::memcpy(dst, src, sizeof(float) * out * in);
    }
    const int N = static_cast<int>(out), K = static_cast<int>(in);
    if (options.bf16_weights) {
      // CPU: panels for cpu::linear_rows_bf16; CUDA: plain [out, in] bf16.
      const int64_t n = packed ? static_cast<int64_t>(cpu::packed_linear_size(N, K)) : out * in;
      Tensor b = refresh && packed ? m.storage : Tensor::empty({n}, DType::kBF16);
      if (packed) {
        cpu::pack_linear_bf16(static_cast<uint16_t*>(b.raw_data()), dst, N, K);
      } else {
        convert_from_f32(dst, static_cast<size_t>(n), b.raw_data(), DType::kBF16);
      }
      if (refresh && !packed) {
        m.storage.copy_from(b);
      } else if (!refresh) {
        m.storage = b.to(device_);
      }
      m.bf16 = static_cast<const uint16_t*>(m.storage.raw_data());
    } else if (packed) {
      if (!refresh) m.storage = Tensor::empty({static_cast<int64_t>(cpu::packed_linear_size(N, K))});
      cpu::pack_linear_f32(m.storage.data<float>(), dst, N, K);
      m.packed = m.storage.data<float>();
    } else {
      if (refresh) {
        m.storage.copy_from(t);
      } else {
        m.storage = t.to(device_);
      }
      m.f32 = m.storage.data<float>();
    }
  };
  const bool in_out = !c.is_llama();  // GPT-2's Conv1D matrices
  s.layers.resize(c.n_layer);
  for (int l = 0; l < c.n_layer; ++l) {
    const LayerOffsets& o = layers_[l];
    InferenceState::Layer& layer = s.layers[l];
    matrix(layer.qkv, o.qkv_w, QKV, C, in_out);
    matrix(layer.attn_out, o.attn_out_w, C, HD, in_out);
    matrix(layer.up, o.up_w, UP, C, in_out);
    matrix(layer.down, o.down_w, C, F, in_out);
  }
  matrix(s.lm_head, lm_head_, V, C, false);
}

void Transformer::refresh_inference() {
  require(infer_ != nullptr, "inference: call prepare_inference before refresh_inference");
  build_inference_weights(*infer_, /*refresh=*/true);
}

void Transformer::prepare_inference(const InferenceOptions& options) {
  require(options.max_batched_tokens > 0, "inference: max_batched_tokens must be > 0, got ",
          options.max_batched_tokens);
  require(options.max_logit_rows > 0, "inference: max_logit_rows must be > 0, got ",
          options.max_logit_rows);
  const ModelConfig& c = config_;
  // This rank's share under tensor parallelism (the same layout as the training forward's).
  const detail::Dims d(c, tp_size_);
  const int64_t C = d.C, QKV = d.QKV, HD = d.HD, F = d.F, UP = d.UP, V = vocab_local_;
  const int64_t cap = options.max_batched_tokens, R = options.max_logit_rows;
  infer_.reset();
  auto s = std::make_shared<InferenceState>();
  s->options = options;

  build_inference_weights(*s, /*refresh=*/false);

  auto f32 = [&](std::initializer_list<int64_t> shape) {
    return Tensor::empty(Shape(shape), DType::kF32, device_);
  };
  s->x = f32({cap, C});
  s->ln = f32({cap, C});
  s->mean = f32({cap});
  s->rstd = f32({cap});
  s->qkv = f32({cap, QKV});
  s->att = f32({cap, HD});
  s->tmp = f32({cap, C});
  s->fc_pre = f32({cap, UP});
  s->fc_act = f32({cap, F});
  s->last = f32({R, C});
  s->lnf = f32({R, C});
  s->lnf_mean = f32({R});
  s->lnf_rstd = f32({R});
  s->logits = f32({R, V});
  if (tp_size_ > 1) {
    s->gathered.resize(static_cast<size_t>(R * V) * tp_size_);
    s->full_logits = Tensor::empty({R, static_cast<int64_t>(c.vocab_size)});
  }
  for (Tensor* t : {&s->tokens, &s->positions, &s->row_seq, &s->slots})
    *t = Tensor::empty({cap}, DType::kI32, device_);
  s->logit_rows = Tensor::empty({R}, DType::kI32, device_);
  infer_ = std::move(s);
}

const InferenceOptions& Transformer::inference_options() const {
  require(infer_ != nullptr, "inference: call prepare_inference first");
  return infer_->options;
}

namespace {
void upload_ints(Tensor& dst, const int32_t* src, int64_t n) {
  if (n == 0) return;
  Tensor part = dst.slice(0, 0, n);
  if (part.device().is_cpu()) {
    std::memcpy(part.raw_data(), src, sizeof(int32_t) * n);
    return;
  }
  Tensor host = Tensor::empty({n}, DType::kI32);
  std::memcpy(host.raw_data(), src, sizeof(int32_t) * n);
  part.copy_from(host);
}
}  // namespace

Tensor Transformer::forward_paged(const AttentionContext& ctx, KvCache& cache) {
  require(infer_ != nullptr, "forward_paged: call prepare_inference first");
  InferenceState& s = *infer_;
  const ModelConfig& c = config_;
  const int N = ctx.num_rows, R = ctx.num_logit_rows;
  require(N > 0 && N <= s.options.max_batched_tokens, "forward_paged: ", N, " rows, expected 1..",
          s.options.max_batched_tokens, " (max_batched_tokens)");
  require(R >= 0 && R <= s.options.max_logit_rows, "forward_paged: ", R,
          " logit rows, expected 0..", s.options.max_logit_rows, " (max_logit_rows)");
  require(ctx.num_seqs > 0 && ctx.max_blocks_per_seq > 0, "forward_paged: no block tables");
  require(cache.device() == device_, "forward_paged: the KV cache is on ", cache.device().str(),
          ", the model on ", device_.str());
  const detail::Dims d(c, tp_size_);
  require(cache.slot_width() == static_cast<int64_t>(d.KV) * d.D, "forward_paged: the KV cache holds ",
          cache.slot_width(), " values per token, this ", tp_size_ > 1 ? "tensor-parallel rank" : "model",
          " needs ", d.KV * d.D, " (", d.KV, " kv heads x ", d.D, ")");
  const int bs = cache.block_size();
  for (int i = 0; i < N; ++i) {
    require(ctx.tokens[i] >= 0 && ctx.tokens[i] < c.vocab_size, "forward_paged: token id ",
            ctx.tokens[i], " in row ", i, " is outside the vocabulary [0, ", c.vocab_size, ")");
    require(ctx.positions[i] >= 0 && ctx.positions[i] < c.max_seq_len, "forward_paged: position ",
            ctx.positions[i], " in row ", i, " is outside [0, ", c.max_seq_len, ")");
    require(ctx.row_seq[i] >= 0 && ctx.row_seq[i] < ctx.num_seqs, "forward_paged: row ", i,
            " names sequence ", ctx.row_seq[i], " of ", ctx.num_seqs);
    require(ctx.slot_mapping[i] >= 0 && ctx.slot_mapping[i] < cache.num_slots(),
            "forward_paged: slot ", ctx.slot_mapping[i], " of row ", i, " is outside the cache (",
            cache.num_slots(), " slots)");
    const int needed_blocks = ctx.positions[i] / bs + 1;
    require(needed_blocks <= ctx.max_blocks_per_seq, "forward_paged: row ", i, " at position ",
            ctx.positions[i], " needs ", needed_blocks, " blocks, the tables have ",
            ctx.max_blocks_per_seq);
    const int32_t* table =
        ctx.block_tables + static_cast<int64_t>(ctx.row_seq[i]) * ctx.max_blocks_per_seq;
    for (int b = 0; b < needed_blocks; ++b) {
      require(table[b] >= 0 && table[b] < cache.num_blocks(), "forward_paged: block ", table[b],
              " in the table of sequence ", ctx.row_seq[i], " is outside the cache");
    }
  }
  for (int r = 0; r < R; ++r) {
    require(ctx.logit_rows[r] >= 0 && ctx.logit_rows[r] < N, "forward_paged: logit row ",
            ctx.logit_rows[r], " is outside [0, ", N, ")");
  }
  upload_ints(s.tokens, ctx.tokens, N);
  upload_ints(s.positions, ctx.positions, N);
  upload_ints(s.row_seq, ctx.row_seq, N);
  upload_ints(s.slots, ctx.slot_mapping, N);
  upload_ints(s.logit_rows, ctx.logit_rows, R);
  const int64_t table_size = static_cast<int64_t>(ctx.num_seqs) * ctx.max_blocks_per_seq;
  if (!s.block_tables.defined() || s.block_tables.numel() < table_size)
    s.block_tables = Tensor::empty({table_size * 2}, DType::kI32, device_);
  upload_ints(s.block_tables, ctx.block_tables, table_size);

  const int C = d.C, H = d.H, KV = d.KV, D = d.D, QKV = d.QKV, HD = d.HD, F = d.F, UP = d.UP;
  const bool llama = d.llama;
  const float* p = params_.data<float>();
  auto bias = [&](int64_t off) { return off >= 0 ? p + off : nullptr; };
  // A row-parallel layer's bias is added by one rank, before the all-reduce.
  auto row_bias = [&](int64_t off) { return tp_rank_ == 0 ? bias(off) : nullptr; };
  auto linear = [&](float* out, const float* in, const InferenceMatrix& w, const float* b, int M,
                    int K, int Nout) {
    if (w.bf16 != nullptr) {
      ops_->linear_rows_bf16(out, in, w.bf16, b, M, K, Nout);
    } else if (w.packed != nullptr) {
      ops_->linear_rows(out, in, w.packed, b, M, K, Nout);
    } else {
      ops_->matmul_forward(out, in, w.f32, b, M, K, Nout, WeightLayout::kOutIn);
    }
  };
  auto norm = [&](float* out, float* mean, float* rstd, const float* in, int64_t w, int64_t b,
                  int rows) {
    if (llama) {
      ops_->rmsnorm_forward(out, rstd, in, p + w, rows, C, c.norm_eps);
    } else {
      ops_->layernorm_forward(out, mean, rstd, in, p + w, p + b, rows, C, c.norm_eps);
    }
  };
  const int32_t* tokens = s.tokens.data<int32_t>();
  const int32_t* positions = s.positions.data<int32_t>();
  const int32_t* row_seq = s.row_seq.data<int32_t>();
  const int32_t* slots = s.slots.data<int32_t>();
  const int32_t* tables = s.block_tables.data<int32_t>();
  float *x = s.x.data<float>(), *ln = s.ln.data<float>(), *qkv = s.qkv.data<float>();
  float *att = s.att.data<float>(), *tmp = s.tmp.data<float>();
  float *fc_pre = s.fc_pre.data<float>(), *fc_act = s.fc_act.data<float>();
  float *mean = s.mean.data<float>(), *rstd = s.rstd.data<float>();
  const size_t NC = static_cast<size_t>(N) * C;

  if (tp_size_ > 1) {
    tp_embedding_forward(x, ctx.tokens, ctx.positions, N);  // host arrays: a tp model is on the CPU
  } else {
    ops_->embedding_forward(x, tokens, positions, p + wte_, llama ? nullptr : p + wpe_, N, C);
  }
  for (int l = 0; l < c.n_layer; ++l) {
    const LayerOffsets& o = layers_[l];
    const InferenceState::Layer& w = s.layers[l];
    norm(ln, mean, rstd, x, o.ln1_w, o.ln1_b, N);
    linear(qkv, ln, w.qkv, bias(o.qkv_b), N, C, QKV);
    if (llama) {
      ops_->rope_forward(qkv, positions, rope_cos_.data<float>(), rope_sin_.data<float>(), N, H, D,
                         QKV);
      ops_->rope_forward(qkv + HD, positions, rope_cos_.data<float>(), rope_sin_.data<float>(), N,
                         KV, D, QKV);
    }
    if (cache.dtype() == DType::kBF16) {
      ops_->paged_kv_write_bf16(cache.k_bf16(l), cache.v_bf16(l), qkv + HD, qkv + HD + KV * D, QKV,
                                slots, N, KV, D);
      ops_->paged_attention_forward_bf16(att, qkv, QKV, cache.k_bf16(l), cache.v_bf16(l), tables,
                                         ctx.max_blocks_per_seq, row_seq, positions, N, H, KV, D,
                                         cache.block_size());
    } else {
      ops_->paged_kv_write(cache.k(l), cache.v(l), qkv + HD, qkv + HD + KV * D, QKV, slots, N, KV,
                           D);
      ops_->paged_attention_forward(att, qkv, QKV, cache.k(l), cache.v(l), tables,
                                    ctx.max_blocks_per_seq, row_seq, positions, N, H, KV, D,
                                    cache.block_size());
    }
    linear(tmp, att, w.attn_out, row_bias(o.attn_out_b), N, HD, C);
    tp_all_reduce(tmp, NC);
    ops_->add(x, x, tmp, NC);
    norm(ln, mean, rstd, x, o.ln2_w, o.ln2_b, N);
    linear(fc_pre, ln, w.up, bias(o.up_b), N, C, UP);
    if (llama) {
      ops_->swiglu_forward(fc_act, fc_pre, N, F);
    } else {
      ops_->gelu_forward_rows(fc_act, fc_pre, N, F);
    }
    linear(tmp, fc_act, w.down, row_bias(o.down_b), N, F, C);
    tp_all_reduce(tmp, NC);
    ops_->add(x, x, tmp, NC);
  }
  if (R == 0) return s.logits.slice(0, 0, 0);
  // The final norm and the LM head run on the sampled rows only (gathered like an embedding).
  float* last = s.last.data<float>();
  ops_->embedding_forward(last, s.logit_rows.data<int32_t>(), nullptr, x, nullptr, R, C);
  norm(s.lnf.data<float>(), s.lnf_mean.data<float>(), s.lnf_rstd.data<float>(), last, lnf_w_,
       lnf_b_, R);
  const int VL = vocab_local_;
  linear(s.logits.data<float>(), s.lnf.data<float>(), s.lm_head, nullptr, R, C, VL);
  if (tp_size_ == 1) return s.logits.slice(0, 0, R);
  // Vocab-parallel head: every rank's [R, VL] slice, joined into [R, vocab] (padding dropped).
  const size_t slice = static_cast<size_t>(R) * VL;
  tp_->all_gather(s.logits.data<float>(), s.gathered.data(), slice, DType::kF32);
  const int V = c.vocab_size;
  float* full = s.full_logits.data<float>();
  for (int r = 0; r < tp_size_; ++r) {
    const int first = r * VL, n = std::min(VL, V - first);
    if (n <= 0) continue;
    for (int i = 0; i < R; ++i) {
      std::memcpy(full + static_cast<size_t>(i) * V + first,
                  s.gathered.data() + r * slice + static_cast<size_t>(i) * VL, sizeof(float) * n);
    }
  }
  return s.full_logits.slice(0, 0, R);
}

}  // namespace tandem
