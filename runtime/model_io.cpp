#include "runtime/model_io.h"

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/safetensors.h"

namespace tandem {

namespace fs = std::filesystem;

void save_pretrained(const Transformer& model, const std::string& dir, DType dtype) {
  require(is_floating(dtype), "save_pretrained: dtype must be F32, BF16 or F16");
  // Under tensor parallelism the slices are gathered (a collective of the tp group) and the
  // group's rank 0 writes the whole tensors.
  const Tensor host = model.gather_full(model.params());
  if (model.tp_rank() != 0) return;
  save_pretrained_full(model.config(), model.full_layout(), host.data<float>(), dir, dtype);
}

void save_pretrained_full(const ModelConfig& config, const ParamLayout& full_layout,
                          const float* p, const std::string& dir, DType dtype) {
  require(is_floating(dtype), "save_pretrained: dtype must be F32, BF16 or F16");
  std::error_code ec;
  fs::create_directories(dir, ec);
  require(!ec && fs::is_directory(dir), "cannot create model directory ", dir, ": ", ec.message());
  std::vector<SafetensorsTensor> tensors;
  std::vector<Tensor> converted;  // keeps converted copies alive until written
  for (const ParamSpec& s : full_layout.specs()) {
    const void* data = p + s.offset;
    if (dtype != DType::kF32) {
      Tensor view = Tensor::empty(s.shape);
      std::memcpy(view.raw_data(), data, sizeof(float) * s.numel);
      converted.push_back(view.to_dtype(dtype));
      data = converted.back().raw_data();
    }
    tensors.push_back({s.name, dtype, s.shape, data});
  }
  write_safetensors((fs::path(dir) / "model.safetensors").string(), tensors,
                    {{"format", "pt"}, {"producer", "tandem"}});
  write_file_atomic((fs::path(dir) / "config.json").string(), config.to_hf_json().dump(2) + "\n");
}

ModelConfig load_config(const std::string& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat(path, ": invalid JSON: ", e.what()));
  }
  return ModelConfig::from_hf_json(j, path);
}

namespace {
bool is_known_buffer(const std::string& name) {
  return name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") ||
         name.ends_with("rotary_emb.inv_freq");
}

// The layer index of a per-layer tensor name ("transformer.h.3.", "h.3.", "model.layers.3."),
// or -1.
long long layer_of(const std::string& name) {
  for (const char* prefix : {"transformer.h.", "h.", "model.layers."}) {
    if (!name.starts_with(prefix)) continue;
    const size_t begin = std::string(prefix).size();
    const size_t end = name.find('.', begin);
    if (end == std::string::npos || end == begin || end - begin > 9) return -1;
    long long v = 0;
    for (size_t i = begin; i < end; ++i) {
      if (name[i] < '0' || name[i] > '9') return -1;
      v = v * 10 + (name[i] - '0');
    }
    return v;
  }
  return -1;
}

// Our name of each tensor in the file -> its name there (GPT-2 names without the
// "transformer." prefix, as in the original gpt2 upload, are accepted).
std::unordered_map<std::string, std::string> names_in_file(const SafetensorsFile& file, bool gpt2) {
  std::unordered_map<std::string, std::string> file_name_of;
  for (const auto& e : file.entries()) {
    std::string ours = e.name;
    if (gpt2 && !ours.starts_with("transformer.") && ours != "lm_head.weight")
      ours = "transformer." + ours;
    file_name_of[ours] = e.name;
  }
  return file_name_of;
}

// Everything about the file's tensors that can be wrong, checked against the parameter table
// `full` of `config` without touching model memory: a missing tensor, a wrong dtype or shape, an
// unexpected tensor. Errors name the file and the tensor.
void check_tensors(const ModelConfig& config, const ParamLayout& full, const SafetensorsFile& file,
                   const std::unordered_map<std::string, std::string>& file_name_of) {
  const std::string& path = file.path();
  std::unordered_set<std::string> used;
  for (const ParamSpec& s : full.specs()) {
    auto it = file_name_of.find(s.name);
    require(it != file_name_of.end(), path, ": missing tensor '", s.name, "'");
    file.check_f32(it->second, s.shape);
    used.insert(it->second);
  }
  for (const auto& e : file.entries()) {
    if (used.count(e.name) || is_known_buffer(e.name)) continue;
    if (e.name == "lm_head.weight" && config.tie_embeddings) continue;  // tied copy
    throw Error(cat(path, ": unexpected tensor '", e.name, "' (not a parameter of this ",
                    family_name(config.family), " config)"));
  }
}
}  // namespace

namespace {
// A checkpoint directory checked before any model memory: config.json present, the layer count
// the file's tensor names imply equal to the config's (the parameter table grows with it), then
// every tensor's name, dtype and shape. A config.json that describes a larger model than its
// weights (n_layer: 10000000 beside a 2-layer file) fails here in one line.
struct CheckedCheckpoint {
  ModelConfig config;
  SafetensorsFile file;
  std::unordered_map<std::string, std::string> file_name_of;
};

CheckedCheckpoint open_checked_checkpoint(const std::string& dir) {
  const std::string config_path = (fs::path(dir) / "config.json").string();
  require(fs::exists(config_path), "model directory ", dir, " has no config.json");
  ModelConfig config = load_config(config_path);
  SafetensorsFile file = SafetensorsFile::open((fs::path(dir) / "model.safetensors").string());
  long long layers = 0;
  for (const SafetensorsEntry& e : file.entries()) layers = std::max(layers, layer_of(e.name) + 1);
  require(layers == config.n_layer, config_path, ": ",
          config.is_llama() ? "num_hidden_layers" : "n_layer", " = ", config.n_layer, " but ",
          file.path(), " holds ", layers, " layers");
  auto file_name_of = names_in_file(file, !config.is_llama());
  check_tensors(config, Transformer::hf_layout(config), file, file_name_of);
  return {config, std::move(file), std::move(file_name_of)};
}

// The whole tensors of `layout` from a checked file, as F32 in one host buffer.
Tensor read_full(const ParamLayout& layout, const SafetensorsFile& file,
                 const std::unordered_map<std::string, std::string>& file_name_of) {
  Tensor host = Tensor::empty({layout.total_numel()});
  for (const ParamSpec& s : layout.specs()) {
    file.read_f32(file_name_of.at(s.name), s.shape, host.data<float>() + s.offset);
  }
  return host;
}
}  // namespace

Tensor load_full_weights(const std::string& dir, ModelConfig& config) {
  const CheckedCheckpoint c = open_checked_checkpoint(dir);
  config = c.config;
  return read_full(Transformer::hf_layout(config), c.file, c.file_name_of);
}

std::unique_ptr<Transformer> load_pretrained(const std::string& dir, Device device,
                                             Communicator* tp) {
  const CheckedCheckpoint c = open_checked_checkpoint(dir);
  auto model = std::make_unique<Transformer>(c.config, device, tp);
  // The whole tensors; a tensor-parallel rank then keeps its slice.
  const Tensor host = read_full(model->full_layout(), c.file, c.file_name_of);
  model->scatter_full(host.data<float>(), model->params());
  return model;
}

void load_weights(Transformer& model, const std::string& path) {
  load_weights(model, SafetensorsFile::open(path));
}

void load_weights(Transformer& model, const SafetensorsFile& file) {
  const auto file_name_of = names_in_file(file, !model.config().is_llama());
  check_tensors(model.config(), model.full_layout(), file, file_name_of);
  // The whole tensors; a tensor-parallel rank then keeps its slice.
  const Tensor host = read_full(model.full_layout(), file, file_name_of);
  model.scatter_full(host.data<float>(), model.params());
}

}  // namespace tandem
