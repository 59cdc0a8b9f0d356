#include "inference/generate.h"

#include <algorithm>

#include "runtime/error.h"

namespace tandem {

std::vector<int32_t> generate(Transformer& model, const std::vector<int32_t>& prompt,
                              const GenerateOptions& options) {
  require(!prompt.empty(), "generate: the prompt is empty");
  require(options.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  options.sampling.validate();
  const int vocab = model.config().vocab_size;
  const int window = model.config().max_seq_len;
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
