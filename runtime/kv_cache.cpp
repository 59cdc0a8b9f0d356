#include "runtime/kv_cache.h"

#include <algorithm>

#include "runtime/error.h"

namespace tandem {

KvCache::KvCache(const ModelConfig& config, int num_blocks, int block_size, Device device,
                 DType dtype, int tp)
    : num_blocks_(num_blocks), block_size_(block_size), layers_(config.n_layer) {
  require(num_blocks > 0, "KV cache: the number of blocks must be > 0, got ", num_blocks);
  require(block_size > 0, "KV cache: the block size must be > 0, got ", block_size);
  require(dtype == DType::kF32 || dtype == DType::kBF16, "KV cache: dtype must be F32 or BF16");
  require(tp >= 1 && config.n_kv_head % tp == 0, "KV cache: n_kv_head = ", config.n_kv_head,
          " does not split over ", tp, " tensor-parallel ranks");
  layer_stride_ = num_slots() * (config.n_kv_head / tp) * config.head_dim();
  storage_ = Tensor::empty({config.n_layer, 2, layer_stride_}, dtype, device);
}

int64_t KvCache::bytes_per_block(const ModelConfig& config, int block_size, DType dtype, int tp) {
  return 2LL * config.n_layer * block_size * (config.n_kv_head / std::max(tp, 1)) *
         config.head_dim() *
         static_cast<int64_t>(dtype_size(dtype));
}

float* KvCache::k(int layer) const {
  return storage_.data<float>() + (2 * static_cast<int64_t>(layer)) * layer_stride_;
}

float* KvCache::v(int layer) const {
  return storage_.data<float>() + (2 * static_cast<int64_t>(layer) + 1) * layer_stride_;
}

uint16_t* KvCache::k_bf16(int layer) const {
  return static_cast<uint16_t*>(storage_.raw_data()) +
         (2 * static_cast<int64_t>(layer)) * layer_stride_;
}

uint16_t* KvCache::v_bf16(int layer) const {
  return static_cast<uint16_t*>(storage_.raw_data()) +
         (2 * static_cast<int64_t>(layer) + 1) * layer_stride_;
}

}  // namespace tandem
