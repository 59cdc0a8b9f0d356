#include "runtime/kv_cache.h"

namespace tandem {

KvCache::KvCache(const ModelConfig& config, int num_blocks, int block_size, Device device)
    : num_blocks_(num_blocks), block_size_(block_size), layers_(config.n_layer) {
  require(num_blocks > 0, "KV cache: the number of blocks must be > 0, got ", num_blocks);
  require(block_size > 0, "KV cache: the block size must be > 0, got ", block_size);
  layer_stride_ = num_slots() * config.n_kv_head * config.head_dim();
  storage_ = Tensor::empty({config.n_layer, 2, layer_stride_}, DType::kF32, device);
}

int64_t KvCache::bytes_per_block(const ModelConfig& config, int block_size) {
  return 2LL * config.n_layer * block_size * config.n_kv_head * config.head_dim() *
         static_cast<int64_t>(sizeof(float));
}

float* KvCache::k(int layer) const {
  return storage_.data<float>() + (2 * static_cast<int64_t>(layer)) * layer_stride_;
}

float* KvCache::v(int layer) const {
  return storage_.data<float>() + (2 * static_cast<int64_t>(layer) + 1) * layer_stride_;
}

}  // namespace tandem
