// Transformer: one decoder-only language model for the GPT-2 and Llama families, with an
// explicit backward pass (no autograd).
//
// Parameters and gradients each live in one flat F32 buffer described by `layout()` (Hugging Face
// names). `forward` saves the activations `backward` needs; buffers are sized for the last (B, T)
// and reallocated when it changes. `backward` ACCUMULATES into grads() (call zero_grad() between
// optimizer steps) and reuses the logits buffer for the logits' gradient, so logits() is only
// meaningful between forward and backward. Not thread-safe: one forward/backward at a time
// (the kernels inside use all OpenMP threads).
//
// Inference: `prepare_inference` takes a snapshot of the weights in the [out, in] layout the
// inference kernels read (f32, or bf16 to halve the bytes a decode step streams) and allocates
// buffers for at most `max_batched_tokens` rows; `forward_paged` then runs one engine step over
// a flat batch of rows from many sequences through the paged KV cache (runtime/kv_cache.h),
// computing logits only for the rows asked for. With InferenceOptions::batch_invariant (the
// default) on the CPU, every row's result is independent of the rest of the batch, bit for bit.
// The training forward above is the
// dense special case and is untouched by it. Call prepare_inference again after the weights
// change. Under tensor parallelism forward_paged is a collective of the tp group, like forward:
// every tp rank passes the same context and a KV cache of its own heads (KvCache with tp), the
// row-parallel outputs are all-reduced, and every rank gets the whole logits (the vocab-parallel
// head's slices all-gathered), which is how a tensor-parallel serving replica runs.
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "runtime/communicator.h"
#include "runtime/kv_cache.h"
#include "runtime/model_config.h"
#include "runtime/parameters.h"
#include "runtime/tensor.h"

namespace tandem {

struct Ops;

struct InferenceOptions {
  int max_batched_tokens = 512;  // rows per forward_paged call
  int max_logit_rows = 256;      // logit rows per call
  bool bf16_weights = false;     // bf16 copy of every matrix (f32 math)
  // f32 weights on the CPU: true runs every linear layer through the batch-invariant kernel
  // (cpu::linear_rows on packed panels: a row's logits are bitwise the same whatever else is in
  // the batch; about as fast as OpenBLAS, see bench_engine), false through OpenBLAS sgemm/sgemv
  // on [out, in] weights (no packed copy; a row's last bits depend on the batch). bf16 weights
  // on the CPU are always batch-invariant. On CUDA f32 runs on cuBLAS either way.
  bool batch_invariant = true;
};

class Transformer {
 public:
  // Parameters, gradients and activations live on `device` (CPU, or CUDA in a CUDA build); the
  // kernels of that device run the model. Token and target arrays are always host memory.
  //
  // Tensor parallelism (Megatron): with a `tp` group of size > 1 (host buffers, so a CPU model),
  // this rank holds its slice of every split parameter (see ParamSpec: layout() has local shapes,
  // full_layout() the Hugging Face ones): q/k/v heads (GQA kv heads too; GPT-2's c_attn per
  // q|k|v block) and the MLP's up projections are column-parallel, attention-out and MLP-down
  // row-parallel (their bias added once, after the all-reduce), the embedding and LM head
  // vocab-parallel (the vocabulary padded to a multiple of tp * 64 when tp does not divide it;
  // padding is never looked up, predicted or counted), norms replicated. forward/backward are
  // then collectives over `tp`: every tp rank passes the same tokens. The group must outlive the
  // model. Throws tandem::Error when n_head, n_kv_head or ffn_hidden does not divide by tp.
  explicit Transformer(const ModelConfig& config, Device device = Device::cpu(),
                       Communicator* tp = nullptr);

  const ModelConfig& config() const { return config_; }
  Device device() const { return device_; }
  const ParamLayout& layout() const { return layout_; }
  Tensor& params() { return params_; }
  const Tensor& params() const { return params_; }
  Tensor& grads();  // allocated on first use
  bool grads_allocated() const { return grads_.defined(); }  // false under a gradient sink
  // A named parameter (or its gradient) as a view of the flat buffer.
  Tensor param(const std::string& name) const;
  Tensor grad(const std::string& name);
  int64_t num_parameters() const { return layout_.total_numel(); }

  // Tensor parallelism (1 and 0 without a group).
  int tp_size() const { return tp_size_; }
  int tp_rank() const { return tp_rank_; }
  Communicator* tp_group() const { return tp_; }
  // The vocabulary rows this rank holds of the embedding and LM head (padding included).
  int vocab_local() const { return vocab_local_; }
  // The unsplit table (Hugging Face shapes): checkpoints are written and read in it. The same
  // as layout() when tp_size() == 1.
  const ParamLayout& full_layout() const { return full_layout_; }
  // Collective over the tp group: `local` (a flat buffer in layout(), e.g. params(), grads(),
  // an AdamW moment) made whole, as a host tensor in full_layout() (padding dropped).
  Tensor gather_full(const Tensor& local) const;
  // This rank's slice of `full` (host, full_layout()) into `local` (a flat buffer in layout(),
  // on any device). Not collective.
  void scatter_full(const float* full, Tensor& local) const;
  // True for a parameter every tp rank holds whole (norms, row-parallel biases, GPT-2's wpe):
  // its gradient is the same on every rank and is counted once in a norm.
  static bool replicated(const ParamSpec& spec) { return spec.tp_split_dim < 0; }

  // GPT-2 / Llama initialisation: N(0, init_std) for matrices and embeddings, residual output
  // projections scaled by 1/sqrt(2 * n_layer), norms to one, biases to zero.
  void init_weights(uint64_t seed);

  // tokens and targets are [B*T] (row-major [B, T]); targets may be null (then no loss) and a
  // target of -1 is ignored. Returns the mean loss over targets (NaN without targets). Throws
  // tandem::Error on out-of-range tokens/targets or T > max_seq_len.
  float forward(const int32_t* tokens, const int32_t* targets, int B, int T);
  // d(mean loss)/d(params), accumulated into grads(). Needs a forward with targets just before.
  void backward();
  void zero_grad();

  // Called by backward() each time a suffix of the flat gradient buffer is final for this
  // backward: grads()[watermark, num_parameters()) will not be written again until the next
  // backward. Reported after the LM head and final norm, after each layer (last to first, the
  // watermark being the layer's first parameter) and after the embeddings (watermark 0: the tied
  // wte gets gradient from both ends, so it is final only then). Data parallelism starts a
  // bucket's all-reduce once the watermark passes it. Empty = no hook.
  using GradientsReadyHook = std::function<void(int64_t watermark)>;
  void set_gradients_ready_hook(GradientsReadyHook hook) { gradients_ready_ = std::move(hook); }

  // Where backward writes gradients. By default into grads(). With a sink (ZeRO-2), backward
  // asks it for each gradient segment just before writing it, and grads() is never allocated:
  // the segments are [lnf, end) (the final norm and an untied LM head), each layer's parameters
  // (last layer first) and the embeddings [0, first layer) (asked for first when the LM head is
  // tied to wte, and again at the end: the sink must return the same memory within one
  // backward). The sink returns device memory of end - begin floats holding what backward should
  // accumulate into (zeros for a fresh gradient); the hook above reports when each is final.
  // The sink must outlive its use; null restores grads().
  using GradientSink = std::function<float*(int64_t begin, int64_t end)>;
  void set_gradient_sink(GradientSink sink) { gradient_sink_ = std::move(sink); }
  // The segments above as [begin, end) flat ranges, in the order backward finishes them.
  std::vector<std::pair<int64_t, int64_t>> gradient_segments() const;
  // The same from the config alone (for memory estimates), on one of `tp` ranks.
  static std::vector<std::pair<int64_t, int64_t>> gradient_segments(const ModelConfig& config,
                                                                    int tp = 1);

  // [B*T, vocab] logits of the last forward, on the model's device ([B*T, vocab_local()], this
  // rank's vocabulary slice, under tensor parallelism).
  Tensor logits() const;
  // Collective over the tp group: the last forward's [B*T, vocab] logits, whole, on the host.
  Tensor gather_logits() const;
  // Sizes from the config alone, nothing allocated (for memory estimates before building a
  // model): the parameter count, and the bytes of the activations (saved for backward, plus the
  // backward scratch) of a forward+backward over [B, T].
  // Under tensor parallelism (tp > 1), those of one rank.
  static int64_t parameter_count(const ModelConfig& config, int tp = 1);
  // The Hugging Face parameter table of a config (what full_layout() will be), without memory.
  static ParamLayout hf_layout(const ModelConfig& config);
  static int64_t activation_bytes(const ModelConfig& config, int B, int T, int tp = 1);
  // Throws tandem::Error when n_head, n_kv_head or ffn_hidden does not divide by tp.
  static void check_tensor_parallel(const ModelConfig& config, int tp);
  // Builds the inference weights and buffers (see the top of this header).
  void prepare_inference(const InferenceOptions& options);
  bool inference_ready() const { return infer_ != nullptr; }
  // Rebuilds the inference copies of the weights (packed panels, bf16) from the current
  // parameters in place, into the buffers prepare_inference allocated: for a model whose
  // weights change between uses of one engine (evaluation in the training loop).
  void refresh_inference();
  // Frees what prepare_inference built (the weight snapshot and buffers).
  void release_inference() { infer_.reset(); }
  const InferenceOptions& inference_options() const;
  // One inference step: writes the rows' K/V into `cache`, attends through the block tables and
  // returns the logits of ctx.logit_rows, [num_logit_rows, vocab] on the model's device (a view
  // of a buffer reused by the next call). Throws tandem::Error on out-of-range tokens, positions,
  // slots, sequences or rows, or more rows than prepare_inference allowed.
  Tensor forward_paged(const AttentionContext& ctx, KvCache& cache);

  // Model FLOPs of one forward+backward over B*T tokens (6 * matmul params * tokens + attention);
  // under tensor parallelism, those of this rank.
  double flops_per_step(int B, int T) const;

 private:
  struct LayerOffsets {
    int64_t ln1_w, ln1_b, qkv_w, qkv_b, attn_out_w, attn_out_b;
    int64_t ln2_w, ln2_b, up_w, up_b, down_w, down_b;
  };
  struct Activations;
  struct ActivationBuffer;  // one buffer of Activations: its member, shape and dtype
  // Every buffer ensure_activations allocates for [B, T]: the one list behind both the
  // allocation and activation_bytes.
  static std::vector<ActivationBuffer> activation_buffers(const ModelConfig& config, int tp,
                                                          int64_t vocab_local, int B, int T);
  struct LayoutOnly {};
  Transformer(const ModelConfig& config, LayoutOnly, int tp);  // the parameter table, no memory
  struct InferenceState;

  void build_layout();
  void build_inference_weights(InferenceState& state, bool refresh);
  void tp_all_reduce(float* buffer, size_t count) const;
  void tp_embedding_forward(float* out, const int32_t* tokens, const int32_t* positions, int N);
  void tp_embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                             const int32_t* positions, int N);
  int tp_cross_entropy_forward(int N);
  void tp_cross_entropy_backward(float dloss, int N);
  void ensure_activations(int B, int T);
  void norm_forward(float* out, float* mean, float* rstd, const float* inp, const float* p,
                    int64_t w, int64_t b, int N) const;
  void norm_backward(float* dinp, const float* dout, const float* inp, const float* mean,
                     const float* rstd, int64_t w, float* dw, float* db, int N);

  ModelConfig config_;
  Communicator* tp_ = nullptr;
  int tp_size_ = 1, tp_rank_ = 0, vocab_local_ = 0;
  ParamLayout layout_, full_layout_;
  Tensor params_;
  Tensor grads_;
  std::vector<LayerOffsets> layers_;
  int64_t wte_ = 0, wpe_ = -1, lnf_w_ = 0, lnf_b_ = -1, lm_head_ = 0;
  Device device_;
  const Ops* ops_;              // the kernels of device_
  Tensor rope_cos_, rope_sin_;  // [max_seq_len, head_dim / 2] on device_ (Llama)
  std::shared_ptr<Activations> acts_;
  std::shared_ptr<InferenceState> infer_;
  GradientsReadyHook gradients_ready_;
  GradientSink gradient_sink_;
};

}  // namespace tandem
