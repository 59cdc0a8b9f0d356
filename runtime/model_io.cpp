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

std::unique_ptr<Transformer> load_pretrained(const std::string& dir, Device device,
                                             Communicator* tp) {
  const std::string config_path = (fs::path(dir) / "config.json").string();
  require(fs::exists(config_path), "model directory ", dir, " has no config.json");
  auto model = std::make_unique<Transformer>(load_config(config_path), device, tp);
  load_weights(*model, (fs::path(dir) / "model.safetensors").string());
  return model;
}

namespace {
bool is_known_buffer(const std::string& name) {
  return name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") ||
         name.ends_with("rotary_emb.inv_freq");
}
}  // namespace

void load_weights(Transformer& model, const std::string& path) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  const bool gpt2 = !model.config().is_llama();
  // Map file names to ours, accepting GPT-2 names without the "transformer." prefix.
  std::unordered_map<std::string, std::string> file_name_of;
  for (const auto& e : file.entries()) {
    std::string ours = e.name;
    if (gpt2 && !ours.starts_with("transformer.") && ours != "lm_head.weight")
      ours = "transformer." + ours;
    file_name_of[ours] = e.name;
  }
  // The whole tensors; a tensor-parallel rank then keeps its slice.
  Tensor host = Tensor::empty({model.full_layout().total_numel()});
  float* p = host.data<float>();
  std::unordered_set<std::string> used;
  for (const ParamSpec& s : model.full_layout().specs()) {
    auto it = file_name_of.find(s.name);
    require(it != file_name_of.end(), path, ": missing tensor '", s.name, "'");
    file.read_f32(it->second, s.shape, p + s.offset);
    used.insert(it->second);
  }
  for (const auto& e : file.entries()) {
    if (used.count(e.name) || is_known_buffer(e.name)) continue;
    if (e.name == "lm_head.weight" && model.config().tie_embeddings) continue;  // tied copy
    throw Error(cat(path, ": unexpected tensor '", e.name, "' (not a parameter of this ",
                    family_name(model.config().family), " config)"));
  }
  model.scatter_full(p, model.params());
}

}  // namespace tandem
