// The per-rank dimensions the Transformer's translation units compute with (an implementation
// detail, installed only because the headers are installed as a tree).
#pragma once

#include "runtime/model_config.h"
#include "runtime/ops.h"

namespace tandem::detail {

// Row widths of the activations, derived once from the config; under tensor parallelism the
// local ones (this rank's heads and MLP columns; C is never split).
struct Dims {
  explicit Dims(const ModelConfig& c, int tp = 1)
      : C(c.n_embd),
        H(c.n_head / tp),
        KV(c.n_kv_head / tp),
        D(c.head_dim()),
        QKV((c.n_head + 2 * c.n_kv_head) / tp * c.head_dim()),
        HD(c.n_head / tp * c.head_dim()),
        F(c.ffn_hidden / tp),
        UP((c.is_llama() ? 2 * c.ffn_hidden : c.ffn_hidden) / tp),
        llama(c.is_llama()),
        layout(c.is_llama() ? WeightLayout::kOutIn : WeightLayout::kInOut) {}
  int C, H, KV, D, QKV, HD, F, UP;  // UP: the MLP's up-projection (GPT-2 c_fc, Llama gate|up)
  bool llama;
  WeightLayout layout;  // of every matrix but the LM head (always [out, in])
};

}  // namespace tandem::detail
