// BlockManager: hands out the fixed-size blocks of the paged KV cache (runtime/kv_cache.h) to
// sequences, with reference counts, a free list and prefix caching.
//
// Prefix caching: a full block is named by a 64-bit XXH3 hash chained over the whole token
// prefix up to its end (hash_i = XXH3(tokens of block i, seed = hash_{i-1})), and the block's
// tokens are kept to rule out collisions. A new sequence reuses the cached blocks of its
// longest cached prefix (never the block holding its last token, whose logits must be
// computed); a block shared by several sequences is counted once. A freed block whose content
// is hashed stays cached, unreferenced, until it is reused or evicted, least recently freed
// first. Not thread-safe: the engine's step lock guards it.
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

#include "inference/sequence.h"

namespace tandem {

class BlockManager {
 public:
  BlockManager(int num_blocks, int block_size, bool prefix_caching);

  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  int block_size() const { return block_size_; }
  // Blocks a sequence can get now: never used, or cached with no reference (evictable).
  int num_free_blocks() const { return static_cast<int>(free_.size() + evictable_.size()); }
  int num_used_blocks() const { return num_blocks() - num_free_blocks(); }
  int num_cached_blocks() const { return static_cast<int>(cached_.size()); }
  int ref_count(int block) const { return blocks_.at(block).ref_count; }
  // Blocks needed to hold `num_tokens` tokens.
  int blocks_for(int num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }

  // For a sequence holding no blocks: takes the cached blocks of its longest cached prefix and
  // marks those tokens computed. Returns the number of tokens served from the cache.
  int allocate_cached_prefix(Sequence& seq);
  // Grows seq's block table to hold `num_tokens` tokens. Returns false, changing nothing, when
  // the pool has too few free blocks.
  bool ensure_capacity(Sequence& seq, int num_tokens);
  // Registers the hashes of seq's full, computed blocks so later sequences can reuse them.
  void register_full_blocks(Sequence& seq);
  // Releases all of seq's blocks (last block first, so the tail is evicted first) and resets
  // its computed count.
  void free(Sequence& seq);
  // Forgets every cached prefix (the model's weights changed, so the cached K/V are stale):
  // unreferenced cached blocks become free, blocks a sequence still holds are no longer found
  // and are freed when it releases them. The hit-rate counters are kept.
  void drop_prefix_cache();

  // Counts one admitted sequence's lookup (a lookup undone by free() is not counted).
  void record_prefix_lookup(int tokens, int hit_tokens);
  // Prefix cache: tokens looked up at admission and tokens found.
  int64_t prefix_query_tokens() const { return query_tokens_; }
  int64_t prefix_hit_tokens() const { return hit_tokens_; }
  double prefix_hit_rate() const {
    return query_tokens_ == 0 ? 0.0 : static_cast<double>(hit_tokens_) / query_tokens_;
  }

 private:
  struct Block {
    int ref_count = 0;
    bool hashed = false;
    uint64_t hash = 0;
    std::vector<int32_t> tokens;            // content, when hashed
    std::list<int>::iterator lru_position;  // in evictable_, when hashed and unreferenced
  };
  uint64_t hash_block(uint64_t previous, const int32_t* tokens) const;
  int take_block();  // a free block with ref 1 (evicts the LRU cached block if needed)
  void release(int block);

  int block_size_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  std::vector<int> free_;                     // never-cached free blocks (a stack)
  std::list<int> evictable_;                  // cached, unreferenced; front = oldest
  std::unordered_map<uint64_t, int> cached_;  // prefix hash -> block
  int64_t query_tokens_ = 0, hit_tokens_ = 0;
};

}  // namespace tandem
