#include <gtest/gtest.h>

#include <sys/stat.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>

#include "runtime/file_io.h"
#include "runtime/model_io.h"
#include "runtime/safetensors.h"
#include "tests/runtime/test_models.h"
#include "tests/test_support.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
 protected:
  std::string path(const std::string& name) const { return scratch_ / name; }

  // Saves a tiny model and returns its directory.
  std::string save_tiny(const ModelConfig& c, Transformer** out = nullptr) {
    model_ = std::make_unique<Transformer>(c);
    model_->init_weights(5);
    save_pretrained(*model_, path("model"));
    if (out) *out = model_.get();
    return path("model");
  }

  // Rewrites model.safetensors with its header replaced by `edit(header)`.
  void edit_header(const std::string& file, const std::function<void(nlohmann::json&)>& edit) {
    std::string bytes = read_file(file);
    uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    nlohmann::json header = nlohmann::json::parse(bytes.substr(8, n));
    edit(header);
    std::string text = header.dump();
    uint64_t m = text.size();
    std::string out(reinterpret_cast<const char*>(&m), 8);
    out += text;
    out += bytes.substr(8 + n);
    std::ofstream(file, std::ios::binary | std::ios::trunc) << out;
  }

  void expect_error(const std::function<void()>& fn, const std::vector<std::string>& needles) {
    try {
      fn();
      FAIL() << "expected tandem::Error";
    } catch (const Error& e) {
      for (const auto& needle : needles) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
            << "message '" << e.what() << "' should name '" << needle << "'";
      }
    }
  }

  testing::ScratchDir scratch_{"tandem_st"};
  std::unique_ptr<Transformer> model_;
};

void expect_same_logits(Transformer& a, Transformer& b) {
  auto tokens = testing::random_tokens(2 * 8, a.config().vocab_size, 77);
  a.forward(tokens.data(), nullptr, 2, 8);
  b.forward(tokens.data(), nullptr, 2, 8);
  const Tensor la = a.logits(), lb = b.logits();
  ASSERT_EQ(la.numel(), lb.numel());
  EXPECT_EQ(std::memcmp(la.raw_data(), lb.raw_data(), la.nbytes()), 0) << "logits differ";
}

TEST_F(SafetensorsTest, Gpt2SaveLoadGivesBitIdenticalLogits) {
  Transformer* original = nullptr;
  const std::string dir = save_tiny(testing::tiny_gpt2(), &original);
  auto loaded = load_pretrained(dir);
  expect_same_logits(*original, *loaded);
  // HF layout: Conv1D weights stored [in, out].
  SafetensorsFile f = SafetensorsFile::open(dir + "/model.safetensors");
  ASSERT_NE(f.find("transformer.h.0.attn.c_attn.weight"), nullptr);
  EXPECT_EQ(f.find("transformer.h.0.attn.c_attn.weight")->shape, (Shape{16, 48}));
  EXPECT_EQ(f.find("lm_head.weight"), nullptr) << "tied head is not stored twice";
}

TEST_F(SafetensorsTest, LlamaSaveLoadGivesBitIdenticalLogits) {
  Transformer* original = nullptr;
  const std::string dir = save_tiny(testing::tiny_llama(), &original);
  auto loaded = load_pretrained(dir);
  expect_same_logits(*original, *loaded);
  SafetensorsFile f = SafetensorsFile::open(dir + "/model.safetensors");
  EXPECT_EQ(f.find("model.layers.1.self_attn.k_proj.weight")->shape, (Shape{8, 16}));
  auto config = nlohmann::json::parse(read_file(dir + "/config.json"));
  EXPECT_EQ(config["num_key_value_heads"], 2);
  EXPECT_EQ(config["model_type"], "llama");
}

TEST_F(SafetensorsTest, Bf16CheckpointLoadsCloseToF32) {
  Transformer m(testing::tiny_llama());
  m.init_weights(9);
  save_pretrained(m, path("bf16"), DType::kBF16);
  auto loaded = load_pretrained(path("bf16"));
  const float* a = m.params().data<float>();
  const float* b = loaded->params().data<float>();
  for (int64_t i = 0; i < m.num_parameters(); ++i)
    ASSERT_NEAR(a[i], b[i], std::abs(a[i]) * 1e-2 + 1e-6);
}

TEST_F(SafetensorsTest, TruncatedFileIsRejectedNamingFile) {
  const std::string dir = save_tiny(testing::tiny_gpt2());
  const std::string file = dir + "/model.safetensors";
  fs::resize_file(file, fs::file_size(file) - 100);
  expect_error([&] { load_pretrained(dir); }, {file, "transformer.ln_f.bias", "truncated"});
  fs::resize_file(file, 5);
  expect_error([&] { SafetensorsFile::open(file); }, {file, "truncated"});
}

TEST_F(SafetensorsTest, CorruptHeaderIsRejectedNamingFile) {
  const std::string dir = save_tiny(testing::tiny_gpt2());
  const std::string file = dir + "/model.safetensors";
  std::string bytes = read_file(file);
  bytes[8] = '#';  // the header's opening brace: no longer JSON
  std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
  expect_error([&] { load_pretrained(dir); }, {file, "corrupt safetensors header"});
  uint64_t huge = 1ull << 40;
  std::memcpy(bytes.data(), &huge, 8);
  std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
  expect_error([&] { SafetensorsFile::open(file); }, {file, "header length"});
}

TEST_F(SafetensorsTest, WrongDtypeIsRejectedNamingTensor) {
  const std::string dir = save_tiny(testing::tiny_gpt2());
  const std::string file = dir + "/model.safetensors";
  edit_header(file, [](nlohmann::json& h) {
    auto& e = h["transformer.h.1.mlp.c_fc.bias"];  // 32 floats = 128 bytes = 16 I64
    e["dtype"] = "I64";
    e["shape"] = {16};
  });
  expect_error([&] { load_pretrained(dir); }, {file, "transformer.h.1.mlp.c_fc.bias", "I64"});
  edit_header(file, [](nlohmann::json& h) { h["transformer.h.1.mlp.c_fc.bias"]["dtype"] = "Q4"; });
  expect_error([&] { load_pretrained(dir); }, {file, "transformer.h.1.mlp.c_fc.bias", "Q4"});
}

TEST_F(SafetensorsTest, MissingTensorIsRejectedNamingTensor) {
  const std::string dir = save_tiny(testing::tiny_llama());
  const std::string file = dir + "/model.safetensors";
  edit_header(file, [](nlohmann::json& h) { h.erase("model.layers.0.mlp.up_proj.weight"); });
  expect_error([&] { load_pretrained(dir); },
               {file, "model.layers.0.mlp.up_proj.weight", "missing"});
}

TEST_F(SafetensorsTest, WrongShapeAndOverlapsAreRejected) {
  const std::string dir = save_tiny(testing::tiny_llama());
  const std::string file = dir + "/model.safetensors";
  edit_header(file, [](nlohmann::json& h) {
    h["model.norm.weight"]["shape"] = {4, 4};  // same bytes, wrong shape
  });
  expect_error([&] { load_pretrained(dir); }, {file, "model.norm.weight", "shape"});
  edit_header(file, [](nlohmann::json& h) {
    h["model.norm.weight"]["shape"] = {16};
    h["model.norm.weight"]["data_offsets"] = h["lm_head.weight"]["data_offsets"];
    h["model.norm.weight"]["shape"] = h["lm_head.weight"]["shape"];
  });
  expect_error([&] { SafetensorsFile::open(file); }, {file, "overlap"});
}

TEST_F(SafetensorsTest, UnexpectedTensorIsRejected) {
  const std::string dir = save_tiny(testing::tiny_gpt2());
  Transformer other(testing::tiny_llama());
  expect_error([&] { load_weights(other, dir + "/model.safetensors"); }, {"missing tensor"});
}

TEST_F(SafetensorsTest, BadConfigJsonIsRejectedNamingKey) {
  const std::string dir = save_tiny(testing::tiny_gpt2());
  write_file_atomic(dir + "/config.json",
                    R"({"model_type": "gpt2", "vocab_size": 37, "n_positions": 16,
      "n_embd": 16, "n_layer": 2, "n_head": 5})");
  expect_error([&] { load_pretrained(dir); }, {"config.json", "n_head"});
  write_file_atomic(dir + "/config.json", R"({"model_type": "bert"})");
  expect_error([&] { load_pretrained(dir); }, {"config.json", "bert"});
}

TEST_F(SafetensorsTest, WriteIsAtomicAndLeavesNoTempFiles) {
  save_tiny(testing::tiny_gpt2());
  for (const auto& entry : fs::directory_iterator(path("model"))) {
    EXPECT_EQ(entry.path().string().find(".tmp."), std::string::npos) << entry.path();
  }
  EXPECT_THROW(write_file_atomic(path("no/such/dir/file"), "x"), Error);
}

TEST_F(SafetensorsTest, ManyTensorHeaderIsWrittenInLinearTime) {
  // A quadratic header writer (an ordered JSON object searching its keys on each insert) spends
  // minutes here; a linear one well under a second. The bound only guards against that hang.
  constexpr int kTensors = 300'000;
  std::vector<float> values(kTensors);
  std::vector<SafetensorsTensor> tensors;
  tensors.reserve(kTensors);
  for (int i = 0; i < kTensors; ++i) {
    values[i] = static_cast<float>(i);
    tensors.push_back({"t." + std::to_string(i), DType::kF32, {1}, &values[i]});
  }
  auto done = std::async(std::launch::async, [&] { write_safetensors(path("many"), tensors); });
  if (done.wait_for(std::chrono::seconds(120)) != std::future_status::ready) {
    ADD_FAILURE() << "writing 300k tensor entries did not finish in 120 s";
    std::_Exit(1);  // the writer thread cannot be cancelled
  }
  done.get();
  const SafetensorsFile f = SafetensorsFile::open(path("many"));
  float v = 0;
  f.read_f32("t.265432", {1}, &v);
  EXPECT_EQ(v, 265432.0f);
}

TEST_F(SafetensorsTest, DuplicateTensorNameIsRejected) {
  const float x = 1.0f;
  expect_error(
      [&] {
        write_safetensors(path("dup"), {{"a", DType::kF32, {1}, &x}, {"a", DType::kF32, {1}, &x}});
      },
      {"'a'", "twice"});
}

TEST_F(SafetensorsTest, FifoOrDirectoryIsRejectedWithoutBlocking) {
  ASSERT_EQ(::mkfifo(path("fifo").c_str(), 0644), 0);
  expect_error([&] { SafetensorsFile::open(path("fifo")); }, {"fifo", "FIFO"});
  expect_error([&] { read_file(path("fifo")); }, {"fifo", "FIFO"});
  fs::create_directories(path("dir"));
  expect_error([&] { SafetensorsFile::open(path("dir")); }, {"dir", "a directory"});
  expect_error([&] { read_file("/dev/zero"); }, {"/dev/zero", "character device"});
  write_file_atomic(path("big"), std::string(100, 'x'));
  expect_error([&] { read_file(path("big"), 10); }, {"big", "100 bytes"});
  EXPECT_EQ(read_file(path("big")).size(), 100u);
}

}  // namespace
}  // namespace tandem
