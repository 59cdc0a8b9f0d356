#include "inference/block_manager.h"

#include <xxhash.h>

#include <algorithm>
#include <stdexcept>

#include "runtime/error.h"

namespace tandem {

BlockManager::BlockManager(int num_blocks, int block_size, bool prefix_caching)
    : block_size_(block_size), prefix_caching_(prefix_caching), blocks_(num_blocks) {
  require(num_blocks > 0, "block manager: the KV pool needs at least one block");
  require(block_size > 0, "block manager: block_size must be > 0, got ", block_size);
  free_.reserve(num_blocks);
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is handed out first
}

uint64_t BlockManager::hash_block(uint64_t previous, const int32_t* tokens) const {
  return XXH3_64bits_withSeed(tokens, sizeof(int32_t) * block_size_, previous);
}

int BlockManager::take_block() {
  int id;
  if (!free_.empty()) {
    id = free_.back();
    free_.pop_back();
  } else {
    if (evictable_.empty()) throw std::logic_error("block manager: no free block to take");
    id = evictable_.front();
    evictable_.pop_front();
    Block& evicted = blocks_[id];
    auto it = cached_.find(evicted.hash);
    if (it != cached_.end() && it->second == id) cached_.erase(it);
    evicted.hashed = false;
    evicted.tokens.clear();
  }
  blocks_[id].ref_count = 1;
  return id;
}

void BlockManager::release(int id) {
  Block& b = blocks_[id];
  if (--b.ref_count > 0) return;
  if (b.hashed) {
    evictable_.push_back(id);
    b.lru_position = std::prev(evictable_.end());
  } else {
    free_.push_back(id);
  }
}

void BlockManager::drop_prefix_cache() {
  for (const auto& [hash, id] : cached_) {
    blocks_[id].hashed = false;
    blocks_[id].tokens.clear();
  }
  cached_.clear();
  for (int id : evictable_) {
    blocks_[id].hashed = false;
    blocks_[id].tokens.clear();
    free_.push_back(id);
  }
  evictable_.clear();
}

int BlockManager::allocate_cached_prefix(Sequence& seq) {
  require(seq.block_table.empty(), "block manager: sequence ", seq.id, " already holds blocks");
  seq.num_computed = 0;
  seq.block_hashes.clear();
  if (!prefix_caching_) return 0;
  // Full blocks that end before the last token (its logits must be computed), and before the
  // first prompt row whose logits are wanted.
  int first_logits = seq.num_tokens() - 1;
  if (seq.prompt_logits_from >= 0) first_logits = std::min(first_logits, seq.prompt_logits_from);
  const int candidates = first_logits / block_size_;
  uint64_t previous = 0;
  for (int i = 0; i < candidates; ++i) {
    const int32_t* tokens = seq.tokens.data() + static_cast<size_t>(i) * block_size_;
    const uint64_t h = hash_block(previous, tokens);
    auto it = cached_.find(h);
    if (it == cached_.end()) break;
    Block& b = blocks_[it->second];
    if (!std::equal(b.tokens.begin(), b.tokens.end(), tokens)) break;  // a hash collision
    if (b.ref_count == 0) evictable_.erase(b.lru_position);
    ++b.ref_count;
    seq.block_table.push_back(it->second);
    seq.block_hashes.push_back(h);
    previous = h;
  }
  seq.num_computed = static_cast<int>(seq.block_table.size()) * block_size_;
  return seq.num_computed;
}

void BlockManager::record_prefix_lookup(int tokens, int hit_tokens) {
  query_tokens_ += tokens;
  hit_tokens_ += hit_tokens;
}

bool BlockManager::ensure_capacity(Sequence& seq, int num_tokens) {
  const int needed = blocks_for(num_tokens) - static_cast<int>(seq.block_table.size());
  if (needed <= 0) return true;
  if (needed > num_free_blocks()) return false;
  for (int i = 0; i < needed; ++i) seq.block_table.push_back(take_block());
  return true;
}

void BlockManager::register_full_blocks(Sequence& seq) {
  if (!prefix_caching_) return;
  const int full =
      std::min(seq.num_computed / block_size_, static_cast<int>(seq.block_table.size()));
  for (int i = static_cast<int>(seq.block_hashes.size()); i < full; ++i) {
    const uint64_t previous = i == 0 ? 0 : seq.block_hashes[i - 1];
    const int32_t* tokens = seq.tokens.data() + static_cast<size_t>(i) * block_size_;
    const uint64_t h = hash_block(previous, tokens);
    seq.block_hashes.push_back(h);
    Block& b = blocks_[seq.block_table[i]];
    if (b.hashed || cached_.count(h) > 0) continue;  // already cached (here or in a twin block)
    b.hashed = true;
    b.hash = h;
    b.tokens.assign(tokens, tokens + block_size_);
    cached_[h] = seq.block_table[i];
  }
}

void BlockManager::free(Sequence& seq) {
  for (auto it = seq.block_table.rbegin(); it != seq.block_table.rend(); ++it) release(*it);
  seq.block_table.clear();
  seq.block_hashes.clear();
  seq.num_computed = 0;
}

}  // namespace tandem
