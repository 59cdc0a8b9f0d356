// The paged KV cache and the attention context of one inference step.
//
// KvCache owns, for every layer, K and V pools of `num_blocks` blocks of `block_size` token
// slots, each slot holding the n_kv_head * head_dim values of one token (F32, or BF16 for half
// the bytes: written rounded to nearest even, read back widened to f32; on the model's device):
// slot = block * block_size + offset. Which block belongs to which sequence is decided
// by the caller (inference/BlockManager); the cache is plain memory.
//
// AttentionContext describes one step of Transformer::forward_paged as host arrays: a flat batch
// of N token rows from any number of sequences (decode rows and prefill chunks mixed), each with
// its absolute position, its sequence (a row of block_tables) and the slot its K/V is written
// to; and the rows whose logits are wanted. A row attends to its sequence's positions 0..pos, so
// positions before a row's own chunk must already be in the cache.
#pragma once

#include <cstdint>

#include "runtime/model_config.h"
#include "runtime/tensor.h"

namespace tandem {

class KvCache {
 public:
  KvCache() = default;
  // dtype: DType::kF32 or DType::kBF16. tp > 1: the cache of one tensor-parallel rank, which
  // holds the K/V of its n_kv_head / tp heads only (the KV cache sharded by heads).
  KvCache(const ModelConfig& config, int num_blocks, int block_size, Device device = Device::cpu(),
          DType dtype = DType::kF32, int tp = 1);
  // Bytes one block takes over all layers (K and V), on one of `tp` ranks.
  static int64_t bytes_per_block(const ModelConfig& config, int block_size,
                                 DType dtype = DType::kF32, int tp = 1);

  int num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  int64_t num_slots() const { return static_cast<int64_t>(num_blocks_) * block_size_; }
  int64_t bytes() const { return static_cast<int64_t>(storage_.nbytes()); }
  Device device() const { return storage_.device(); }
  DType dtype() const { return storage_.dtype(); }
  // Values of one token slot: (the rank's) n_kv_head * head_dim.
  int64_t slot_width() const { return num_slots() > 0 ? layer_stride_ / num_slots() : 0; }
  // [num_slots, n_kv_head * head_dim] of one layer (k/v for an F32 cache, k_bf16/v_bf16 for BF16).
  float* k(int layer) const;
  float* v(int layer) const;
  uint16_t* k_bf16(int layer) const;
  uint16_t* v_bf16(int layer) const;

 private:
  Tensor storage_;  // [L, 2, num_slots, KV * D]
  int num_blocks_ = 0, block_size_ = 0, layers_ = 0;
  int64_t layer_stride_ = 0;  // floats in one layer's K (or V)
};

struct AttentionContext {
  int num_rows = 0;
  const int32_t* tokens = nullptr;        // [num_rows]
  const int32_t* positions = nullptr;     // [num_rows], absolute, < max_seq_len
  const int32_t* row_seq = nullptr;       // [num_rows], a row of block_tables
  const int32_t* slot_mapping = nullptr;  // [num_rows], where the row's K/V goes
  int num_seqs = 0;
  int max_blocks_per_seq = 0;
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq]
  int num_logit_rows = 0;
  const int32_t* logit_rows = nullptr;  // [num_logit_rows], rows in [0, num_rows)
};

}  // namespace tandem
