// The parameter table: every parameter of a model as a named view into ONE flat buffer.
//
// Training, checkpoints and inference share this table. The flat layout makes the gradient
// all-reduce, ZeRO sharding (a rank owns a contiguous slice) and checkpointing plain slicing.
// Names and shapes are the Hugging Face ones of the model's family, in that family's layout.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/tensor.h"

namespace tandem {

enum class ParamKind : uint8_t { kMatrix, kEmbedding, kNorm, kBias };

struct ParamSpec {
  std::string name;
  Shape shape;
  int64_t offset = 0;  // in elements, into the flat buffer
  int64_t numel = 0;
  ParamKind kind = ParamKind::kMatrix;
  int tp_split_dim = -1;  // dimension split across tensor-parallel ranks, -1 = replicated
  // Tensor parallelism: `shape` is this rank's slice, `global_shape` the Hugging Face tensor's.
  // Along tp_split_dim the global tensor is tp_blocks equal blocks (GPT-2's fused c_attn is
  // q|k|v: 3) and a rank holds its share of each block, in block order. The local extent times
  // tp may exceed the global one (a vocabulary padded so it divides): those rows are padding.
  Shape global_shape;
  int tp_blocks = 1;
};

class ParamLayout {
 public:
  // Appends a parameter; offsets are assigned in the order of calls.
  // global_shape defaults to shape (no tensor parallelism).
  void add(const std::string& name, const Shape& shape, ParamKind kind, int tp_split_dim = -1,
           const Shape& global_shape = {}, int tp_blocks = 1);
  const std::vector<ParamSpec>& specs() const { return specs_; }
  int64_t total_numel() const { return total_; }
  // nullptr when absent.
  const ParamSpec* find(const std::string& name) const;
  const ParamSpec& at(const std::string& name) const;  // throws naming the parameter

 private:
  std::vector<ParamSpec> specs_;
  std::unordered_map<std::string, size_t> index_;
  int64_t total_ = 0;
};

}  // namespace tandem
