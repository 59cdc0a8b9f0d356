// Saving and loading models as Hugging Face style directories: config.json (the family's own
// keys) + model.safetensors (the family's names and layouts). Files are written atomically.
#pragma once

#include <memory>
#include <string>

#include "runtime/dtype.h"
#include "runtime/safetensors.h"
#include "runtime/transformer.h"

namespace tandem {

// Writes dir/config.json and dir/model.safetensors (dtype F32, BF16 or F16); creates dir.
// Always the whole (Hugging Face) tensors: a tensor-parallel model gathers its slices, which is
// a collective of its tp group (every tp rank calls; the group's rank 0 writes).
void save_pretrained(const Transformer& model, const std::string& dir, DType dtype = DType::kF32);
// The same from whole tensors already at hand: `full` is a host flat buffer in `full_layout`.
void save_pretrained_full(const ModelConfig& config, const ParamLayout& full_layout,
                          const float* full, const std::string& dir, DType dtype = DType::kF32);
// Reads dir/config.json and dir/model.safetensors into a model on `device`; with a `tp` group of
// size > 1, this rank's slice of a tensor-parallel model (the file holds the whole tensors).
std::unique_ptr<Transformer> load_pretrained(const std::string& dir, Device device = Device::cpu(),
                                             Communicator* tp = nullptr);
ModelConfig load_config(const std::string& config_json_path);
// Copies every parameter of `model` from a safetensors file. Errors name the file and tensor:
// a missing tensor, a wrong shape or dtype, or an unexpected tensor (other than known buffers
// such as attn.bias / rotary_emb.inv_freq). GPT-2 names without the "transformer." prefix (as in
// the original gpt2 upload) are accepted. The file holds whole tensors; a tensor-parallel model
// keeps its slice (not collective), so a checkpoint of any tp loads at any other.
void load_weights(Transformer& model, const std::string& safetensors_path);
void load_weights(Transformer& model, const SafetensorsFile& file);
// The weights of checkpoint directory `dir` without a model: one host F32 tensor in
// Transformer::hf_layout(config) (BF16/F16 converted), checked as load_pretrained checks them;
// `config` is set from dir/config.json. What `tandem publish` sends to a replica.
Tensor load_full_weights(const std::string& dir, ModelConfig& config);

}  // namespace tandem
