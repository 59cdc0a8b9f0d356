#include "training/evaluation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>

#include "parallel/rank_ordered_sum.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/random.h"

namespace tandem {

using json = nlohmann::json;

namespace {

// Code points of UTF-8 text (bytes that do not start a character are not counted).
int code_points(const std::string& s) {
  int n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80 ? 1 : 0;
  return n;
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// The prompt of one choice and the index of its first scored token (the harness's encoding).
struct ChoicePrompt {
  std::vector<int32_t> tokens;
  int start = 0;  // tokens[start..] are the choice's
};

// The context without its trailing whitespace, and its encoding (once per question).
struct EncodedContext {
  std::string text, trailing;
  std::vector<int32_t> tokens;
};

EncodedContext encode_context(const BpeTokenizer& tok, const std::string& context) {
  size_t cut = context.size();
  while (cut > 0 && is_space(context[cut - 1])) --cut;
  EncodedContext c{context.substr(0, cut), context.substr(cut), {}};
  c.tokens = tok.encode(c.text);
  return c;
}

ChoicePrompt encode_choice(const BpeTokenizer& tok, const EncodedContext& context,
                           const std::string& choice, int max_seq_len) {
  ChoicePrompt p;
  p.tokens = tok.encode(context.text + context.trailing + choice);
  p.start = static_cast<int>(context.tokens.size());
  if (context.tokens.empty()) {
    // An empty context: the choice is scored after the end-of-text token.
    require(tok.eot_id() >= 0, "evaluation: an empty context needs an end-of-text token");
    p.tokens.insert(p.tokens.begin(), tok.eot_id());
    p.start = 1;
  }
  // Longer than the context window: keep the end, as the harness does.
  const int keep = max_seq_len - 1;
  if (static_cast<int>(p.tokens.size()) > keep) {
    const int drop = static_cast<int>(p.tokens.size()) - keep;
    p.tokens.erase(p.tokens.begin(), p.tokens.begin() + drop);
    p.start = std::max(1, p.start - drop);
  }
  return p;
}

}  // namespace

std::vector<McQuestion> load_mc_task(const std::string& path) {
  std::istringstream lines(read_file(path));
  std::vector<McQuestion> out;
  std::string line;
  int line_no = 0;
  while (std::getline(lines, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = cat(path, ":", line_no);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw Error(cat(where, ": not JSON (", e.what(), ")"));
    }
    require(j.is_object(), where,
            ": expected {\"context\": \"...\", \"choices\": [\"...\", ...], \"label\": N}");
    for (const auto& [key, value] : j.items()) {
      require(key == "context" || key == "choices" || key == "label", where, ": unknown key \"",
              key, "\" (context, choices, label)");
    }
    require(j.contains("context") && j["context"].is_string(), where,
            ": \"context\" must be a string");
    require(j.contains("choices") && j["choices"].is_array() && j["choices"].size() >= 2, where,
            ": \"choices\" must be a list of 2 or more strings");
    McQuestion q;
    q.context = j["context"].get<std::string>();
    for (const json& c : j["choices"]) {
      require(c.is_string() && !c.get<std::string>().empty(), where,
              ": every choice must be a non-empty string, got ", c.dump());
      q.choices.push_back(c.get<std::string>());
    }
    require(j.contains("label") && j["label"].is_number_integer() &&
                j["label"].get<int64_t>() >= 0 &&
                j["label"].get<int64_t>() < static_cast<int64_t>(q.choices.size()),
            where, ": \"label\" must be an integer in [0, ", q.choices.size(), "), got ",
            j.contains("label") ? j["label"].dump() : std::string("nothing"));
    q.label = j["label"].get<int>();
    out.push_back(std::move(q));
  }
  require(!out.empty(), path, ": the task has no questions");
  return out;
}

void write_mc_task(const std::string& path, const std::vector<McQuestion>& questions) {
  std::string text;
  for (const McQuestion& q : questions) {
    text += json{{"context", q.context}, {"choices", q.choices}, {"label", q.label}}.dump();
    text += '\n';
  }
  write_file_atomic(path, text);
}

std::vector<McQuestion> build_next_verse_task(const std::string& corpus_text, int count,
                                              double holdout_fraction, int context_lines,
                                              uint64_t seed) {
  require(count > 0, "task: the number of questions must be > 0");
  require(holdout_fraction > 0.0 && holdout_fraction < 1.0,
          "task: the held-out fraction must be in (0, 1)");
  require(context_lines >= 1, "task: context_lines must be >= 1");
  std::vector<std::string> all;
  std::istringstream in(corpus_text);
  for (std::string line; std::getline(in, line);) {
    while (!line.empty() && is_space(line.back())) line.pop_back();
    if (!line.empty()) all.push_back(line);
  }
  const size_t held = static_cast<size_t>(std::ceil(all.size() * holdout_fraction));
  require(held >= static_cast<size_t>(context_lines) + 4, "task: the corpus has too few lines (",
          all.size(), ") for a held-out ", holdout_fraction, " of them");
  const std::vector<std::string> lines(all.end() - static_cast<std::ptrdiff_t>(held), all.end());
  // Held-out verse indices by length, for the distractors.
  std::vector<size_t> by_length(lines.size());
  std::iota(by_length.begin(), by_length.end(), 0);
  Rng rng(seed);
  std::vector<McQuestion> out;
  const size_t stride = static_cast<size_t>(context_lines) + 1;
  for (size_t first = 0; first + stride <= lines.size() && static_cast<int>(out.size()) < count;
       first += stride) {
    const size_t answer = first + context_lines;
    std::string context;
    for (size_t i = first; i < answer; ++i) context += (i > first ? " " : "") + lines[i];
    const size_t target = lines[answer].size();
    // The 8 verses closest in length (ties: earlier first), none of this question's own.
    std::vector<size_t> near;
    for (size_t i : by_length) {
      if (i < first || i > answer) near.push_back(i);
    }
    std::stable_sort(near.begin(), near.end(), [&](size_t a, size_t b) {
      const auto da = static_cast<int64_t>(lines[a].size()) - static_cast<int64_t>(target);
      const auto db = static_cast<int64_t>(lines[b].size()) - static_cast<int64_t>(target);
      return std::llabs(da) < std::llabs(db);
    });
    near.resize(std::min<size_t>(near.size(), 8));
    for (size_t i = near.size(); i > 1; --i) std::swap(near[i - 1], near[rng.below(i)]);
    McQuestion q;
    q.context = context;
    q.label = static_cast<int>(rng.below(4));
    for (int k = 0, d = 0; k < 4; ++k) {
      q.choices.push_back(" " + (k == q.label ? lines[answer] : lines[near[d++]]));
    }
    const bool longer = std::all_of(q.choices.begin(), q.choices.end(), [&](const std::string& c) {
      return q.context.size() > c.size();
    });
    if (longer) out.push_back(std::move(q));
  }
  require(static_cast<int>(out.size()) == count, "task: only ", out.size(),
          " questions could be made from the held-out ", held, " lines (", count,
          " asked); raise the held-out fraction");
  return out;
}

EngineConfig evaluation_engine_config(const EvalOptions& options, const BpeTokenizer& tokenizer,
                                      Communicator* tp) {
  EngineConfig ec;
  ec.kv_cache_mb = options.kv_cache_mb;
  ec.block_size = options.block_size;
  ec.batch_invariant = true;
  ec.prefix_caching = options.prefix_caching;
  ec.eos_token = tokenizer.eot_id();
  ec.seed = options.seed;
  ec.token_text = [&tokenizer](int32_t id) { return tokenizer.decode_token(id); };
  if (tp != nullptr && tp->size() > 1) {
    // Every rank's pool has as many blocks (one block id is the same slot everywhere).
    ec.agree_num_blocks = [tp](int blocks) {
      const std::vector<double> all = gather_in_rank_order(*tp, blocks);
      return static_cast<int>(*std::min_element(all.begin(), all.end()));
    };
  }
  return ec;
}

McResult score_mc_task(Engine& engine, const BpeTokenizer& tokenizer,
                       const std::vector<McQuestion>& questions, const EvalOptions& options,
                       Communicator* dp) {
  const auto t0 = std::chrono::steady_clock::now();
  const int n = options.limit > 0 ? std::min<int>(options.limit, static_cast<int>(questions.size()))
                                  : static_cast<int>(questions.size());
  // Where each question's choices sit in the flat arrays every rank reduces.
  std::vector<int> offset(n + 1, 0);
  for (int q = 0; q < n; ++q)
    offset[q + 1] = offset[q] + static_cast<int>(questions[q].choices.size());
  std::vector<float> loglik(offset[n], 0.0f), tokens(offset[n], 0.0f);
  const int ranks = dp != nullptr ? dp->size() : 1, rank = dp != nullptr ? dp->rank() : 0;
  const int begin = static_cast<int>(static_cast<int64_t>(n) * rank / ranks);
  const int end = static_cast<int>(static_cast<int64_t>(n) * (rank + 1) / ranks);
  const int max_seq_len = engine.model().config().max_seq_len;
  const int wave = std::max(1, options.wave);
  for (int w = begin; w < end; w += wave) {
    const int w_end = std::min(end, w + wave);
    // Phase 0: the first choice of every question (it computes the context); phase 1: the
    // others, which find the context's blocks in the prefix cache.
    for (int phase = 0; phase < 2; ++phase) {
      std::vector<GenerationRequest> requests;
      std::vector<int> slots;
      for (int q = w; q < w_end; ++q) {
        const McQuestion& question = questions[q];
        const EncodedContext context = encode_context(tokenizer, question.context);
        const int k_begin = phase == 0 ? 0 : 1;
        const int k_end = phase == 0 ? 1 : static_cast<int>(question.choices.size());
        for (int k = k_begin; k < k_end; ++k) {
          const ChoicePrompt p =
              encode_choice(tokenizer, context, question.choices[k], max_seq_len);
          if (p.start >= static_cast<int>(p.tokens.size())) continue;  // no token of its own
          GenerationRequest r;
          r.prompt = p.tokens;
          r.prompt_logprobs_start = p.start;
          r.max_tokens = 0;
          requests.push_back(std::move(r));
          slots.push_back(offset[q] + k);
        }
      }
      if (requests.empty()) continue;
      const std::vector<GenerationDelta> done = engine.generate(std::move(requests));
      for (size_t i = 0; i < done.size(); ++i) {
        require(done[i].finish == FinishReason::kLength,
                "evaluation: scoring a choice failed: ", done[i].error);
        double sum = 0.0;
        for (float lp : done[i].prompt_logprobs) sum += lp;
        loglik[slots[i]] = static_cast<float>(sum);
        tokens[slots[i]] = static_cast<float>(done[i].prompt_logprobs.size());
      }
    }
  }
  if (dp != nullptr && dp->size() > 1) {
    // Each value comes from exactly one rank: the sum is that value, bit for bit.
    dp->all_reduce(loglik.data(), loglik.size(), DType::kF32, ReduceOp::kSum);
    dp->all_reduce(tokens.data(), tokens.size(), DType::kF32, ReduceOp::kSum);
  }
  McResult result;
  result.count = n;
  for (int q = 0; q < n; ++q) {
    const McQuestion& question = questions[q];
    QuestionScore s;
    s.index = q;
    s.label = question.label;
    double best = -std::numeric_limits<double>::infinity();
    double best_norm = best;
    for (size_t k = 0; k < question.choices.size(); ++k) {
      ChoiceScore c;
      c.loglik = loglik[offset[q] + k];
      c.tokens = static_cast<int>(tokens[offset[q] + k]);
      c.chars = code_points(question.choices[k]);
      const double norm = static_cast<double>(c.loglik) / std::max(1, c.chars);
      if (c.loglik > best) {
        best = c.loglik;
        s.pred = static_cast<int>(k);
      }
      if (norm > best_norm) {
        best_norm = norm;
        s.pred_norm = static_cast<int>(k);
      }
      s.choices.push_back(c);
    }
    result.correct += s.pred == s.label ? 1 : 0;
    result.correct_norm += s.pred_norm == s.label ? 1 : 0;
    result.questions.push_back(std::move(s));
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

std::vector<PromptResult> run_prompts(Engine& engine, const BpeTokenizer& tokenizer,
                                      const std::vector<std::string>& prompts,
                                      const EvalOptions& options) {
  std::vector<GenerationRequest> requests;
  for (const std::string& prompt : prompts) {
    std::vector<int32_t> ids = tokenizer.encode(prompt);
    if (ids.empty() && tokenizer.eot_id() >= 0) ids = {tokenizer.eot_id()};
    GenerationRequest greedy;
    greedy.prompt = ids;
    greedy.max_tokens = options.max_new_tokens;
    greedy.sampling.temperature = 0.0f;
    GenerationRequest sampled = greedy;
    sampled.sampling.temperature = options.temperature;
    sampled.sampling.top_k = options.top_k;
    sampled.seed = options.seed;
    requests.push_back(std::move(greedy));
    requests.push_back(std::move(sampled));
  }
  const std::vector<GenerationDelta> done = engine.generate(std::move(requests));
  std::vector<PromptResult> out;
  for (size_t i = 0; i < prompts.size(); ++i) {
    for (const GenerationDelta* d : {&done[2 * i], &done[2 * i + 1]}) {
      require(d->finish != FinishReason::kError, "evaluation: prompt ", i + 1, " (\"", prompts[i],
              "\"): ", d->error);
    }
    out.push_back({prompts[i], done[2 * i].text, done[2 * i + 1].text});
  }
  return out;
}

std::vector<std::string> load_prompts_file(const std::string& path) {
  std::istringstream lines(read_file(path));
  std::vector<std::string> out;
  int line_no = 0;
  for (std::string line; std::getline(lines, line);) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    if (line.front() == '"') {
      try {
        const json j = json::parse(line);
        require(j.is_string(), path, ":", line_no, ": expected a JSON string or plain text");
        out.push_back(j.get<std::string>());
      } catch (const json::exception& e) {
        throw Error(cat(path, ":", line_no, ": a line starting with '\"' must be a JSON string (",
                        e.what(), ")"));
      }
    } else {
      out.push_back(line);
    }
  }
  require(!out.empty(), path, ": no prompts");
  return out;
}

std::string evaluation_report(long step, const std::vector<McQuestion>& questions,
                              const McResult& result, const std::vector<PromptResult>& prompts,
                              int worst) {
  std::ostringstream md;
  md << "# Evaluation at step " << step << "\n\n";
  if (result.count > 0) {
    char line[160];
    std::snprintf(line, sizeof(line),
                  "Multiple choice: **acc %.4f**, **acc_norm %.4f** over %d questions (%.1f s)\n\n",
                  result.acc(), result.acc_norm(), result.count, result.seconds);
    md << line;
  }
  if (!prompts.empty()) {
    md << "## Generations\n\n";
    for (const PromptResult& p : prompts) {
      md << "**Prompt:** " << p.prompt << "\n\n";
      md << "- greedy: " << p.prompt << p.greedy << "\n";
      md << "- sampled: " << p.prompt << p.sampled << "\n\n";
    }
  }
  if (result.count > 0) {
    // Most wrong: the largest margin of the best wrong choice over the right one.
    std::vector<std::pair<double, int>> margins;
    for (const QuestionScore& s : result.questions) {
      double wrong = -std::numeric_limits<double>::infinity();
      for (size_t k = 0; k < s.choices.size(); ++k) {
        if (static_cast<int>(k) != s.label) wrong = std::max<double>(wrong, s.choices[k].loglik);
      }
      margins.emplace_back(wrong - s.choices[s.label].loglik, s.index);
    }
    std::stable_sort(margins.begin(), margins.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    md << "## The " << std::min<int>(worst, static_cast<int>(margins.size()))
       << " questions the model got most wrong\n\n";
    for (int i = 0; i < worst && i < static_cast<int>(margins.size()); ++i) {
      const QuestionScore& s = result.questions[margins[i].second];
      const McQuestion& q = questions[s.index];
      md << i + 1 << ". (question " << s.index + 1 << ", margin " << margins[i].first << " nats) "
         << q.context << "\n";
      for (size_t k = 0; k < q.choices.size(); ++k) {
        md << "   - " << (static_cast<int>(k) == s.label ? "[right] " : "")
           << (static_cast<int>(k) == s.pred ? "[chosen] " : "") << q.choices[k] << " ("
           << s.choices[k].loglik << ")\n";
      }
      md << "\n";
    }
  }
  return md.str();
}

}  // namespace tandem
