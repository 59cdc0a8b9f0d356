// The inference commands of the tandem CLI, as functions of plain option structs so any flag
// parser can drive them:
//   generate  one prompt (text streamed to stdout as it is produced), a prompt loop on stdin
//             (--interactive, the engine and its prefix cache kept between prompts), or a prompts
//             file (offline batch generation through the engine, JSON lines out, progress on
//             stderr);
//   tokenize  text -> token ids;
//   score     log-likelihood and perplexity of a text under a model.
// Bad input throws tandem::Error naming the flag, file or line; output is written byte-exact
// (a NUL byte in the generated text is written, not a string terminator).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "launch/engine_options.h"

namespace tandem {

struct GenerateCommandOptions {
  std::string model_dir;     // checkpoint directory (config.json, model.safetensors, tokenizer)
  std::string prompt;        // one prompt ...
  std::string prompts_file;  // ... or one JSON per line: "text" or {"prompt": "text", ...}
  std::string output;        // JSON lines for --prompts-file (required with it)
  bool interactive = false;  // a prompt loop: one prompt per stdin line, until end of input
  std::string device = "cpu";
  int threads = 0;  // 0 = OpenMP's default
  // Sampling (defaults for every prompt; a prompts-file line may override them by name).
  int max_new_tokens = 64;
  float temperature = 0.8f;
  int top_k = 40;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int logprobs = -1;  // >= 0: print each token's logprob and this many alternatives (stderr)
  // Engine.
  EngineOptions engine;
  int max_seqs = 64;
};

struct TokenizeCommandOptions {
  std::string tokenizer_dir;  // encoder.json + vocab.bpe (a checkpoint directory has them)
  std::string text;
  std::string file;  // instead of text
};

struct ScoreCommandOptions {
  std::string model_dir;
  std::string text;
  std::string file;  // instead of text
  std::string device = "cpu";
  int threads = 0;
};

int run_generate_command(const GenerateCommandOptions& options);
int run_tokenize_command(const TokenizeCommandOptions& options);
int run_score_command(const ScoreCommandOptions& options);

}  // namespace tandem
