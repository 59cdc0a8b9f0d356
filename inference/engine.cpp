#include "inference/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>

#include "inference/text_stream.h"
#include "kernels/cpu/kernels.h"
#include "runtime/error.h"

namespace tandem {

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
    case FinishReason::kError:
      return "error";
  }
  return "";
}

// ---- RequestStream ----------------------------------------------------------------------------

void RequestStream::push(GenerationDelta delta) {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (final_pushed_) return;
    final_pushed_ = delta.finished();
    if (final_pushed_) on_drained_ = nullptr;  // nothing to resume any more
    if (!delta.tokens.empty() && !first_token_) first_token_ = std::chrono::steady_clock::now();
    queued_tokens_ += static_cast<int>(delta.tokens.size());
    queue_.push_back(std::move(delta));
    wake = should_wake();
  }
  if (wake) cv_.notify_all();
}

bool RequestStream::should_wake() const {
  if (queue_.empty()) return false;
  // The end, the first delta, or every delta (the default).
  if (final_pushed_ || !woke_for_first_ || wake_every_ == 1) return true;
  return wake_every_ > 1 && queued_tokens_ >= wake_every_;
}

void RequestStream::set_wake_every(int tokens) {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake_every_ = std::max(0, tokens);
    wake = should_wake();
  }
  if (wake) cv_.notify_all();
}

std::optional<std::chrono::steady_clock::time_point> RequestStream::first_token_time() const {
  std::lock_guard<std::mutex> lock(mu_);
  return first_token_;
}

void RequestStream::set_backlog_limit(int tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  backlog_limit_ = std::max(0, tokens);
}

bool RequestStream::over_backlog() const {
  std::lock_guard<std::mutex> lock(mu_);
  return backlog_limit_ > 0 && queued_tokens_ >= backlog_limit_;
}

void RequestStream::set_on_drained(std::function<void()> callback) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!final_pushed_) on_drained_ = std::move(callback);
}

std::function<void()> RequestStream::took(int tokens_before) {
  const bool resumed =
      backlog_limit_ > 0 && tokens_before >= backlog_limit_ && queued_tokens_ < backlog_limit_;
  return resumed ? on_drained_ : nullptr;
}

std::optional<GenerationDelta> RequestStream::next() {
  std::unique_lock<std::mutex> lock(mu_);
  if (final_taken_) return std::nullopt;
  cv_.wait(lock, [&] { return should_wake(); });
  GenerationDelta d = std::move(queue_.front());
  queue_.pop_front();
  if (d.finished()) final_taken_ = true;
  woke_for_first_ = true;
  const int before = queued_tokens_;
  queued_tokens_ -= static_cast<int>(d.tokens.size());
  const std::function<void()> resume = took(before);
  lock.unlock();
  if (resume) resume();
  return d;
}

RequestStream::Wait RequestStream::next_for(std::chrono::milliseconds timeout,
                                            GenerationDelta& out) {
  std::unique_lock<std::mutex> lock(mu_);
  if (final_taken_) return Wait::kEnded;
  // A zero timeout takes whatever is queued (a waiter draining what piled up).
  const auto ready = [&] { return timeout.count() == 0 ? !queue_.empty() : should_wake(); };
  if (!cv_.wait_for(lock, timeout, ready)) return Wait::kTimeout;
  out = std::move(queue_.front());
  queue_.pop_front();
  if (out.finished()) final_taken_ = true;
  woke_for_first_ = true;
  const int before = queued_tokens_;
  queued_tokens_ -= static_cast<int>(out.tokens.size());
  const std::function<void()> resume = took(before);
  lock.unlock();
  if (resume) resume();
  return Wait::kDelta;
}

GenerationDelta RequestStream::wait_all() {
  GenerationDelta all;
  all.request_id = id_;
  while (auto d = next()) {
    all.tokens.insert(all.tokens.end(), d->tokens.begin(), d->tokens.end());
    all.text += d->text;
    all.logprobs.insert(all.logprobs.end(), d->logprobs.begin(), d->logprobs.end());
    all.top_logprobs.insert(all.top_logprobs.end(), d->top_logprobs.begin(), d->top_logprobs.end());
    all.weights_version = d->weights_version;  // the same in every delta of a request
    if (d->finished()) {
      all.finish = d->finish;
      all.error = d->error;
      all.usage = d->usage;
      all.prompt_logprobs = std::move(d->prompt_logprobs);
    }
  }
  return all;
}

bool RequestStream::finished() const {
  std::lock_guard<std::mutex> lock(mu_);
  return final_pushed_;
}

// ---- Engine -----------------------------------------------------------------------------------

struct Engine::Request {
  GenerationRequest params;
  Sequence seq;
  Rng rng;
  TextStream text;
  int max_new_tokens = 0;
  std::shared_ptr<RequestStream> stream;
  GenerationDelta pending;  // this step's delta
  std::vector<float> prompt_logprobs;  // by position from prompt_logprobs_start
  std::string weights_version;  // set at admission
};

void Engine::check_config(const EngineConfig& config) {
  require(config.block_size > 0, "engine: block_size must be > 0, got ", config.block_size);
  require(config.max_batched_tokens > 0, "engine: max_batched_tokens must be > 0, got ",
          config.max_batched_tokens);
  require(config.max_seqs > 0, "engine: max_seqs must be > 0, got ", config.max_seqs);
  require(std::isfinite(config.kv_cache_fraction) && config.kv_cache_fraction >= 0.0 &&
              config.kv_cache_fraction < 1.0,
          "engine: kv_cache_fraction must be in [0, 1), got ", config.kv_cache_fraction);
  require(std::isfinite(config.idle_interval_s) && config.idle_interval_s >= 0.0,
          "engine: idle_interval_s must be >= 0, got ", config.idle_interval_s);
}

InferenceOptions Engine::inference_options(const EngineConfig& config) {
  InferenceOptions inference;
  inference.max_batched_tokens = config.max_batched_tokens;
  inference.max_logit_rows = config.max_seqs + config.max_prompt_logit_rows;
  inference.bf16_weights = config.bf16_weights;
  inference.batch_invariant = config.batch_invariant;
  return inference;
}

int Engine::kv_pool_blocks(const Transformer& model, const EngineConfig& config) {
  if (config.num_blocks > 0) return config.num_blocks;
  const DType kv_dtype = config.bf16_kv_cache ? DType::kBF16 : DType::kF32;
  const int64_t per_block =
      KvCache::bytes_per_block(model.config(), config.block_size, kv_dtype, model.tp_size());
  int64_t pool_bytes;
  std::string what;
  if (config.kv_cache_fraction > 0.0) {
    pool_bytes = static_cast<int64_t>(static_cast<double>(available_memory_bytes(model.device())) *
                                      config.kv_cache_fraction);
    what = cat("kv_cache_fraction = ", config.kv_cache_fraction, " of the available memory (",
               pool_bytes >> 20, " MiB)");
  } else {
    require(config.kv_cache_mb > 0, "engine: kv_cache_mb must be > 0, got ", config.kv_cache_mb);
    pool_bytes = config.kv_cache_mb * (int64_t{1} << 20);
    what = cat("kv_cache_mb = ", config.kv_cache_mb);
  }
  const int64_t blocks = pool_bytes / per_block;
  require(blocks >= 1, "engine: ", what, " holds no KV block (one ", config.block_size,
          "-token block takes ", per_block, " bytes)");
  return static_cast<int>(std::min<int64_t>(blocks, 1 << 30));
}

std::unique_ptr<KvCache> Engine::make_kv_cache(const Transformer& model, const EngineConfig& config,
                                               int num_blocks) {
  return std::make_unique<KvCache>(model.config(), num_blocks, config.block_size, model.device(),
                                   config.bf16_kv_cache ? DType::kBF16 : DType::kF32,
                                   model.tp_size());
}

Engine::Engine(Transformer& model, EngineConfig config)
    : model_(model), config_(std::move(config)) {
  check_config(config_);
  model_.prepare_inference(inference_options(config_));  // first: its buffers come before the pool
  int num_blocks = kv_pool_blocks(model_, config_);
  if (config_.agree_num_blocks) num_blocks = config_.agree_num_blocks(num_blocks);
  require(num_blocks >= 1, "engine: the KV pool has no block");
  cache_ = make_kv_cache(model_, config_, num_blocks);
  blocks_ = std::make_unique<BlockManager>(num_blocks, config_.block_size, config_.prefix_caching);
  scheduler_ = std::make_unique<Scheduler>(
      SchedulerConfig{config_.max_batched_tokens, config_.max_seqs, config_.max_prompt_logit_rows},
      *blocks_);
  runner_ = std::make_unique<ModelRunner>(model_, *cache_, config_.before_forward);
  stats_.kv_blocks_total = stats_.kv_blocks_free = num_blocks;
  waker_ = std::make_shared<Waker>();
  waker_->engine = this;
  weights_version_ = config_.weights_version;
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(waker_->mu);
    waker_->engine = nullptr;  // readers of streams that outlive the engine no longer call it
  }
  stop();
  std::lock_guard<std::mutex> lock(step_mu_);
  {
    std::lock_guard<std::mutex> queue_lock(queue_mu_);
    admission_held_ = false;
  }
  admit_incoming();
  std::vector<Request*> live;
  for (auto& [id, r] : requests_) live.push_back(r.get());
  for (Request* r : live) finish(*r, FinishReason::kAbort);
}

std::string Engine::validate(const GenerationRequest& r) const {
  const ModelConfig& mc = model_.config();
  const int n = static_cast<int>(r.prompt.size());
  if (n == 0) return "the prompt is empty";
  for (int i = 0; i < n; ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= mc.vocab_size)
      return cat("prompt token ", r.prompt[i], " at position ", i,
                 " is outside the vocabulary [0, ", mc.vocab_size, ")");
  }
  if (n >= mc.max_seq_len)
    return cat("the prompt has ", n, " tokens; the model's context is ", mc.max_seq_len,
               " tokens, so a prompt may have at most ", mc.max_seq_len - 1);
  const int pool_tokens = blocks_->num_blocks() * blocks_->block_size();
  if (n + 1 > pool_tokens)
    return cat("the prompt has ", n, " tokens and can never fit the KV cache (", pool_tokens,
               " tokens in ", blocks_->num_blocks(), " blocks); raise kv_cache_mb");
  if (r.prompt_logprobs_start < 0 || r.prompt_logprobs_start >= n)
    return cat("prompt_logprobs_start must be in [0, ", n, ") (0: none), got ",
               r.prompt_logprobs_start);
  if (r.max_tokens < 0 || (r.max_tokens == 0 && r.prompt_logprobs_start == 0))
    return cat("max_tokens must be > 0 (or 0 to only score the prompt), got ", r.max_tokens);
  try {
    r.sampling.validate();
  } catch (const Error& e) {
    return e.what();
  }
  if (r.top_logprobs < 0 || r.top_logprobs > 20)
    return cat("top_logprobs must be in [0, 20], got ", r.top_logprobs);
  for (int32_t t : r.stop_token_ids) {
    if (t < 0 || t >= mc.vocab_size)
      return cat("stop token id ", t, " is outside the vocabulary [0, ", mc.vocab_size, ")");
  }
  if (!r.stop.empty() && !config_.token_text)
    return "stop strings need an engine with a tokenizer (token_text)";
  return "";
}

std::shared_ptr<RequestStream> Engine::add_request(GenerationRequest request) {
  const uint64_t id = next_id_.fetch_add(1);
  auto stream = std::make_shared<RequestStream>(id);
  const std::string error = validate(request);
  if (!error.empty()) {
    GenerationDelta d;
    d.request_id = id;
    d.finish = FinishReason::kError;
    d.error = cat("request ", id, ": ", error);
    d.usage.prompt_tokens = static_cast<int>(request.prompt.size());
    d.weights_version = weights_version();
    stream->push(std::move(d));
    return stream;
  }
  auto r = std::make_unique<Request>();
  const ModelConfig& mc = model_.config();
  const int n = static_cast<int>(request.prompt.size());
  const int pool_tokens = blocks_->num_blocks() * blocks_->block_size();
  r->max_new_tokens = std::min({request.max_tokens, mc.max_seq_len - n, pool_tokens - n});
  r->seq.id = id;
  r->seq.tokens = request.prompt;
  r->seq.prompt_len = n;
  r->seq.score_only = r->max_new_tokens == 0;
  if (request.prompt_logprobs_start > 0) {
    r->seq.prompt_logits_from = request.prompt_logprobs_start - 1;
    r->prompt_logprobs.assign(n - request.prompt_logprobs_start, 0.0f);
  }
  r->rng = Rng(request.seed ? *request.seed : config_.seed ^ (id * 0x9E3779B97F4A7C15ull));
  r->text = TextStream(request.stop);
  r->stream = stream;
  stream->set_on_drained([waker = waker_] {
    std::lock_guard<std::mutex> lock(waker->mu);
    if (waker->engine != nullptr) waker->engine->wake();
  });
  r->params = std::move(request);
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    incoming_.push_back(std::move(r));
  }
  queue_cv_.notify_all();
  return stream;
}

void Engine::admit_incoming() {
  std::vector<std::unique_ptr<Request>> incoming;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (admission_held_) return;  // swap_weights: they wait for the new weights
    incoming.swap(incoming_);
  }
  const std::string version = weights_version();
  for (auto& r : incoming) {
    r->weights_version = version;
    scheduler_->add(&r->seq);
    const uint64_t id = r->seq.id;
    requests_.emplace(id, std::move(r));
  }
}

void Engine::finish(Request& r, FinishReason reason, std::string error) {
  GenerationDelta d = std::move(r.pending);
  r.pending = {};
  d.request_id = r.seq.id;
  if (reason != FinishReason::kStop || !r.text.stopped()) d.text += r.text.flush();
  d.finish = reason;
  d.error = std::move(error);
  d.usage.prompt_tokens = r.seq.prompt_len;
  d.usage.completion_tokens = r.seq.num_generated();
  d.usage.cached_prompt_tokens = std::max(0, r.seq.cached_prompt_tokens);
  d.weights_version = r.weights_version;
  if (reason == FinishReason::kLength || reason == FinishReason::kStop) {
    d.prompt_logprobs = std::move(r.prompt_logprobs);
  }
  scheduler_->remove(&r.seq);
  r.stream->push(std::move(d));
  requests_.erase(r.seq.id);  // r is gone from here on
  if (requests_.empty()) requests_ended_cv_.notify_all();
}

void Engine::abort(uint64_t request_id) {
  abort(std::vector<uint64_t>{request_id});
}

void Engine::abort(const std::vector<uint64_t>& request_ids) {
  std::lock_guard<std::mutex> lock(step_mu_);
  admit_incoming();
  std::vector<uint64_t> not_admitted;
  for (uint64_t id : request_ids) {
    auto it = requests_.find(id);
    if (it != requests_.end()) {
      finish(*it->second, FinishReason::kAbort);
    } else {
      not_admitted.push_back(id);
    }
  }
  if (!not_admitted.empty()) {
    // Requests held back by a weight swap end where they wait.
    std::vector<std::unique_ptr<Request>> held;
    {
      std::lock_guard<std::mutex> queue_lock(queue_mu_);
      auto wanted = [&](const std::unique_ptr<Request>& r) {
        return std::find(not_admitted.begin(), not_admitted.end(), r->seq.id) != not_admitted.end();
      };
      for (auto& r : incoming_) {
        if (wanted(r)) held.push_back(std::move(r));
      }
      std::erase(incoming_, nullptr);
    }
    for (auto& r : held) {
      GenerationDelta d;
      d.request_id = r->seq.id;
      d.finish = FinishReason::kAbort;
      d.usage.prompt_tokens = r->seq.prompt_len;
      d.weights_version = weights_version();
      r->stream->push(std::move(d));
    }
  }
  refresh_stats();
}

void Engine::refresh_stats() {
  std::lock_guard<std::mutex> lock(stats_mu_);
  EngineStats& s = stats_;
  s.running = scheduler_->num_running();
  s.waiting = scheduler_->num_waiting();
  s.kv_blocks_used = blocks_->num_used_blocks();
  s.kv_blocks_free = blocks_->num_free_blocks();
  s.kv_blocks_cached = blocks_->num_cached_blocks();
  s.prefix_hit_rate = blocks_->prefix_hit_rate();
  s.preemptions = scheduler_->num_preemptions();
}

void Engine::fail_all(const std::string& message, FinishReason reason) {
  std::vector<Request*> live;
  for (auto& [id, r] : requests_) live.push_back(r.get());
  for (Request* r : live) finish(*r, reason, message);
}

bool Engine::step() {
  std::lock_guard<std::mutex> lock(step_mu_);
  const auto t0 = std::chrono::steady_clock::now();
  admit_incoming();
  if (!stopped_by_failure_.empty()) {
    // A step failed and the failure hook took the engine out of service: no model call again
    // (a tensor-parallel group is out of step); what arrives since ends the same way.
    fail_all(stopped_by_failure_, FinishReason::kAbort);
    has_work_ = false;
    return false;
  }
  // A request whose reader has fallen behind by its stream's backlog limit pauses (keeping its
  // blocks) until the reader catches up (RequestStream::set_backlog_limit).
  for (auto& [id, r] : requests_) r->seq.paused = r->stream->over_backlog();
  if (!scheduler_->has_runnable_work()) {
    // Nothing, or only paused requests: wake() when a reader catches up.
    refresh_has_work();
    return has_work_;
  }
  const std::vector<ScheduledSequence> plan = scheduler_->schedule();
  int64_t prompt_rows = 0, generated = 0;
  if (!plan.empty()) {
    const float* logits = nullptr;
    try {
      logits = runner_->run(plan);
    } catch (const std::exception& e) {
      const std::string message = cat("the model step failed: ", e.what());
      if (config_.on_step_failure) {
        // Out of service from now on (see step()'s start); the requests end UNAVAILABLE-like.
        stopped_by_failure_ = message;
        fail_all(message, FinishReason::kAbort);
        config_.on_step_failure(message);
        has_work_ = false;
        return false;
      }
      fail_all(message, FinishReason::kError);
      refresh_has_work();
      return has_work_;
    }
    scheduler_->commit(plan);
    // The logits rows, per plan entry: those scoring prompt tokens, then the sampled one.
    const int V = model_.config().vocab_size;
    std::vector<Request*> sampled;
    std::vector<const float*> sampled_rows;
    std::vector<Request*> finished_prompts;  // score-only requests whose prompt is done
    const float* row = logits;
    for (const ScheduledSequence& s : plan) {
      const int prompt_part =
          std::max(0, std::min(s.start + s.num_tokens, s.seq->prompt_len) - s.start);
      prompt_rows += prompt_part;
      Request& r = *requests_.at(s.seq->id);
      const auto [first, last] = s.seq->prompt_logit_span(s.start, s.num_tokens);
      for (int p = first; p < last; ++p, row += V) {
        r.prompt_logprobs[p + 1 - (s.seq->prompt_logits_from + 1)] =
            log_softmax_at(row, V, s.seq->tokens[p + 1]);
      }
      if (!s.sample) continue;
      if (s.seq->score_only) {
        finished_prompts.push_back(&r);  // its prompt is scored; no row was asked to sample
        continue;
      }
      sampled.push_back(&r);
      sampled_rows.push_back(row);
      row += V;
    }
    for (Request* r : finished_prompts) finish(*r, FinishReason::kLength);
    const int rows = static_cast<int>(sampled.size());
    std::vector<int32_t> chosen(rows, -1);
    std::vector<std::string> errors(rows);
#pragma omp parallel for schedule(dynamic)
    for (int i = 0; i < rows; ++i) {
      Request& r = *sampled[i];
      const float* row = sampled_rows[i];
      try {
        std::vector<float> adjusted(row, row + V);
        const std::span<const int32_t> all(r.seq.tokens);
        apply_penalties(adjusted.data(), V, r.params.sampling, all.first(r.seq.prompt_len),
                        all.subspan(r.seq.prompt_len));
        chosen[i] = sample_token(adjusted.data(), V, r.params.sampling, r.rng);
        if (r.params.logprobs || r.params.top_logprobs > 0)
          r.pending.logprobs.push_back(log_softmax_at(row, V, chosen[i]));
        if (r.params.top_logprobs > 0)
          r.pending.top_logprobs.push_back(top_logprobs(row, V, r.params.top_logprobs));
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    }
    for (int i = 0; i < rows; ++i) {
      Request& r = *sampled[i];
      if (!errors[i].empty()) {
        finish(r, FinishReason::kError, cat("request ", r.seq.id, ": ", errors[i]));
        continue;
      }
      const int32_t t = chosen[i];
      r.seq.tokens.push_back(t);
      r.pending.tokens.push_back(t);
      ++generated;
      const bool stop_token =
          (t == config_.eos_token && !r.params.ignore_eos) ||
          std::find(r.params.stop_token_ids.begin(), r.params.stop_token_ids.end(), t) !=
              r.params.stop_token_ids.end();
      if (stop_token) {
        finish(r, FinishReason::kStop);
        continue;
      }
      if (config_.token_text) r.pending.text += r.text.push(config_.token_text(t));
      if (r.text.stopped()) {
        finish(r, FinishReason::kStop);
      } else if (r.seq.num_generated() >= r.max_new_tokens) {
        finish(r, FinishReason::kLength);
      } else {
        GenerationDelta d = std::move(r.pending);
        r.pending = {};
        d.request_id = r.seq.id;
        d.weights_version = r.weights_version;
        r.stream->push(std::move(d));
      }
    }
  }
  refresh_has_work();
  if (config_.min_step_ms > 0.0 && !plan.empty()) {
    // The test hook: the step holds the lock as long as a model step of that length would.
    std::this_thread::sleep_until(
        t0 + std::chrono::microseconds(static_cast<int64_t>(config_.min_step_ms * 1e3)));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  refresh_stats();
  std::lock_guard<std::mutex> stats_lock(stats_mu_);
  EngineStats& s = stats_;
  s.steps += 1;
  s.prompt_tokens_computed += prompt_rows;
  s.generated_tokens += generated;
  s.busy_seconds += seconds;
  s.generated_tokens_per_s = s.busy_seconds > 0 ? s.generated_tokens / s.busy_seconds : 0.0;
  return has_work_;
}

void Engine::refresh_weights() {
  std::lock_guard<std::mutex> lock(step_mu_);
  admit_incoming();
  require(requests_.empty(), "engine: refresh_weights with ", requests_.size(),
          " request(s) live; the weights may change only between uses");
  reload_weights();
  refresh_stats();
}

void Engine::reload_weights() {
  model_.refresh_inference();  // the inference copies rebuilt in place: no second set of them
  blocks_->drop_prefix_cache();  // its K/V came from the old weights
}

void Engine::refresh_has_work() {
  // Cleared first, then set if work remains: a reader that caught up on a paused request during
  // this step called wake() either before the clear (then its stream is below the limit now and
  // is seen here) or after it (then its wake() stands). Never a lost wake-up.
  has_work_ = false;
  bool remains = scheduler_->has_runnable_work();
  for (const auto& [id, r] : requests_) {
    if (remains) break;
    remains = r->seq.paused && !r->stream->over_backlog();
  }
  if (remains) has_work_ = true;
}

void Engine::wake() {
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    has_work_ = true;
  }
  queue_cv_.notify_all();
}

void Engine::run_until_idle() {
  while (step()) {
  }
}

void Engine::loop() {
  if (config_.loop_threads > 0) cpu::set_num_threads(config_.loop_threads);
  const bool ticks = config_.on_idle && config_.idle_interval_s > 0.0;
  const auto interval = std::chrono::duration<double>(config_.idle_interval_s);
  while (true) {
    bool idle = false;
    {
      std::unique_lock<std::mutex> lock(queue_mu_);
      const auto ready = [&] {
        return stopping_ || (!incoming_.empty() && !admission_held_) || has_work_.load();
      };
      if (ticks) {
        idle = !queue_cv_.wait_for(lock, interval, ready);
      } else {
        queue_cv_.wait(lock, ready);
      }
      if (stopping_) return;
    }
    if (idle) {
      idle_tick();
    } else {
      step();
    }
  }
}

void Engine::idle_tick() {
  std::lock_guard<std::mutex> lock(step_mu_);
  if (!stopped_by_failure_.empty()) return;  // out of service: no more collectives either
  try {
    config_.on_idle();
  } catch (const std::exception& e) {
    const std::string message = cat("the idle tick failed: ", e.what());
    if (config_.on_step_failure) {
      stopped_by_failure_ = message;
      fail_all(message, FinishReason::kAbort);
      config_.on_step_failure(message);
    } else {
      std::fprintf(stderr, "tandem: engine: %s\n", message.c_str());
    }
  }
}

void Engine::start() {
  std::lock_guard<std::mutex> lock(queue_mu_);
  if (loop_thread_.joinable()) return;
  stopping_ = false;
  loop_thread_ = std::thread([this] { loop(); });
}

void Engine::stop() {
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (!loop_thread_.joinable()) return;
    stopping_ = true;
  }
  queue_cv_.notify_all();
  loop_thread_.join();
}

std::vector<GenerationDelta> Engine::generate(std::vector<GenerationRequest> requests) {
  std::vector<std::shared_ptr<RequestStream>> streams;
  streams.reserve(requests.size());
  for (auto& r : requests) streams.push_back(add_request(std::move(r)));
  bool looping;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    looping = loop_thread_.joinable();
  }
  if (!looping) run_until_idle();
  std::vector<GenerationDelta> out;
  out.reserve(streams.size());
  for (auto& s : streams) out.push_back(s->wait_all());
  return out;
}

bool Engine::swap_weights(const std::function<void()>& swap, const std::string& version,
                          std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> swap_lock(swap_mu_);
  bool looping;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    admission_held_ = true;
    looping = loop_thread_.joinable();
  }
  struct ResumeAdmission {
    Engine& e;
    ~ResumeAdmission() {
      {
        std::lock_guard<std::mutex> lock(e.queue_mu_);
        e.admission_held_ = false;
      }
      e.queue_cv_.notify_all();  // the loop admits what waited
    }
  } resume{*this};
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const auto none_left = [&] { return requests_.empty(); };
  if (!looping) {
    // Nobody else steps: finish the admitted requests here (the held ones stay out).
    while (std::chrono::steady_clock::now() < deadline) {
      {
        std::lock_guard<std::mutex> lock(step_mu_);
        if (none_left()) break;
      }
      if (!step()) std::this_thread::sleep_for(std::chrono::milliseconds(1));  // paused ones
    }
  }
  std::unique_lock<std::mutex> lock(step_mu_);
  if (!requests_ended_cv_.wait_until(lock, deadline, none_left)) return false;
  swap();
  reload_weights();
  {
    std::lock_guard<std::mutex> stats_lock(stats_mu_);
    weights_version_ = version;
  }
  refresh_stats();
  return true;
}

std::string Engine::weights_version() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return weights_version_;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return stats_;
}

}  // namespace tandem
