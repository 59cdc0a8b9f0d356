// Engine: the one entry point for serving a model (CLI, gRPC service, the trainer's evaluation).
//
// add_request() returns a RequestStream of deltas (new tokens, their text, log-probabilities)
// ending with one final delta that carries the finish reason and the usage. A bad request (empty
// prompt, a prompt that leaves no room in the context or can never fit the KV pool, tokens
// outside the vocabulary, max_tokens <= 0, invalid sampling values, stop strings without a
// detokenizer) gets a stream that ends at once with FinishReason::kError and a message naming
// the field; the engine keeps serving the others. A model step that throws ends every live
// request with kError and the error, or, with EngineConfig::on_step_failure, takes the engine
// out of service (kAbort for everything). Each step (Scheduler) mixes decode rows and
// prefill chunks, runs the model once over the paged KV cache (ModelRunner), samples every row
// with its own request's generator (so a seeded request is reproducible whatever else runs) and
// streams the results.
//
// Threads: add_request, abort and stats may be called from any thread at any time. Steps run
// either on the engine's own loop thread (start/stop) or by calling step() yourself, not both.
// abort() waits for a step in flight, then frees the request's blocks at once.
//
// Weight updates: swap_weights() changes the model's weights between two steps; no request ever
// mixes two versions of the weights, and every delta names the version it was made with. The model and
// the tokenizer function must outlive the engine; the engine owns the KV pool. The engine calls
// model.prepare_inference, whose buffers it then uses: one live engine per model.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "inference/block_manager.h"
#include "inference/model_runner.h"
#include "inference/sampler.h"
#include "inference/scheduler.h"
#include "runtime/kv_cache.h"
#include "runtime/transformer.h"

namespace tandem {

struct EngineConfig {
  int block_size = 16;        // tokens per KV block
  int64_t kv_cache_mb = 256;  // KV pool size (K and V of every layer)
  // > 0: the pool takes this fraction of the memory available on the model's device once the
  // model is prepared (MemAvailable and the cgroup limit, or the GPU's free memory), instead of
  // kv_cache_mb.
  double kv_cache_fraction = 0.0;
  bool bf16_kv_cache = false;    // K/V stored as bf16: twice the tokens in the same bytes
  int num_blocks = 0;            // > 0: exactly this many blocks (overrides kv_cache_mb)
  int max_batched_tokens = 512;  // rows per step (prefill chunks + decode rows)
  int max_seqs = 64;             // sequences running at once
  int max_prompt_logit_rows = 64;  // rows per step that score prompt tokens (prompt_logprobs)
  bool prefix_caching = true;
  bool bf16_weights = false;  // bf16 weight copy for inference (half the bytes per decode step)
  // A request's tokens and logprobs bitwise independent of what else runs (batching, chunked
  // prefill, prefix hits, preemption) on the CPU: InferenceOptions::batch_invariant.
  bool batch_invariant = true;
  int32_t eos_token = -1;  // ends a request unless it sets ignore_eos; -1 = none
  uint64_t seed = 0;       // requests without a seed use seed ^ f(request id)
  // > 0: OpenMP threads of the loop thread (omp_set_num_threads is per thread, so a count set
  // on the thread that builds the engine does not reach the loop thread).
  int loop_threads = 0;
  // Called on the stepping thread with each step's attention context just before the model runs
  // it: where a tensor-parallel leader sends its step plan to the other ranks
  // (serving/step_plan.h). Must not call back into the engine.
  std::function<void(const AttentionContext&)> before_forward;
  // Called once at construction with the number of KV blocks this process's memory allows;
  // returns the number to use (a tensor-parallel leader agrees it with the other ranks: the
  // minimum). Empty = use it as is.
  std::function<int(int)> agree_num_blocks;
  // Set: a model step that throws takes the engine out of service (a tensor-parallel leader,
  // whose ranks are now out of step): every request running, waiting or arriving later ends
  // with kAbort and the error (a server answers UNAVAILABLE), no model call is made again, and
  // this is called on the stepping thread (the replica then goes down). Must not call back into
  // the engine. Unset: the failed step's requests end with kError and the engine goes on.
  std::function<void(const std::string&)> on_step_failure;
  // Set with idle_interval_s > 0: the loop thread calls on_idle whenever it has had no step for
  // idle_interval_s seconds (and again every idle_interval_s while idle), under the step lock:
  // where a tensor-parallel leader sends its keepalive, so that its workers can tell an idle
  // leader from a lost one. A throw is handled like a failed step (on_step_failure when set;
  // otherwise one line on stderr). Must not call back into the engine.
  std::function<void()> on_idle;
  double idle_interval_s = 0.0;
  // Bytes of one token (e.g. BpeTokenizer::decode_token); null = token ids only, no text.
  std::function<std::string(int32_t)> token_text;
  // > 0: a step that runs the model lasts at least this long (it sleeps the rest, holding the
  // step lock as a slow model step would). A floor on the time per token, whatever the CPU:
  // tests that act on a running request set it (TANDEM_TEST_MIN_STEP_MS in the environment
  // sets it for `tandem serve`), so they never depend on a model being slow.
  double min_step_ms = 0.0;
  // The name of the weights the engine starts with (e.g. the checkpoint directory's name):
  // GenerationDelta::weights_version until swap_weights() names new ones.
  std::string weights_version;
};

struct GenerationRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int max_tokens = 16;                  // new tokens, also capped by the context and the pool
  std::optional<uint64_t> seed;         // reproducible sampling
  std::vector<int32_t> stop_token_ids;  // end the request (the token is returned, not its text)
  std::vector<std::string> stop;        // stop strings, matched across token boundaries
  bool ignore_eos = false;
  bool logprobs = false;  // log-probability of each chosen token
  int top_logprobs = 0;   // and of the n most likely tokens (0..20)
  // Prompt log-probabilities (vLLM's prompt_logprobs): > 0 asks for log P(prompt[i] |
  // prompt[0..i)) of every prompt token i >= prompt_logprobs_start, returned in the final delta.
  // The prefix cache serves only the blocks before the first scored token, so choices that share
  // a context share its blocks (multiple-choice scoring). With it, max_tokens may be 0: score
  // only, nothing generated.
  int prompt_logprobs_start = 0;
};

enum class FinishReason { kNone, kStop, kLength, kAbort, kError };
const char* finish_reason_name(FinishReason reason);  // "", "stop", "length", "abort", "error"

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
  int cached_prompt_tokens = 0;  // served by the prefix cache at admission
};

// One message of a stream; the last one has finish != kNone.
struct GenerationDelta {
  uint64_t request_id = 0;
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<float> logprobs;                          // per token, when asked
  std::vector<std::vector<TokenLogprob>> top_logprobs;  // per token, when asked
  // In the final delta, with GenerationRequest::prompt_logprobs_start = s > 0: the prompt tokens
  // s, s + 1, ... each given the ones before it.
  std::vector<float> prompt_logprobs;
  FinishReason finish = FinishReason::kNone;
  std::string error;  // with kError
  Usage usage;        // in the final delta
  std::string weights_version;  // the weights that made every token of the request
  bool finished() const { return finish != FinishReason::kNone; }
};

class RequestStream {
 public:
  explicit RequestStream(uint64_t id) : id_(id) {}
  uint64_t id() const { return id_; }
  // Blocks for the next delta; nullopt once the final delta has been returned.
  std::optional<GenerationDelta> next();
  // Like next(), waiting at most `timeout` (a server polls for a cancelled call between waits).
  enum class Wait { kDelta, kTimeout, kEnded };
  Wait next_for(std::chrono::milliseconds timeout, GenerationDelta& out);
  // Blocks to the end and returns all deltas merged into one.
  GenerationDelta wait_all();
  bool finished() const;
  void push(GenerationDelta delta);  // the engine's side

  // A waiter in next()/next_for() is woken for the first token, for the final delta, and
  // otherwise once `tokens` new tokens have queued up (1, the default: every delta; 0: only the
  // first token and the end, for a caller that answers once). Fewer wake-ups when a server's
  // threads share the cores with the engine (vLLM's --stream-interval).
  void set_wake_every(int tokens);
  // When the engine pushed the first token (nullopt before).
  std::optional<std::chrono::steady_clock::time_point> first_token_time() const;

  // Slow consumers: with a limit > 0, the engine pauses this request (it keeps its KV blocks
  // but gets no new rows) while `tokens` or more wait here untaken, and resumes it once the
  // reader has taken them below the limit. 0 (the default): no limit (an offline caller reads
  // everything at the end). The limit must exceed set_wake_every's count.
  void set_backlog_limit(int tokens);
  bool over_backlog() const;  // the engine's side
  // The engine's side: called (without the stream's lock) when a reader takes the backlog below
  // the limit. Dropped with the final delta.
  void set_on_drained(std::function<void()> callback);

 private:
  bool should_wake() const;  // mu_ held
  std::function<void()> took(int tokens_before);  // mu_ held: the callback to run, if any
  uint64_t id_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<GenerationDelta> queue_;
  bool final_pushed_ = false, final_taken_ = false;
  int wake_every_ = 1;
  int queued_tokens_ = 0;  // tokens in queue_
  bool woke_for_first_ = false;
  std::optional<std::chrono::steady_clock::time_point> first_token_;
  int backlog_limit_ = 0;
  std::function<void()> on_drained_;
};

struct EngineStats {
  int running = 0, waiting = 0;
  int kv_blocks_total = 0, kv_blocks_used = 0, kv_blocks_free = 0, kv_blocks_cached = 0;
  double prefix_hit_rate = 0.0;  // prompt tokens found in the cache / tokens looked up
  int64_t preemptions = 0;
  int64_t steps = 0, prompt_tokens_computed = 0, generated_tokens = 0;
  double busy_seconds = 0.0;            // time spent in steps
  double generated_tokens_per_s = 0.0;  // generated_tokens / busy_seconds
};

class Engine {
 public:
  // Prepares the model for inference (prepare_inference) and allocates the KV pool.
  Engine(Transformer& model, EngineConfig config);
  ~Engine();  // stops the loop; unfinished requests end with kAbort
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  std::shared_ptr<RequestStream> add_request(GenerationRequest request);
  // What add_request would reject the request for ("" when nothing): lets a server answer a bad
  // request with INVALID_ARGUMENT before it takes a place in the queue. Thread-safe.
  std::string validate(const GenerationRequest& request) const;
  void abort(uint64_t request_id);
  // Many at once, under one wait for the step in flight (a drain ends 50 streams in one step's
  // time, not 50).
  void abort(const std::vector<uint64_t>& request_ids);

  // One step, if there is work. Returns whether work remains. Not while the loop thread runs.
  bool step();
  void run_until_idle();
  void start();  // the loop thread: steps while there is work, sleeps otherwise
  void stop();

  // Offline batch generation: submits all, runs to the end, returns one merged delta each.
  std::vector<GenerationDelta> generate(std::vector<GenerationRequest> requests);

  // Swaps the model's weights between steps. Holds the admission of requests that have not
  // started (they wait), lets the admitted ones finish on the old weights, and once none is left
  // (within `timeout`) runs `swap` under the step lock: it writes the new weights into
  // model.params(). Then rebuilds the model's inference copies in place
  // (Transformer::refresh_inference), drops the prefix cache (its K/V came from the old weights), names the
  // weights `version` and resumes admission. Returns false, having changed nothing, when requests
  // were still running at the timeout (requests are never cut for an update). Without the loop
  // thread this call steps the engine itself while it waits. A throw from `swap` or from
  // prepare_inference is rethrown after admission resumes. One swap at a time; thread-safe.
  bool swap_weights(const std::function<void()>& swap, const std::string& version,
                    std::chrono::milliseconds timeout);
  std::string weights_version() const;

  EngineStats stats() const;
  const EngineConfig& config() const { return config_; }
  // The model's weights changed (an optimizer step): rebuilds its inference copies in place
  // (Transformer::refresh_inference) and empties the prefix cache, whose K/V were computed
  // with the old weights. Only between uses: no request may be live (tandem::Error otherwise).
  void refresh_weights();
  const Transformer& model() const { return model_; }

  // The pieces of construction, for a tensor-parallel worker rank that runs the model without
  // an engine of its own (serving/tensor_parallel.h): the config checks (tandem::Error naming the
  // field), the model's inference options, the KV blocks the memory allows (after
  // prepare_inference; this rank's heads only under tensor parallelism) and the pool itself.
  static void check_config(const EngineConfig& config);
  static InferenceOptions inference_options(const EngineConfig& config);
  static int kv_pool_blocks(const Transformer& model, const EngineConfig& config);
  static std::unique_ptr<KvCache> make_kv_cache(const Transformer& model,
                                                const EngineConfig& config, int num_blocks);
  int num_kv_blocks() const { return blocks_->num_blocks(); }

 private:
  struct Request;
  void admit_incoming();  // step lock held
  void finish(Request& request, FinishReason reason, std::string error = {});
  void fail_all(const std::string& message, FinishReason reason);
  void refresh_stats();  // step lock held
  void loop();
  void refresh_has_work();  // step lock held: runnable work, or a paused request to resume
  void wake();  // the loop thread looks for work again (a paused request's reader caught up)
  void idle_tick();  // on_idle, on the loop thread
  // Step lock held, no request running: the model's weights changed; rebuild its inference
  // copies in place and drop the prefix cache (refresh_weights, swap_weights).
  void reload_weights();

  Transformer& model_;
  EngineConfig config_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<BlockManager> blocks_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<ModelRunner> runner_;

  mutable std::mutex step_mu_;  // scheduler, block manager, live requests
  std::string stopped_by_failure_;  // step lock held; non-empty: out of service (on_step_failure)
  std::unordered_map<uint64_t, std::unique_ptr<Request>> requests_;
  std::condition_variable requests_ended_cv_;  // with step_mu_: requests_ became empty
  std::mutex swap_mu_;                         // one swap_weights at a time

  std::mutex queue_mu_;  // incoming requests, loop control
  std::condition_variable queue_cv_;
  std::vector<std::unique_ptr<Request>> incoming_;
  bool stopping_ = false;
  bool admission_held_ = false;  // swap_weights: incoming requests wait in incoming_
  std::atomic<bool> has_work_{false};
  std::thread loop_thread_;
  std::atomic<uint64_t> next_id_{1};
  // What a stream's drained callback holds: the engine, until it is destroyed.
  struct Waker {
    std::mutex mu;
    Engine* engine = nullptr;
  };
  std::shared_ptr<Waker> waker_;

  mutable std::mutex stats_mu_;
  EngineStats stats_;
  std::string weights_version_;  // stats_mu_; written under the step lock too
};

}  // namespace tandem
