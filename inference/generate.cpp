#include "inference/generate.h"

#include <algorithm>

#include "inference/engine.h"
#include "runtime/error.h"

namespace tandem {

namespace {
// Through the engine: one request over a KV pool just large enough for it.
std::vector<int32_t> generate_with_engine(Transformer& model, const std::vector<int32_t>& prompt,
                                          const GenerateOptions& options) {
  EngineConfig config;
  config.block_size = 16;
  const int tokens = static_cast<int>(prompt.size()) + options.max_new_tokens;
  config.num_blocks = (tokens + config.block_size - 1) / config.block_size + 1;
  config.max_seqs = 1;
  config.max_batched_tokens = 256;  // a longer prompt is prefilled in chunks
  config.prefix_caching = false;
  config.eos_token = options.stop_token;
  // The snapshot of these weights is stale once training goes on: released however this ends.
  struct Release {
    Transformer& model;
    ~Release() { model.release_inference(); }
  } release{model};
  std::vector<int32_t> out;
  {
    Engine engine(model, config);
    GenerationRequest request;
    request.prompt = prompt;
    request.max_tokens = options.max_new_tokens;
    request.sampling = options.sampling;
    request.seed = options.seed;
    const std::shared_ptr<RequestStream> stream = engine.add_request(std::move(request));
    while (engine.step()) {
      if (options.stop != nullptr && options.stop->load() != 0) {
        engine.abort(stream->id());
        break;
      }
    }
    const GenerationDelta all = stream->wait_all();
    // Rejected, or the model step failed: never a silently short sample.
    require(all.finish != FinishReason::kError && all.error.empty(), "generate: ", all.error);
    out = all.tokens;
  }
  return out;
}
}  // namespace

std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt,
                              const GenerateOptions& options) {
  require(!prompt.empty(), "generate: the prompt is empty");
  require(options.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  options.sampling.validate();
  const int vocab = model.config().vocab_size;
  const int window = model.config().max_seq_len;
  if (options.max_new_tokens == 0) return {};
  // The tensor-parallel inference path is a collective; a caller here holds a whole model.
  if (static_cast<int64_t>(prompt.size()) + options.max_new_tokens <= window &&
      model.tp_size() == 1) {
    return generate_with_engine(model, prompt, options);
  }
  std::vector<int32_t> context = prompt;
  std::vector<int32_t> out;
  Rng rng(options.seed);
  for (int i = 0; i < options.max_new_tokens; ++i) {
    if (options.stop != nullptr && options.stop->load() != 0) break;
    const int start = std::max(0, static_cast<int>(context.size()) - window);
    const int T = static_cast<int>(context.size()) - start;
    model.forward(context.data() + start, nullptr, 1, T);
    const Tensor last = model.logits().slice(0, T - 1, T).to(Device::cpu());
    const int32_t next = sample_token(last.data<float>(), vocab, options.sampling, rng);
    out.push_back(next);
    if (next == options.stop_token) break;
    context.push_back(next);
  }
  return out;
}

std::string generate_text(Transformer& model, const BpeTokenizer& tokenizer,
                          const std::string& prompt, GenerateOptions options) {
  std::vector<int32_t> ids = tokenizer.encode(prompt);
  if (ids.empty()) ids = {tokenizer.eot_id() >= 0 ? tokenizer.eot_id() : 0};
  options.stop_token = tokenizer.eot_id();
  std::vector<int32_t> out = generate(model, ids, options);
  if (!out.empty() && out.back() == options.stop_token) out.pop_back();
  return prompt + tokenizer.decode(out);
}

}  // namespace tandem
