#include "launch/eval_command.h"

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "kernels/cpu/kernels.h"
#include "parallel/mpi_communicator.h"
#include "parallel/parallel_context.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/model_io.h"
#include "runtime/tokenizer.h"
#include "training/evaluation.h"

namespace tandem {

namespace fs = std::filesystem;

int run_eval_command(const EvalCommandOptions& o) {
  require(!o.task.empty() || !o.prompts_file.empty(),
          "eval: give --task FILE, --prompts FILE or both");
  // Under mpirun: one tensor-parallel model over every rank.
  std::unique_ptr<ParallelContext> parallel;
  if (launched_under_mpi()) {
    mpi_initialize();
    ParallelOptions p;
    p.tp = mpi_world_size();
    parallel = ParallelContext::create(p);
    if (parallel->world_size() == 1) parallel.reset();
  }
  const bool root = parallel == nullptr || parallel->rank() == 0;
  int threads = o.threads;
  if (parallel && threads == 0) threads = default_threads_per_rank();
  if (threads > 0) cpu::set_num_threads(threads);
  require(fs::exists(fs::path(o.model_dir) / "encoder.json"), o.model_dir,
          " has no tokenizer files (encoder.json, vocab.bpe)");
  // Read the inputs before the model: a bad task file fails at once.
  const std::vector<McQuestion> questions =
      o.task.empty() ? std::vector<McQuestion>{} : load_mc_task(o.task);
  const std::vector<std::string> prompts =
      o.prompts_file.empty() ? std::vector<std::string>{} : load_prompts_file(o.prompts_file);
  const BpeTokenizer tokenizer = BpeTokenizer::load_dir(o.model_dir);
  Communicator* tp = parallel ? &parallel->tp() : nullptr;
  std::unique_ptr<Transformer> model = load_pretrained(o.model_dir, Device::cpu(), tp);
  EvalOptions options;
  options.limit = o.limit;
  options.kv_cache_mb = o.kv_cache_mb;
  options.max_new_tokens = o.max_new_tokens;
  options.prefix_caching = o.prefix_caching;
  Engine engine(*model, evaluation_engine_config(options, tokenizer, tp));
  McResult result;
  if (!questions.empty()) result = score_mc_task(engine, tokenizer, questions, options, nullptr);
  const std::vector<PromptResult> generations =
      prompts.empty() ? std::vector<PromptResult>{}
                      : run_prompts(engine, tokenizer, prompts, options);
  if (!root) return 0;
  if (o.json) {
    nlohmann::json j;
    j["model"] = o.model_dir;
    if (!questions.empty()) {
      j["task"] = o.task;
      j["count"] = result.count;
      j["acc"] = result.acc();
      j["acc_norm"] = result.acc_norm();
      j["seconds"] = result.seconds;
      nlohmann::json per = nlohmann::json::array();
      for (const QuestionScore& s : result.questions) {
        nlohmann::json q = {
            {"index", s.index}, {"label", s.label}, {"pred", s.pred}, {"pred_norm", s.pred_norm}};
        for (const ChoiceScore& c : s.choices) {
          q["loglik"].push_back(c.loglik);
          q["tokens"].push_back(c.tokens);
        }
        per.push_back(q);
      }
      j["questions"] = per;
    }
    for (const PromptResult& p : generations) {
      j["prompts"].push_back({{"prompt", p.prompt}, {"greedy", p.greedy}, {"sampled", p.sampled}});
    }
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return 0;
  }
  for (const PromptResult& p : generations) {
    std::printf("prompt: %s\n  greedy:  %s%s\n  sampled: %s%s\n", p.prompt.c_str(),
                p.prompt.c_str(), p.greedy.c_str(), p.prompt.c_str(), p.sampled.c_str());
  }
  if (!questions.empty()) {
    std::printf("acc %.4f  acc_norm %.4f  count %d  (%s, %.2f s)\n", result.acc(),
                result.acc_norm(), result.count, o.task.c_str(), result.seconds);
  }
  return 0;
}

int run_make_task_command(const MakeTaskOptions& o) {
  const std::vector<McQuestion> questions = build_next_verse_task(
      read_file(o.input), o.questions, o.holdout_fraction, o.context_lines, o.seed);
  write_mc_task(o.out, questions);
  std::fprintf(stderr, "tandem: %zu questions written to %s (from the last %.1f%% of %s)\n",
               questions.size(), o.out.c_str(), 100.0 * o.holdout_fraction, o.input.c_str());
  return 0;
}

}  // namespace tandem
