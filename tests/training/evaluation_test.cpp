// Evaluation through the engine (training/evaluation.h): each choice's log-likelihood equals a
// brute-force dense forward, acc/acc_norm follow the harness's rules, the prefix cache changes
// no figure, task files are checked line by line, and the shipped task is built from held-out
// text, deterministically.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <string>

#include "runtime/file_io.h"
#include "runtime/tokenizer.h"
#include "runtime/transformer.h"
#include "tests/test_support.h"
#include "training/evaluation.h"

namespace tandem {
namespace {

const std::vector<std::string> kTexts = {
    "In the beginning God created the heaven and the earth. And the earth was without form, and "
    "void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face "
    "of the waters. And God said, Let there be light: and there was light."};

class EvaluationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tokenizer_ = std::make_unique<BpeTokenizer>(BpeTokenizer::train(kTexts, 300));
    ModelConfig c;
    c.family = ModelFamily::kGpt2;
    c.vocab_size = tokenizer_->vocab_size();
    c.max_seq_len = 64;
    c.n_embd = 32;
    c.n_layer = 2;
    c.n_head = 4;
    c.n_kv_head = 4;
    c.ffn_hidden = 64;
    model_ = std::make_unique<Transformer>(c);
    model_->init_weights(5);
    questions_ = {{"And the earth was without form, ", {"and void", "and light", "of the deep"}, 0},
                  {"And God said,", {" Let there be light", " the waters", " and darkness was"}, 0},
                  {"", {"In the beginning", "The heaven"}, 1},
                  {"darkness was upon the face of the deep. And the Spirit of God moved upon",
                   {" the face of the waters.", " the earth.", " God."},
                   2}};
  }
  // The log-likelihood of `choice` after `context` by a dense forward over the whole text
  // (the harness's encoding: trailing whitespace of the context moves to the choice).
  double dense_loglik(const std::string& context, const std::string& choice) {
    size_t cut = context.size();
    while (cut > 0 && context[cut - 1] == ' ') --cut;
    std::vector<int32_t> ctx = tokenizer_->encode(context.substr(0, cut));
    std::vector<int32_t> all =
        tokenizer_->encode(context.substr(0, cut) + context.substr(cut) + choice);
    if (ctx.empty()) {
      all.insert(all.begin(), tokenizer_->eot_id());
      ctx = {tokenizer_->eot_id()};
    }
    const int T = static_cast<int>(all.size());
    std::vector<int32_t> targets(T, -1);
    for (int p = static_cast<int>(ctx.size()) - 1; p < T - 1; ++p) targets[p] = all[p + 1];
    const int scored = T - static_cast<int>(ctx.size());
    return -static_cast<double>(model_->forward(all.data(), targets.data(), 1, T)) * scored;
  }
  std::unique_ptr<BpeTokenizer> tokenizer_;
  std::unique_ptr<Transformer> model_;
  std::vector<McQuestion> questions_;
  testing::ScratchDir scratch_{"evaluation"};
};

TEST_F(EvaluationTest, ChoiceLogLikelihoodsEqualADenseForwardAndPredictionsFollowThem) {
  std::vector<std::vector<double>> expected;
  for (const McQuestion& q : questions_) {
    expected.emplace_back();
    for (const std::string& c : q.choices) expected.back().push_back(dense_loglik(q.context, c));
  }
  EvalOptions options;
  options.block_size = 4;
  McResult with_cache, without_cache;
  {
    Engine engine(*model_, evaluation_engine_config(options, *tokenizer_, nullptr));
    with_cache = score_mc_task(engine, *tokenizer_, questions_, options, nullptr);
    EXPECT_GT(engine.stats().prefix_hit_rate, 0.0) << "the choices share their context's blocks";
  }
  options.prefix_caching = false;
  {
    Engine engine(*model_, evaluation_engine_config(options, *tokenizer_, nullptr));
    without_cache = score_mc_task(engine, *tokenizer_, questions_, options, nullptr);
  }
  ASSERT_EQ(with_cache.count, 4);
  int correct = 0, correct_norm = 0;
  for (size_t q = 0; q < questions_.size(); ++q) {
    const QuestionScore& s = with_cache.questions[q];
    int best = 0, best_norm = 0;
    for (size_t k = 0; k < questions_[q].choices.size(); ++k) {
      EXPECT_NEAR(s.choices[k].loglik, expected[q][k], 1e-5 * std::fabs(expected[q][k]))
          << "question " << q << " choice " << k;
      EXPECT_EQ(s.choices[k].loglik, without_cache.questions[q].choices[k].loglik)
          << "the prefix cache changes no bit";
      EXPECT_EQ(s.choices[k].chars, static_cast<int>(questions_[q].choices[k].size()));
      if (expected[q][k] > expected[q][best]) best = static_cast<int>(k);
      if (expected[q][k] / questions_[q].choices[k].size() >
          expected[q][best_norm] / questions_[q].choices[best_norm].size())
        best_norm = static_cast<int>(k);
    }
    EXPECT_EQ(s.pred, best) << q;
    EXPECT_EQ(s.pred_norm, best_norm) << q;
    correct += best == questions_[q].label ? 1 : 0;
    correct_norm += best_norm == questions_[q].label ? 1 : 0;
  }
  EXPECT_EQ(with_cache.correct, correct);
  EXPECT_EQ(with_cache.correct_norm, correct_norm);
  EXPECT_DOUBLE_EQ(with_cache.acc(), correct / 4.0);
}

TEST_F(EvaluationTest, PromptsGetTheEnginesGreedyContinuation) {
  EvalOptions options;
  options.max_new_tokens = 6;
  Engine engine(*model_, evaluation_engine_config(options, *tokenizer_, nullptr));
  const auto results = run_prompts(engine, *tokenizer_, {"And God said", "In the"}, options);
  ASSERT_EQ(results.size(), 2u);
  GenerationRequest r;
  r.prompt = tokenizer_->encode("And God said");
  r.max_tokens = 6;
  r.sampling.temperature = 0.0f;
  EXPECT_EQ(results[0].greedy, engine.generate({r})[0].text);
  EXPECT_FALSE(results[1].sampled.empty());
}

TEST_F(EvaluationTest, TaskFilesAreCheckedLineByLine) {
  const std::string path = (scratch_.path() / "task.jsonl").string();
  auto error_of = [&](const std::string& text) {
    write_file_atomic(path, text);
    return testing::error_message_of([&] { load_mc_task(path); });
  };
  const std::string good = R"({"context": "a", "choices": ["b", "c"], "label": 1})";
  EXPECT_EQ(load_mc_task((write_file_atomic(path, good + "\n\n" + good + "\n"), path)).size(), 2u);
  EXPECT_NE(error_of(good + "\nnot json\n").find(":2: not JSON"), std::string::npos);
  EXPECT_NE(error_of(R"({"context": "a", "choices": ["b"], "label": 0})").find(":1: \"choices\""),
            std::string::npos);
  EXPECT_NE(error_of(R"({"context": "a", "choices": ["b", "c"], "label": 2})").find("\"label\""),
            std::string::npos);
  EXPECT_NE(error_of(R"({"context": "a", "choices": ["b", ""], "label": 0})").find("non-empty"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"context": 3, "choices": ["b", "c"], "label": 0})").find("\"context\""),
            std::string::npos);
  EXPECT_NE(error_of(R"({"context": "a", "choices": ["b", "c"], "label": 0, "x": 1})")
                .find("unknown key \"x\""),
            std::string::npos);
  EXPECT_NE(error_of("\n").find("no questions"), std::string::npos);
}

TEST_F(EvaluationTest, TheNextLineTaskUsesOnlyTheHeldOutEndAndIsDeterministic) {
  std::string corpus;
  for (int i = 0; i < 2000; ++i) {
    corpus += "line " + std::to_string(i) + std::string(20 + (i * 7) % 40, 'x') + "\n";
  }
  const auto a = build_next_verse_task(corpus, 30, 0.1, 2, 7);
  const auto b = build_next_verse_task(corpus, 30, 0.1, 2, 7);
  ASSERT_EQ(a.size(), 30u);
  std::vector<int> labels(4, 0);
  for (size_t q = 0; q < a.size(); ++q) {
    EXPECT_EQ(a[q].context, b[q].context);
    EXPECT_EQ(a[q].choices, b[q].choices);
    EXPECT_EQ(a[q].label, b[q].label);
    ASSERT_EQ(a[q].choices.size(), 4u);
    ++labels[a[q].label];
    for (const std::string& c : a[q].choices) {
      // Only the last 10% (lines 1800..1999), and every choice shorter than the context.
      EXPECT_GE(std::stoi(c.substr(6)), 1800) << c;
      EXPECT_GT(a[q].context.size(), c.size());
    }
    // The right choice is the line after the context's last one.
    const int last = std::stoi(a[q].context.substr(a[q].context.rfind("line ") + 5));
    EXPECT_EQ(std::stoi(a[q].choices[a[q].label].substr(6)), last + 1);
  }
  for (int n : labels) EXPECT_GT(n, 0) << "labels spread over the positions";
  EXPECT_NE(
      testing::error_message_of([&] { build_next_verse_task(corpus, 5000, 0.1); }).find("only"),
      std::string::npos);
}

}  // namespace
}  // namespace tandem
