// Evaluation through the inference engine: multiple-choice scoring of a task file the way
// lm-evaluation-harness scores HellaSwag-style tasks, and generations for a fixed prompt list.
// The trainer runs it in the loop on the weights it is training (every eval.every steps) and
// `tandem eval` on a saved checkpoint: the same code, so the figures agree exactly.
//
// Scoring. A question is {"context", "choices", "label"}. For each choice: the context's
// trailing whitespace moves to the front of the choice; the tokens of the choice are
// encode(context + choice) after the first len(encode(context)) tokens (an empty context is the
// end-of-text token); its log-likelihood is the sum of those tokens' log-probabilities given
// everything before them, from the engine's prompt log-probabilities (a score-only request).
// acc: the argmax of the sums is the label; acc_norm: the argmax of the sums divided by the
// choice's length in characters (code points), as the harness does. Ties go to the first choice.
// The first choice of each question in a wave runs first, the others then find the context's KV
// blocks in the prefix cache.
//
// Parallelism. With a data-parallel group, rank r scores its contiguous share of the questions
// and the shares are summed (each value comes from exactly one rank, so the sum is exact and
// the dp degree changes no figure). With a tensor-parallel model, the ranks of a tp group each
// run an Engine of their own on their slice, in lockstep: every request is added before the
// engine steps (Engine::generate) and nothing depends on timing, so each rank takes the same
// steps, whose forward_paged is the tp collective; greedy and seeded sampling read the whole
// logits, which every rank holds. No step-plan broadcast (serving/) is needed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "inference/engine.h"
#include "runtime/communicator.h"
#include "runtime/tokenizer.h"
#include "runtime/transformer.h"

namespace tandem {

struct McQuestion {
  std::string context;
  std::vector<std::string> choices;
  int label = 0;
};

// Reads a JSONL task file: one {"context": str, "choices": [str, ...] (2 or more), "label": int}
// per line; blank lines are skipped. A bad line throws tandem::Error naming FILE:LINE.
std::vector<McQuestion> load_mc_task(const std::string& path);
void write_mc_task(const std::string& path, const std::vector<McQuestion>& questions);

// The shipped task, built deterministically from a corpus of one passage per line (the KJV,
// one verse per line): "which of four verses follows these verses". Only the last
// `holdout_fraction` of the lines are used (keep it inside the validation split: `tandem
// prepare` holds out the last --val-fraction of each file). Context: `context_lines`
// consecutive verses; the right choice: the verse after them; three distractors: verses of the
// held-out text whose length is closest to the right one's (not the context's or the answer's
// own), in a seeded order; the label's position is seeded too. Only questions whose context is
// longer than every choice are kept. Throws when fewer than `count` questions can be made.
std::vector<McQuestion> build_next_verse_task(const std::string& corpus_text, int count,
                                              double holdout_fraction = 0.03, int context_lines = 2,
                                              uint64_t seed = 1);

struct ChoiceScore {
  float loglik = 0.0f;  // sum of the choice tokens' log-probabilities
  int tokens = 0;
  int chars = 0;  // code points of the choice as given
};

struct QuestionScore {
  int index = 0;  // in the task
  int label = 0;
  int pred = 0, pred_norm = 0;
  std::vector<ChoiceScore> choices;
};

struct McResult {
  int count = 0;
  int correct = 0, correct_norm = 0;
  double acc() const { return count > 0 ? static_cast<double>(correct) / count : 0.0; }
  double acc_norm() const { return count > 0 ? static_cast<double>(correct_norm) / count : 0.0; }
  std::vector<QuestionScore> questions;  // every question, in task order
  double seconds = 0.0;
};

struct PromptResult {
  std::string prompt;
  std::string greedy, sampled;  // continuations
};

struct EvalOptions {
  int limit = 0;             // > 0: the first `limit` questions only
  int wave = 64;             // questions whose choices are in the engine at once
  int max_new_tokens = 32;   // per prompt continuation
  float temperature = 0.8f;  // the sampled continuation (seeded)
  int top_k = 40;
  uint64_t seed = 1234;
  int64_t kv_cache_mb = 64;
  bool prefix_caching = true;
  // Small blocks: a choice shares every full block of its context, so the part of the context
  // recomputed per choice (under one block) stays small (bench_eval: 4 tokens gave 1.64x
  // against 1.54x with 8 and 1.41x with 16 on the demo's task).
  int block_size = 4;
};

// An engine for evaluation on `model` (its weights as they are now): offline (the caller
// steps it), batch-invariant, with the KV pool agreed over `tp` (may be null).
EngineConfig evaluation_engine_config(const EvalOptions& options, const BpeTokenizer& tokenizer,
                                      Communicator* tp);

// Scores the questions (their dp share: `dp` may be null) through `engine`; every rank of the
// dp group returns the whole result. Collective over dp (and, through the model, tp).
McResult score_mc_task(Engine& engine, const BpeTokenizer& tokenizer,
                       const std::vector<McQuestion>& questions, const EvalOptions& options,
                       Communicator* dp);

// Greedy and seeded-sampled continuations of each prompt (all ranks run them: the tp group in
// lockstep; dp ranks compute the same).
std::vector<PromptResult> run_prompts(Engine& engine, const BpeTokenizer& tokenizer,
                                      const std::vector<std::string>& prompts,
                                      const EvalOptions& options);

// A prompts file: one prompt per line, as a JSON string ("text") or plain text; blank lines
// skipped.
std::vector<std::string> load_prompts_file(const std::string& path);

// The readable report (eval/step_XXXXXXXX.md): the prompts with their continuations, the task's
// accuracy and the `worst` questions the model got most wrong (largest margin of a wrong choice
// over the right one).
std::string evaluation_report(long step, const std::vector<McQuestion>& questions,
                              const McResult& result, const std::vector<PromptResult>& prompts,
                              int worst = 5);

}  // namespace tandem
