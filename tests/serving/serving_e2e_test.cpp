// End-to-end tests of `tandem serve` and `tandem router`: real processes on loopback ports, a
// tiny checkpoint written by the test, gRPC clients in the test.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <atomic>
#include <cmath>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>

#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "runtime/model_io.h"
#include "runtime/tokenizer.h"
#include "runtime/transformer.h"
#include "tests/serving/serving_test_support.h"
#include "tests/test_support.h"

namespace tandem::testing {
namespace {

namespace pb = tandem::v1;
namespace fs = std::filesystem;

class ServingE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::make_unique<ScratchDir>("serving_e2e");
    model_dir_ = (dir_->path() / "model").string();
    const std::string maker = std::string(TANDEM_BINARY_DIR) + "/tests/make_tiny_checkpoint ";
    ASSERT_EQ(std::system((maker + model_dir_).c_str()), 0);
  }
  std::string log(const std::string& name) const { return (dir_->path() / name).string(); }
  // slow: for tests that act on a request while it runs. The server's engine steps take at
  // least kSlowStepMs each (the TANDEM_TEST_MIN_STEP_MS hook), so a 1000-token request runs
  // for 5 s or more however fast the CPU is; no test assumes the model itself is slow.
  static constexpr const char* kSlowStepMs = "5";
  struct SlowEnv {
    explicit SlowEnv(bool slow) {
      if (slow) ::setenv("TANDEM_TEST_MIN_STEP_MS", kSlowStepMs, 1);
    }
    ~SlowEnv() { ::unsetenv("TANDEM_TEST_MIN_STEP_MS"); }
  };
  std::unique_ptr<ServerProcess> serve(std::vector<std::string> extra, const std::string& name,
                                       bool slow = false) {
    std::vector<std::string> args = {"serve",     "--model", model_dir_,      "--metrics-port",
                                     "0",

                                     "--threads", "1",       "--drain-grace", "10"};
    args.insert(args.end(), extra.begin(), extra.end());
    SlowEnv env(slow);
    return std::make_unique<ServerProcess>(args, log(name));
  }

  // A tensor-parallel replica: `mpirun -np ranks tandem serve ...` (one thread per rank).
  // mpirun as root (CI), without the single-copy mechanism containers often forbid.
  static void allow_mpirun() {
    for (const char* v : {"OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"}) {
      ::setenv(v, "1", 1);
    }
    ::setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 1);
  }
  std::unique_ptr<ServerProcess> serve_tp(int ranks, std::vector<std::string> extra,
                                          const std::string& name, bool slow = false) {
    allow_mpirun();
    std::vector<std::string> args = {"serve", "--model",   model_dir_, "--metrics-port",
                                     "0",     "--threads", "1",        "--drain-grace",
                                     "10"};
    args.insert(args.end(), extra.begin(), extra.end());
    SlowEnv env(slow);  // mpirun's ranks on this machine inherit its environment
    return std::make_unique<ServerProcess>(
        args, log(name),
        std::vector<std::string>{TANDEM_MPIRUN, "--oversubscribe", "-np", std::to_string(ranks)});
  }
  // The pid of mpirun's child of the given rank (-1 when not found).
  static pid_t rank_pid(ServerProcess& server, int rank) {
    for (pid_t pid : child_processes(server.process().pid())) {
      if (mpi_rank_of(pid) == rank) return pid;
    }
    return -1;
  }

  std::unique_ptr<ScratchDir> dir_;
  std::string model_dir_;
};

pb::GenerateRequest greedy(const std::string& prompt, int max_tokens) {
  pb::GenerateRequest r;
  r.set_prompt(prompt);
  r.set_max_tokens(max_tokens);
  r.mutable_sampling()->set_temperature(0.0f);
  return r;
}

pb::GenerateRequest long_request(int max_tokens = 1000) {
  pb::GenerateRequest r = greedy("And the earth was without form", max_tokens);
  r.set_ignore_eos(true);
  return r;
}

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  int messages = 0;
  pb::FinishReason finish = pb::FINISH_REASON_UNSPECIFIED;
  pb::Usage usage;
};

StreamResult stream(pb::Generation::Stub& stub, const pb::GenerateRequest& r,
                    double timeout_s = 60) {
  grpc::ClientContext c;
  c.set_deadline(std::chrono::system_clock::now() +
                 std::chrono::milliseconds(static_cast<int>(timeout_s * 1000)));
  StreamResult out;
  auto reader = stub.GenerateStream(&c, r);
  pb::GenerateResponse m;
  while (reader->Read(&m)) {
    ++out.messages;
    out.tokens.insert(out.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    out.text += m.text();
    if (m.finish_reason() != pb::FINISH_REASON_UNSPECIFIED) out.finish = m.finish_reason();
    if (m.has_usage()) out.usage = m.usage();
  }
  out.status = reader->Finish();
  return out;
}

grpc::Status unary(pb::Generation::Stub& stub, const pb::GenerateRequest& r,
                   pb::GenerateResponse* response, double timeout_s = 60) {
  grpc::ClientContext c;
  c.set_deadline(std::chrono::system_clock::now() +
                 std::chrono::milliseconds(static_cast<int>(timeout_s * 1000)));
  return stub.Generate(&c, r, response);
}

TEST_F(ServingE2E, StreamYieldsTheSameTokensAsUnaryAndSeedsReproduce) {
  auto server = serve({}, "serve.log");
  auto stub = connect(server->address());
  for (const std::string prompt : {"The quick brown fox", "In the beginning", "Serving"}) {
    pb::GenerateResponse whole;
    ASSERT_TRUE(unary(*stub, greedy(prompt, 24), &whole).ok());
    const StreamResult s = stream(*stub, greedy(prompt, 24));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.tokens, std::vector<int32_t>(whole.token_ids().begin(), whole.token_ids().end()));
    EXPECT_EQ(s.text, whole.text());
    EXPECT_EQ(s.finish, whole.finish_reason());
    // Deltas that are ready together go out as one message, and this model is fast enough to
    // finish before the handler wakes; that a stream's first message arrives while the request
    // still runs is checked with a slow server (CancelDeadlineAndDisconnect...).
    EXPECT_GE(s.messages, 1);
    EXPECT_EQ(s.usage.completion_tokens(), whole.token_ids_size());
    EXPECT_GT(s.usage.prompt_tokens(), 0);
  }
  // Seeded sampling (temperature 1 by default when absent) reproduces; seed 0 is a seed.
  pb::GenerateRequest seeded;
  seeded.set_prompt("The quick");
  seeded.set_max_tokens(16);
  seeded.mutable_sampling()->set_seed(0);
  pb::GenerateResponse a, b;
  ASSERT_TRUE(unary(*stub, seeded, &a).ok());
  ASSERT_TRUE(unary(*stub, seeded, &b).ok());
  EXPECT_EQ(std::vector<int32_t>(a.token_ids().begin(), a.token_ids().end()),
            std::vector<int32_t>(b.token_ids().begin(), b.token_ids().end()));
  // Logprobs when asked: one per token, top entries sorted.
  pb::GenerateRequest with_logprobs = greedy("The quick", 5);
  with_logprobs.set_logprobs(true);
  with_logprobs.set_top_logprobs(3);
  pb::GenerateResponse lp;
  ASSERT_TRUE(unary(*stub, with_logprobs, &lp).ok());
  ASSERT_EQ(lp.logprobs_size(), lp.token_ids_size());
  ASSERT_EQ(lp.top_logprobs_size(), lp.token_ids_size());
  for (int i = 0; i < lp.token_ids_size(); ++i) {
    EXPECT_LE(lp.logprobs(i), 0.0f);
    ASSERT_EQ(lp.top_logprobs(i).entries_size(), 3);
    EXPECT_EQ(lp.top_logprobs(i).entries(0).token(), lp.token_ids(i));  // greedy: the top one
  }
  // grpc.health.v1 says SERVING; ModelInfo and Tokenize answer.
  grpc::ClientContext hc;
  grpc::health::v1::HealthCheckRequest hreq;
  grpc::health::v1::HealthCheckResponse hres;
  auto health = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials()));
  ASSERT_TRUE(health->Check(&hc, hreq, &hres).ok());
  EXPECT_EQ(hres.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  grpc::ClientContext ic;
  pb::ModelInfoResponse info;
  ASSERT_TRUE(stub->ModelInfo(&ic, pb::ModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.family(), "gpt2");
  EXPECT_EQ(info.max_seq_len(), 1024);
  EXPECT_EQ(info.model(), "model");
}

TEST_F(ServingE2E, StreamIntervalSendsFewerMessagesWithTheSameTokens) {
  // One wake-up (and message) per 8 tokens instead of per engine step; TTFT is unaffected.
  auto every = serve({"--no-request-log"}, "every.log", /*slow=*/true);
  auto eighth = serve({"--no-request-log", "--stream-interval", "8"}, "eighth.log", true);
  const pb::GenerateRequest r = long_request(64);
  const StreamResult a = stream(*connect(every->address()), r);
  const StreamResult b = stream(*connect(eighth->address()), r);
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_EQ(b.tokens, a.tokens);
  EXPECT_EQ(b.text, a.text);
  // The first token alone, then >= 8 tokens per message, the end with the rest.
  EXPECT_LE(b.messages, 1 + 63 / 8 + 1) << b.messages;
  EXPECT_GT(a.messages, b.messages) << "every step's token went out on its own: " << a.messages;
}

TEST_F(ServingE2E, ASecondServerOnABusyPortIsRefusedNotSharingIt) {
  // gRPC's default SO_REUSEPORT would let both listen and split the connections between them.
  auto first = serve({"--no-request-log"}, "first.log");
  ChildProcess second({tandem_binary(), "serve", "--model", model_dir_, "--port",
                       std::to_string(first->port()), "--threads", "1"},
                      log("second.log"));
  EXPECT_EQ(second.stop(0, 30.0), 1) << second.log();
  EXPECT_NE(second.log().find("cannot listen on 127.0.0.1:" + std::to_string(first->port())),
            std::string::npos)
      << second.log();
  // The first one is untouched.
  pb::GenerateResponse out;
  EXPECT_TRUE(unary(*connect(first->address()), greedy("The quick", 3), &out).ok());
}

TEST_F(ServingE2E, BadRequestsGetTheRightCodesAndTheServerKeepsServing) {
  auto server = serve({}, "serve.log");
  auto stub = connect(server->address(), 200 << 20);
  auto expect_code = [&](const pb::GenerateRequest& r, grpc::StatusCode code,
                         const std::string& names) {
    pb::GenerateResponse out;
    const grpc::Status s = unary(*stub, r, &out);
    EXPECT_EQ(s.error_code(), code) << names << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(names), std::string::npos) << s.error_message();
    const StreamResult st = stream(*stub, r);
    EXPECT_EQ(st.status.error_code(), code) << names;
    EXPECT_EQ(st.messages, 0);
  };
  pb::GenerateRequest r = greedy("", 8);
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "prompt");
  r = greedy("hi", 0);
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "max_tokens");
  r = greedy("hi", 1 << 30);
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "max_tokens");
  r = greedy("hi", 8);
  r.mutable_sampling()->set_temperature(-1.0f);
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "temperature");
  r = greedy("hi", 8);
  r.mutable_sampling()->set_temperature(std::nanf(""));
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "temperature");
  r = greedy("hi", 8);
  r.mutable_sampling()->set_top_p(0.0f);
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "top_p");
  r = greedy("hi", 8);
  r.mutable_sampling()->set_top_k(-3);
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "top_k");
  r = greedy("hi", 8);
  r.mutable_sampling()->set_repetition_penalty(0.0f);
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "repetition_penalty");
  r = greedy("hi", 8);
  r.set_top_logprobs(50);
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "top_logprobs");
  r = greedy("hi", 8);
  r.clear_prompt();
  for (int i = 0; i < 1100; ++i) r.mutable_prompt_tokens()->add_ids(5);  // > the 1024 context
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "prompt");
  r = greedy("hi", 8);
  r.clear_prompt();
  r.mutable_prompt_tokens()->add_ids(1 << 20);  // outside the vocabulary
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "prompt");
  r = greedy("hi", 8);
  r.clear_prompt();  // neither prompt nor tokens
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "prompt");
  // A 100 MB prompt: refused by the message size limit before it is even parsed.
  r = greedy(std::string(100 << 20, 'a'), 8);
  {
    pb::GenerateResponse out;
    const grpc::Status s = unary(*stub, r, &out);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  }
  // A prompt under the message limit but far longer than the context: named, not tokenized.
  r = greedy(std::string(3 << 20, 'a'), 8);
  expect_code(r, grpc::StatusCode::INVALID_ARGUMENT, "prompt");
  // Garbage bytes on the port: the connection is dropped, the server is unharmed.
  for (int attempt = 0; attempt < 3; ++attempt) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(server->port()));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    std::mt19937 rng(attempt);
    std::string junk(64 << 10, '\0');
    for (char& c : junk) c = static_cast<char>(rng());
    if (attempt == 1) junk = "GET / HTTP/1.1\r\nHost: x\r\n\r\n" + junk;
    (void)!::send(fd, junk.data(), junk.size(), MSG_NOSIGNAL);
    ::close(fd);
  }
  // Every rejection was counted; the server still answers, with the same tokens as before.
  EXPECT_GE(scrape(server->metrics_port(), "tandem_requests_total{outcome=\"invalid_argument\"}"),
            24.0);
  const StreamResult ok = stream(*stub, greedy("The quick brown fox", 8));
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.tokens.size(), 8u);
  EXPECT_TRUE(server->process().running());
}

TEST_F(ServingE2E, BearerTokenIsRequiredWhenConfigured) {
  const std::string token_file = log("token");
  std::ofstream(token_file) << "s3cret-token\n";
  auto server = serve({"--auth-token-file", token_file}, "serve.log");
  auto stub = connect(server->address());
  auto call = [&](const std::string& authorization) {
    grpc::ClientContext c;
    if (!authorization.empty()) c.AddMetadata("authorization", authorization);
    pb::GenerateResponse out;
    return stub->Generate(&c, greedy("The quick", 4), &out);
  };
  EXPECT_EQ(call("").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call("Bearer wrong").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(call("Bearer s3cret-tokeN").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(call("Bearer s3cret-token").ok());
  grpc::ClientContext c;
  pb::ModelInfoResponse info;
  EXPECT_EQ(stub->ModelInfo(&c, pb::ModelInfoRequest(), &info).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(ServingE2E, CancelDeadlineAndDisconnectFreeTheKvBlocksAtOnce) {
  auto server = serve({}, "serve.log", /*slow=*/true);
  const int metrics = server->metrics_port();
  auto stub = connect(server->address());
  auto kv_used = [&] { return scrape(metrics, "tandem_kv_blocks_used"); };
  ASSERT_EQ(kv_used(), 0.0);

  // 1. The client cancels after the first message.
  {
    grpc::ClientContext c;
    auto reader = stub->GenerateStream(&c, long_request());
    pb::GenerateResponse m;
    ASSERT_TRUE(reader->Read(&m));
    // The sequence holds blocks while it runs (the stats follow each step).
    EXPECT_TRUE(eventually([&] { return kv_used() > 0.0; }, 5.0));
    c.TryCancel();
    while (reader->Read(&m)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  EXPECT_TRUE(eventually([&] { return kv_used() == 0.0; }, 5.0)) << kv_used();
  EXPECT_TRUE(eventually(
      [&] { return scrape(metrics, "tandem_requests_total{outcome=\"cancelled\"}") == 1.0; }, 5.0));

  // 2. A deadline passes mid-generation.
  {
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
    pb::GenerateResponse out;
    EXPECT_EQ(stub->Generate(&c, long_request(), &out).error_code(),
              grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  EXPECT_TRUE(eventually([&] { return kv_used() == 0.0; }, 5.0)) << kv_used();
  EXPECT_TRUE(eventually(
      [&] {
        return scrape(metrics, "tandem_requests_total{outcome=\"deadline_exceeded\"}") == 1.0;
      },
      5.0))
      << "cancelled " << scrape(metrics, "tandem_requests_total{outcome=\"cancelled\"}") << ", ok "
      << scrape(metrics, "tandem_requests_total{outcome=\"ok\"}");

  // 3. A client process is killed mid-stream (its connection drops without a goodbye).
  {
    ChildProcess client(
        {tandem_binary(), "bench", "serve", "--target", server->address(), "--num-requests", "1",
         "--prompt-len", "8", "--output-len", "1000", "--no-progress"},
        log("client.log"));
    ASSERT_TRUE(eventually([&] { return kv_used() > 0.0; }, 10.0));
    client.stop(SIGKILL, 5.0);
  }
  EXPECT_TRUE(eventually([&] { return kv_used() == 0.0; }, 5.0)) << kv_used();
  EXPECT_EQ(scrape(metrics, "tandem_num_requests_running"), 0.0);
  EXPECT_TRUE(eventually(
      [&] { return scrape(metrics, "tandem_requests_total{outcome=\"cancelled\"}") == 2.0; }, 5.0));
  // No request ran to its 1000 tokens.
  EXPECT_LT(scrape(metrics, "tandem_engine_generated_tokens"), 1000.0);
}

TEST_F(ServingE2E, QueueLimitAnswersResourceExhausted) {
  auto server = serve({"--max-running", "1", "--max-queue", "1"}, "serve.log", /*slow=*/true);
  auto stub = connect(server->address());
  std::vector<std::thread> holders;
  std::vector<grpc::ClientContext> contexts(2);
  for (int i = 0; i < 2; ++i) {
    holders.emplace_back([&, i] {
      pb::GenerateResponse out;
      stub->Generate(&contexts[i], long_request(), &out).IgnoreError();
    });
  }
  ASSERT_TRUE(eventually(
      [&] { return scrape(server->metrics_port(), "tandem_num_requests_in_flight") == 2.0; },
      10.0));
  pb::GenerateResponse out;
  const grpc::Status s = unary(*stub, greedy("hi", 2), &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  for (auto& c : contexts) c.TryCancel();
  for (auto& t : holders) t.join();
  EXPECT_TRUE(eventually(
      [&] { return scrape(server->metrics_port(), "tandem_num_requests_in_flight") == 0.0; }, 5.0));
  EXPECT_TRUE(unary(*stub, greedy("hi", 2), &out).ok());
}

TEST_F(ServingE2E, SigtermDrainsInFlightRequestsAndExitsZero) {
  auto server = serve({}, "serve.log", /*slow=*/true);
  auto stub = connect(server->address());
  StreamResult in_flight;
  std::thread t([&] { in_flight = stream(*stub, long_request(300)); });
  ASSERT_TRUE(eventually(
      [&] { return scrape(server->metrics_port(), "tandem_num_requests_running") == 1.0; }, 10.0));
  ::kill(server->process().pid(), SIGTERM);
  // Draining: health NOT_SERVING, new requests UNAVAILABLE.
  auto health = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials()));
  EXPECT_TRUE(eventually(
      [&] {
        grpc::ClientContext c;
        grpc::health::v1::HealthCheckResponse r;
        const grpc::Status s = health->Check(&c, grpc::health::v1::HealthCheckRequest(), &r);
        return s.ok() && r.status() == grpc::health::v1::HealthCheckResponse::NOT_SERVING;
      },
      5.0));
  pb::GenerateResponse out;
  EXPECT_EQ(unary(*stub, greedy("hi", 2), &out).error_code(), grpc::StatusCode::UNAVAILABLE);
  t.join();
  EXPECT_TRUE(in_flight.status.ok()) << in_flight.status.error_message();
  EXPECT_EQ(in_flight.tokens.size(), 300u);
  EXPECT_EQ(server->process().stop(0, 20.0), 0) << server->process().log();
}

// ---- a tensor-parallel replica (mpirun -np 2 tandem serve) ------------------------------------

TEST_F(ServingE2E, TensorParallelReplicaAnswersLikeOneProcess) {
  auto one = serve({"--no-request-log"}, "tp1.log");
  auto two = serve_tp(2, {"--no-request-log"}, "tp2.log");
  ASSERT_GT(two->port(), 0) << two->process().log();
  EXPECT_NE(two->process().log().find("tensor-parallel over 2 ranks"), std::string::npos);
  auto a = connect(one->address());
  auto b = connect(two->address());
  const std::vector<std::string> prompts = {"The quick brown fox", "In the beginning God",
                                            "Serving a model means", "And the earth was"};
  std::vector<std::vector<int32_t>> expected;
  for (const std::string& prompt : prompts) {
    pb::GenerateResponse x, y;
    ASSERT_TRUE(unary(*a, greedy(prompt, 32), &x).ok());
    const grpc::Status st = unary(*b, greedy(prompt, 32), &y);
    ASSERT_TRUE(st.ok()) << st.error_message() << "\n" << two->process().log();
    expected.emplace_back(x.token_ids().begin(), x.token_ids().end());
    EXPECT_EQ(std::vector<int32_t>(y.token_ids().begin(), y.token_ids().end()), expected.back())
        << prompt;
    EXPECT_EQ(y.text(), x.text()) << prompt;
    // GenerateStream yields the same tokens as Generate.
    const StreamResult s = stream(*b, greedy(prompt, 32));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.tokens, expected.back()) << prompt;
    EXPECT_EQ(s.text, y.text());
  }
  // ModelInfo says how the replica is split.
  grpc::ClientContext ic;
  pb::ModelInfoResponse info;
  ASSERT_TRUE(b->ModelInfo(&ic, pb::ModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.tensor_parallel(), 2);
  // Many at once: batched steps (prefill and decode rows mixed) give the same answers.
  std::vector<StreamResult> results(16);
  std::vector<std::thread> clients;
  for (int i = 0; i < 16; ++i) {
    clients.emplace_back([&, i] { results[i] = stream(*b, greedy(prompts[i % 4], 32)); });
  }
  for (auto& t : clients) t.join();
  for (int i = 0; i < 16; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, expected[i % 4]) << i;
  }
  // The pool is the same size on every rank: KV blocks are reported and freed.
  EXPECT_GT(scrape(two->metrics_port(), "tandem_kv_blocks_free"), 0.0);
  // SIGUSR1 to mpirun reaches every rank: the leader drains (the request in flight finishes),
  // tells the other rank to stop, and the job exits 0 (a SIGTERM to mpirun would be followed by
  // its SIGKILL a second later).
  ASSERT_GT(rank_pid(*two, 0), 0);
  ASSERT_GT(rank_pid(*two, 1), 0);
  StreamResult in_flight;
  pb::GenerateRequest long_one = greedy("And the earth was", 900);
  long_one.set_ignore_eos(true);
  std::thread t([&] { in_flight = stream(*b, long_one); });
  ASSERT_TRUE(eventually(
      [&] { return scrape(two->metrics_port(), "tandem_num_requests_running") == 1.0; }, 10.0));
  ::kill(two->process().pid(), SIGUSR1);
  t.join();
  EXPECT_TRUE(in_flight.status.ok()) << in_flight.status.error_message();
  EXPECT_EQ(in_flight.tokens.size(), 900u);
  EXPECT_EQ(two->process().stop(0, 30.0), 0) << two->process().log();
  EXPECT_NE(two->process().log().find("tensor-parallel rank 1 stopped"), std::string::npos)
      << two->process().log();
}

TEST_F(ServingE2E, TensorParallelReplicaOfRanksThatDoNotDivideTheHeadsIsRefused) {
  // The tiny model has 4 heads: 3 ranks cannot split them; every rank says so and the job ends.
  allow_mpirun();
  ChildProcess job({TANDEM_MPIRUN, "--oversubscribe", "-np", "3", tandem_binary(), "serve",
                    "--model", model_dir_, "--port", "0", "--threads", "1"},
                   log("tp3.log"));
  EXPECT_NE(job.stop(0, 60.0), 0);
  const std::string text = job.log();
  EXPECT_NE(text.find("3 ranks under mpirun make a tensor-parallel replica"), std::string::npos)
      << text;
  EXPECT_NE(text.find("n_head = 4 does not divide"), std::string::npos) << text;
  EXPECT_EQ(text.find("listening on"), std::string::npos) << text;
}

TEST_F(ServingE2E, TensorParallelReplicaWhoseWorkerDiesEndsEveryRequestAndExits) {
  auto two = serve_tp(2, {"--no-request-log"}, "tp_kill.log", /*slow=*/true);
  ASSERT_GT(two->port(), 0) << two->process().log();
  auto stub = connect(two->address());
  std::vector<StreamResult> results(3);
  std::vector<std::thread> clients;
  for (int i = 0; i < 3; ++i) {
    clients.emplace_back([&, i] {
      pb::GenerateRequest r = long_request(1000);
      r.set_prompt("request " + std::to_string(i));
      results[i] = stream(*stub, r, 60.0);
    });
  }
  ASSERT_TRUE(eventually(
      [&] { return scrape(two->metrics_port(), "tandem_num_requests_running") == 3.0; }, 20.0));
  const pid_t worker = rank_pid(*two, 1);
  ASSERT_GT(worker, 0);
  const auto killed = std::chrono::steady_clock::now();
  ::kill(worker, SIGKILL);
  for (auto& t : clients) t.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(results[i].status.error_code(), grpc::StatusCode::UNAVAILABLE)
        << i << ": " << results[i].status.error_message();
    EXPECT_LT(results[i].tokens.size(), 1000u);
  }
  EXPECT_LT(seconds, 30.0) << "the requests hung after the worker died";
  // The job ends, non-zero, without anyone stopping it.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (two->process().running() && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_FALSE(two->process().running()) << "the replica outlived its worker by 60 s";
  EXPECT_NE(two->process().stop(SIGKILL, 5.0), 0);
}

// ---- through the router ---------------------------------------------------------------------

TEST_F(ServingE2E, RouterServesConcurrentStreamsSurvivesAKilledReplicaAndTakesItBack) {
  auto a = serve({"--no-request-log"}, "a.log");
  auto b = serve({"--no-request-log"}, "b.log");
  const int port_a = a->port();
  auto router = std::make_unique<ServerProcess>(
      std::vector<std::string>{"router", "--replicas", a->address() + "," + b->address(),
                               "--metrics-port", "0", "--health-interval-ms", "100",
                               "--no-request-log"},
      log("router.log"));
  auto direct = connect(a->address());
  auto via_router = connect(router->address());

  // The expected answers, from a replica directly.
  std::vector<std::string> prompts;
  std::vector<std::vector<int32_t>> expected;
  for (int i = 0; i < 8; ++i) {
    prompts.push_back("The quick brown fox " + std::to_string(i));
    pb::GenerateResponse out;
    ASSERT_TRUE(unary(*direct, greedy(prompts.back(), 12), &out).ok());
    expected.emplace_back(out.token_ids().begin(), out.token_ids().end());
  }
  // 1. 64 concurrent streaming clients all complete with the right tokens.
  {
    std::vector<StreamResult> results(64);
    std::vector<std::thread> clients;
    for (int i = 0; i < 64; ++i) {
      clients.emplace_back(
          [&, i] { results[i] = stream(*via_router, greedy(prompts[i % prompts.size()], 12)); });
    }
    for (auto& t : clients) t.join();
    for (int i = 0; i < 64; ++i) {
      ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
      EXPECT_EQ(results[i].tokens, expected[i % prompts.size()]) << i;
    }
    // Both replicas took a share.
    EXPECT_GT(scrape(a->metrics_port(), "tandem_requests_total{outcome=\"ok\"}"), 8.0);
    EXPECT_GT(scrape(b->metrics_port(), "tandem_requests_total{outcome=\"ok\"}"), 0.0);
  }
  // 2. Kill replica a mid-run: no request that had not started streaming is lost.
  {
    const int n = 48;
    std::vector<StreamResult> results(n);
    std::vector<std::thread> clients;
    for (int i = 0; i < n; ++i) {
      clients.emplace_back([&, i] {
        std::this_thread::sleep_for(std::chrono::milliseconds(10 * i));
        pb::GenerateRequest r = long_request(60);
        r.set_prompt("request " + std::to_string(i) + " of the failover run");
        results[i] = stream(*via_router, r);
      });
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    a->process().stop(SIGKILL, 5.0);
    for (auto& t : clients) t.join();
    int ok = 0, failed_after_start = 0;
    for (int i = 0; i < n; ++i) {
      if (results[i].status.ok()) {
        ++ok;
        EXPECT_EQ(results[i].tokens.size(), 60u);
      } else {
        // Only a request that had already streamed tokens may fail.
        EXPECT_GT(results[i].messages, 0)
            << i << " failed before its first token: " << results[i].status.error_message();
        ++failed_after_start;
      }
    }
    EXPECT_GT(ok, n / 2);
    std::printf("failover: %d ok, %d failed after their first token\n", ok, failed_after_start);
  }
  // 3. The router keeps serving with b alone, and says so.
  EXPECT_TRUE(eventually(
      [&] { return scrape(router->metrics_port(), "tandem_router_replicas_healthy") == 1.0; },
      5.0));
  for (int i = 0; i < 4; ++i) {
    const StreamResult s = stream(*via_router, greedy(prompts[i], 12));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.tokens, expected[i]);
  }
  // 4. Restarted on the same port, a rejoins the rotation and gets requests again.
  a = serve({"--no-request-log", "--port", std::to_string(port_a)}, "a2.log");
  ASSERT_EQ(a->port(), port_a);
  EXPECT_TRUE(eventually(
      [&] { return scrape(router->metrics_port(), "tandem_router_replicas_healthy") == 2.0; },
      10.0));
  for (int i = 0; i < 16; ++i) {
    const StreamResult s = stream(*via_router, greedy("rejoin " + std::to_string(i), 4));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  }
  EXPECT_GT(scrape(a->metrics_port(), "tandem_requests_total{outcome=\"ok\"}"), 0.0);
  // The router drains and exits 0 on SIGTERM too.
  EXPECT_EQ(router->process().stop(SIGTERM, 20.0), 0) << router->process().log();
}

TEST_F(ServingE2E, RouterSendsASharedPrefixToOneReplica) {
  auto a = serve({"--no-request-log"}, "a.log");
  auto b = serve({"--no-request-log"}, "b.log");
  auto router = std::make_unique<ServerProcess>(
      std::vector<std::string>{"router", "--replicas", a->address() + "," + b->address(),
                               "--health-interval-ms", "100", "--no-request-log"},
      log("router.log"));
  auto stub = connect(router->address());
  const std::string shared(200, 'x');  // the affinity key is the first 64 bytes
  for (int i = 0; i < 10; ++i) {
    const StreamResult s = stream(*stub, greedy(shared + std::to_string(i), 2));
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  }
  const double on_a = scrape(a->metrics_port(), "tandem_requests_total{outcome=\"ok\"}");
  const double on_b = scrape(b->metrics_port(), "tandem_requests_total{outcome=\"ok\"}");
  EXPECT_EQ(on_a + on_b, 10.0);
  EXPECT_TRUE(on_a == 10.0 || on_b == 10.0) << on_a << " / " << on_b;
  // And the replica that has the prefix reuses it.
  const int port = on_a == 10.0 ? a->metrics_port() : b->metrics_port();
  EXPECT_GT(scrape(port, "tandem_prefix_cache_hit_rate"), 0.5);
}

TEST_F(ServingE2E, BenchServeReportsEveryRequestAsTableAndJson) {
  auto server = serve({"--no-request-log"}, "serve.log");
  const std::string dataset = log("prompts.jsonl"), result = log("result.json");
  std::ofstream(dataset) << "{\"prompt\": \"The quick brown fox\", \"max_tokens\": 5}\n\n"
                         << "{\"prompt\": \"In the beginning\", \"max_tokens\": 3}\n";
  for (const std::vector<std::string>& extra :
       {std::vector<std::string>{"--dataset", dataset, "--num-requests", "6"},
        std::vector<std::string>{"--rate", "50", "--num-requests", "12", "--prompt-len", "8",
                                 "--prompt-len-range", "4", "--output-len", "6"}}) {
    std::vector<std::string> args = {
        tandem_binary(), "bench", "serve",         "--target", server->address(),
        "--seed",        "3",     "--result-json", result};
    args.insert(args.end(), extra.begin(), extra.end());
    ChildProcess bench(args, log("bench.log"));
    ASSERT_EQ(bench.stop(0, 60.0), 0) << bench.log();
    const std::string table = bench.log();
    EXPECT_NE(table.find("Successful requests:"), std::string::npos) << table;
    EXPECT_NE(table.find("P99 TTFT (ms):"), std::string::npos) << table;
    const auto json = nlohmann::json::parse(read_text(result));
    const int n = std::stoi(extra[3]);
    EXPECT_EQ(json["completed"], n);
    EXPECT_EQ(json["failed"], 0);
    EXPECT_EQ(json["ttft"]["count"], n);
    EXPECT_GT(json["output_token_throughput"].get<double>(), 0.0);
    EXPECT_LE(json["ttft"]["p50_ms"].get<double>(), json["ttft"]["p99_ms"].get<double>());
    if (extra[0] == "--dataset") {
      EXPECT_LE(json["total_output_tokens"].get<int>(), 3 * 5 + 3 * 3);  // the lines' max_tokens
    } else {
      EXPECT_EQ(json["total_output_tokens"], 12 * 6);  // ignore_eos: exactly the asked lengths
    }
  }
  EXPECT_EQ(scrape(server->metrics_port(), "tandem_requests_total{outcome=\"ok\"}"), 18.0);
}

TEST(ServingCli, UsageErrorsAreOneLineAndExitTwo) {
  for (const std::string args :
       {"serve", "serve --model x --port 70000", "router", "router --replicas nocolon",
        "bench serve", "serve --model x --tls-cert a.pem", "generate --server a:1 --model m",
        "serve --model x --kv-cache-mb 64 --kv-cache-fraction 0.5",
        "router --replicas a:1 --tls-cert c.pem"}) {
    const std::string out = ::testing::TempDir() + "/serving_cli.txt";
    const int raw = std::system((tandem_binary() + " " + args + " >/dev/null 2>" + out).c_str());
    EXPECT_EQ(WEXITSTATUS(raw), 2) << args;
    const std::string err = read_text(out);
    EXPECT_EQ(err.rfind("tandem: usage error: ", 0), 0u) << args << ": " << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  }
  const std::string out = ::testing::TempDir() + "/serving_cli.txt";
  const int raw = std::system(
      (tandem_binary() + " serve --model /nonexistent --port 0 >/dev/null 2>" + out).c_str());
  EXPECT_EQ(WEXITSTATUS(raw), 1);
  EXPECT_EQ(read_text(out).rfind("tandem: error: ", 0), 0u) << read_text(out);
  // Under mpirun (a tensor-parallel replica): every rank names the problem and the job ends
  // non-zero, no rank left waiting for the others.
  if (std::system("command -v mpirun >/dev/null 2>&1") == 0) {
    const int mpi = std::system(("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
                                 "timeout 60 mpirun --oversubscribe -np 2 " +
                                 tandem_binary() + " serve --model /nonexistent --port 0 " +
                                 ">/dev/null 2>" + out)
                                    .c_str());
    EXPECT_NE(WEXITSTATUS(mpi), 0);
    EXPECT_NE(read_text(out).find("failed: error: /nonexistent has no tokenizer files"),
              std::string::npos)
        << read_text(out);
  }
}

// Sets an environment variable for the processes started while it lives (a test hook).
struct ScopedEnv {
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() { ::unsetenv(name_); }
  const char* name_;
};

TEST_F(ServingE2E, TlsCertificateThatIsNotItsKeysIsNamedNotCalledABusyPort) {
  const std::string key1 = log("key1.pem"), cert1 = log("cert1.pem");
  const std::string key2 = log("key2.pem"), cert2 = log("cert2.pem");
  for (const auto& [key, cert] : {std::pair{key1, cert1}, std::pair{key2, cert2}}) {
    const std::string openssl = "openssl req -x509 -newkey rsa:2048 -nodes -keyout " + key +
                                " -out " + cert + " -days 1 -subj /CN=localhost >/dev/null 2>&1";
    if (std::system(openssl.c_str()) != 0) GTEST_SKIP() << "no openssl to make a certificate";
  }
  for (const std::string command : {std::string("serve --model ") + model_dir_ + " --port 0",
                                    std::string("router --replicas 127.0.0.1:1 --port 0")}) {
    const std::string err = log("tls_mismatch.err");
    const int raw = std::system((tandem_binary() + " " + command + " --tls-cert " + cert1 +
                                 " --tls-key " + key2 + " >/dev/null 2>" + err)
                                    .c_str());
    const std::string text = read_text(err);
    EXPECT_TRUE(WIFEXITED(raw) && WEXITSTATUS(raw) == 1) << command << ": " << text;
    EXPECT_NE(text.find("is not the private key of the certificate"), std::string::npos)
        << command << ": " << text;
    EXPECT_EQ(text.find("in use"), std::string::npos) << text;
    EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 1) << text;
  }
}

TEST_F(ServingE2E, RouterWhoseTokenTheReplicasRejectSaysSo) {
  const std::string replica_token = log("replica_token"), router_token = log("router_token");
  std::ofstream(replica_token) << "replica-secret\n";
  std::ofstream(router_token) << "router-secret\n";
  auto replica = serve({"--auth-token-file", replica_token}, "replica.log");
  auto router = std::make_unique<ServerProcess>(
      std::vector<std::string>{"router", "--replicas", replica->address(), "--metrics-port", "0",
                               "--health-interval-ms", "100", "--auth-token-file", router_token},
      log("router.log"));
  auto stub = connect(router->address());
  grpc::ClientContext c;
  c.AddMetadata("authorization", "Bearer router-secret");
  c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  pb::GenerateResponse out;
  const grpc::Status s = stub->Generate(&c, greedy("The quick", 4), &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(s.error_message().find("UNAUTHENTICATED"), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find(replica->address()), std::string::npos) << s.error_message();
}

TEST_F(ServingE2E, ARequestArrivingDuringShutdownGetsUnavailableNeverCancelled) {
  // The racy point held open: a request that has been admitted but not yet checked against the
  // drain. It must be counted (the drain waits for it) and answered UNAVAILABLE, not left for
  // the gRPC server's shutdown to cut (CANCELLED, which clients do not retry).
  {
    ScopedEnv hold("TANDEM_TEST_HOLD_ADMISSION_MS", "2500");
    auto server = serve({"--no-request-log"}, "held_replica.log");  // drain grace 10 s
    auto stub = connect(server->address());
    grpc::Status status;
    std::thread call([&] {
      pb::GenerateResponse out;
      status = unary(*stub, greedy("The quick", 4), &out, 30);
    });
    ASSERT_TRUE(eventually(
        [&] { return scrape(server->metrics_port(), "tandem_num_requests_in_flight") == 1.0; },
        10.0));
    ::kill(server->process().pid(), SIGTERM);
    call.join();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
    EXPECT_EQ(server->process().stop(0, 30.0), 0);
  }
  auto replica = serve({"--no-request-log"}, "replica.log", /*slow=*/true);
  std::unique_ptr<ServerProcess> router;
  {
    ScopedEnv hold("TANDEM_TEST_HOLD_ADMISSION_MS", "2500");
    router = std::make_unique<ServerProcess>(
        std::vector<std::string>{"router", "--replicas", replica->address(), "--metrics-port", "0",
                                 "--health-interval-ms", "100", "--drain-grace", "10",
                                 "--no-request-log"},
        log("held_router.log"));
  }
  ASSERT_TRUE(eventually(
      [&] { return scrape(router->metrics_port(), "tandem_router_replicas_healthy") == 1.0; },
      10.0));
  auto stub = connect(router->address());
  grpc::Status status;
  std::thread call([&] {
    pb::GenerateResponse out;
    status = unary(*stub, greedy("The quick", 4), &out, 30);
  });
  ASSERT_TRUE(eventually(
      [&] { return scrape(router->metrics_port(), "tandem_num_requests_in_flight") == 1.0; },
      10.0));
  ::kill(router->process().pid(), SIGTERM);
  call.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_EQ(router->process().stop(0, 30.0), 0);

  // A stream still running when the router's drain grace ends: UNAVAILABLE too (the router
  // ends it itself before its gRPC server's shutdown would cancel it).
  auto short_grace = std::make_unique<ServerProcess>(
      std::vector<std::string>{"router", "--replicas", replica->address(), "--metrics-port", "0",
                               "--health-interval-ms", "100", "--drain-grace", "0.5",
                               "--no-request-log"},
      log("short_grace_router.log"));
  ASSERT_TRUE(eventually(
      [&] { return scrape(short_grace->metrics_port(), "tandem_router_replicas_healthy") == 1.0; },
      10.0));
  auto via = connect(short_grace->address());
  StreamResult result;
  std::thread streaming([&] { result = stream(*via, long_request(1000)); });
  ASSERT_TRUE(eventually(
      [&] { return scrape(replica->metrics_port(), "tandem_num_requests_running") == 1.0; }, 10.0));
  ::kill(short_grace->process().pid(), SIGTERM);
  streaming.join();
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << result.status.error_message();
  EXPECT_EQ(short_grace->process().stop(0, 30.0), 0);
  // The replica's sequence was cancelled with the router's call.
  EXPECT_TRUE(eventually(
      [&] { return scrape(replica->metrics_port(), "tandem_kv_blocks_used") == 0.0; }, 10.0));
}

TEST_F(ServingE2E, DrainGraceIsKeptWithManyLongStreams) {
  // 50 long streams and steps of 200 ms: when the grace ends, every stream is ended in one step's
  // time (one engine lock for all of them, not one per stream: 50 x 200 ms before).
  ScopedEnv floor("TANDEM_TEST_MIN_STEP_MS", "200");
  auto server = std::make_unique<ServerProcess>(
      std::vector<std::string>{"serve", "--model", model_dir_, "--metrics-port", "0", "--threads",
                               "1", "--drain-grace", "1", "--no-request-log"},
      log("serve.log"));
  auto stub = connect(server->address());
  const int n = 50;
  std::vector<StreamResult> results(n);
  std::vector<std::thread> clients;
  for (int i = 0; i < n; ++i) {
    clients.emplace_back([&, i] {
      pb::GenerateRequest r = long_request(1000);
      r.set_prompt("stream " + std::to_string(i));
      results[i] = stream(*stub, r, 120);
    });
  }
  ASSERT_TRUE(eventually(
      [&] { return scrape(server->metrics_port(), "tandem_num_requests_running") == n; }, 60.0));
  const auto t0 = std::chrono::steady_clock::now();
  ::kill(server->process().pid(), SIGTERM);
  const int status = server->process().stop(0, 60.0);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (auto& t : clients) t.join();
  EXPECT_EQ(status, 0);
  // The grace (1 s) plus one step, the gRPC shutdown and the exit, with room for a busy machine;
  // far below the 10 s that 50 aborts one after another took.
  EXPECT_LT(seconds, 6.0) << server->process().log();
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(results[i].status.error_code(), grpc::StatusCode::UNAVAILABLE)
        << i << ": " << results[i].status.error_message();
  }
  std::printf("drain of %d streams with --drain-grace 1: exited after %.2f s\n", n, seconds);
}

TEST_F(ServingE2E, FrozenReplicaEndsItsStreamsAndTheOtherKeepsServing) {
  auto a = serve({"--no-request-log", "--max-running", "1", "--max-queue", "8"}, "a.log", true);
  auto b = serve({"--no-request-log", "--max-running", "1", "--max-queue", "8"}, "b.log", true);
  auto router = std::make_unique<ServerProcess>(
      std::vector<std::string>{"router", "--replicas", a->address() + "," + b->address(),
                               "--metrics-port", "0", "--health-interval-ms", "100",
                               "--replica-stall-timeout", "2", "--no-request-log"},
      log("router.log"));
  ASSERT_TRUE(eventually(
      [&] { return scrape(router->metrics_port(), "tandem_router_replicas_healthy") == 2.0; },
      10.0));
  auto via = connect(router->address());
  // Two streams with one prompt go to one replica (prefix affinity): the first runs, the second
  // waits there without a token (max-running 1).
  pb::GenerateRequest first = long_request(1000), second = long_request(300);
  std::atomic<int> first_messages{0};
  StreamResult r1, r2;
  std::thread t1([&] {
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(90));
    auto reader = via->GenerateStream(&c, first);
    pb::GenerateResponse m;
    while (reader->Read(&m)) {
      ++first_messages;
      r1.tokens.insert(r1.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    }
    r1.status = reader->Finish();
  });
  ASSERT_TRUE(eventually([&] { return first_messages.load() > 0; }, 20.0));
  std::thread t2([&] { r2 = stream(*via, second, 90); });
  ServerProcess* frozen = nullptr;
  ServerProcess* other = nullptr;
  ASSERT_TRUE(eventually(
      [&] {
        for (auto* p : {a.get(), b.get()}) {
          if (scrape(p->metrics_port(), "tandem_num_requests_in_flight") == 2.0) frozen = p;
        }
        return frozen != nullptr;
      },
      20.0));
  other = frozen == a.get() ? b.get() : a.get();
  const auto t0 = std::chrono::steady_clock::now();
  ::kill(frozen->process().pid(), SIGSTOP);
  t1.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // The running stream ends UNAVAILABLE after the stall timeout (2 s), not at its deadline.
  EXPECT_EQ(r1.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r1.status.error_message();
  EXPECT_NE(r1.status.error_message().find("stopped answering"), std::string::npos)
      << r1.status.error_message();
  EXPECT_GT(r1.tokens.size(), 0u);
  EXPECT_LT(seconds, 60.0);
  // The waiting one had no token: retried on the other replica, where it completes.
  t2.join();
  EXPECT_TRUE(r2.status.ok()) << r2.status.error_message();
  EXPECT_EQ(r2.tokens.size(), 300u);
  EXPECT_GE(scrape(other->metrics_port(), "tandem_requests_total{outcome=\"ok\"}"), 1.0);
  // New requests are served meanwhile.
  pb::GenerateResponse out;
  EXPECT_TRUE(unary(*via, greedy("The quick", 4), &out).ok());
  ::kill(frozen->process().pid(), SIGCONT);
  std::printf("frozen replica: its stream ended after %.2f s\n", seconds);
}

TEST_F(ServingE2E, AClientThatStopsReadingIsPausedThenCancelledAndItsBlocksFreed) {
  auto server = serve({"--no-request-log", "--max-running", "1", "--client-stall-timeout", "8"},
                      "serve.log", /*slow=*/true);
  const int metrics = server->metrics_port();
  // A client that reads one message and then nothing: without BDP probing its flow-control
  // window stays small, so the server's writes block once it is full.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8192);
  auto stalled_stub = pb::Generation::NewStub(
      grpc::CreateCustomChannel(server->address(), grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext c;
  c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  pb::GenerateRequest r = long_request(1000);
  r.set_top_logprobs(20);  // large messages: the window fills after a few dozen
  auto reader = stalled_stub->GenerateStream(&c, r);
  pb::GenerateResponse m;
  ASSERT_TRUE(reader->Read(&m));
  // 1. Generation pauses with the request still holding its blocks: the count of generated
  // tokens stops moving (at 5 ms or more a step it would keep growing otherwise).
  double last = -1.0;
  int still = 0;
  const bool paused = eventually(
      [&] {
        const double now = scrape(metrics, "tandem_engine_generated_tokens");
        still = now == last ? still + 1 : 0;
        last = now;
        return still >= 10 && scrape(metrics, "tandem_kv_blocks_used") > 0.0;
      },
      30.0);
  EXPECT_TRUE(paused) << "generated " << last;
  EXPECT_LT(last, 1000.0);
  // 2. After --client-stall-timeout the request is cancelled and its blocks freed.
  EXPECT_TRUE(eventually([&] { return scrape(metrics, "tandem_kv_blocks_used") == 0.0; }, 40.0));
  EXPECT_TRUE(eventually(
      [&] { return scrape(metrics, "tandem_requests_total{outcome=\"cancelled\"}") == 1.0; },
      10.0));
  // 3. A new request (max-running 1) is served.
  pb::GenerateResponse out;
  EXPECT_TRUE(unary(*connect(server->address()), greedy("The quick", 8), &out).ok());
  EXPECT_EQ(out.token_ids_size(), 8);
  c.TryCancel();
  std::printf("slow consumer: generation paused at %.0f tokens\n", last);
}

TEST_F(ServingE2E, IdleConnectionsOnTheMetricsPortNeitherStarveItNorTheProcessFds) {
  auto server = serve({"--no-request-log"}, "serve.log");
  const pid_t pid = server->process().pid();
  auto open_fds = [pid] {
    int n = 0;
    for ([[maybe_unused]] const auto& e :
         fs::directory_iterator("/proc/" + std::to_string(pid) + "/fd"))
      ++n;
    return n;
  };
  const int fds_before = open_fds();
  // As many idle connections as this test process may open (2000 where the limit allows).
  rlimit limit{};
  ::getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = limit.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &limit);
  const int n =
      static_cast<int>(std::min<rlim_t>(2000, limit.rlim_cur > 100 ? limit.rlim_cur - 100 : 0));
  ASSERT_GE(n, 200) << "the test needs a few hundred file descriptors";
  std::vector<int> idle;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(server->metrics_port()));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  for (int i = 0; i < n; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
      ::close(fd);
      break;
    }
    idle.push_back(fd);
  }
  // /metrics answers, the process holds a bounded number of descriptors, gRPC still serves.
  EXPECT_GE(scrape(server->metrics_port(), "tandem_kv_blocks_total"), 1.0);
  EXPECT_TRUE(eventually([&] { return open_fds() <= fds_before + 64 + 8; }, 10.0))
      << open_fds() << " descriptors open with " << idle.size() << " idle connections";
  pb::GenerateResponse out;
  EXPECT_TRUE(unary(*connect(server->address()), greedy("The quick", 4), &out).ok());
  for (int fd : idle) ::close(fd);
}

TEST_F(ServingE2E, PromptLogprobsScoreAPromptWithoutGenerating) {
  auto server = serve({"--no-request-log"}, "serve.log");
  auto stub = connect(server->address());
  pb::GenerateRequest r;
  r.mutable_prompt_tokens()->add_ids(5);
  for (int32_t t : {17, 3, 250, 41, 9}) r.mutable_prompt_tokens()->add_ids(t);
  r.set_prompt_logprobs_start(2);
  r.set_max_tokens(0);
  pb::GenerateResponse whole;
  ASSERT_TRUE(unary(*stub, r, &whole).ok());
  EXPECT_EQ(whole.token_ids_size(), 0);
  ASSERT_EQ(whole.prompt_logprobs_size(), 4);  // tokens 2..5
  for (float lp : whole.prompt_logprobs()) EXPECT_LT(lp, 0.0f);
  const StreamResult streamed = stream(*stub, r);
  ASSERT_TRUE(streamed.status.ok()) << streamed.status.error_message();
  // The same values by stream (the final message), and again with tokens generated after.
  grpc::ClientContext c;
  auto reader = stub->GenerateStream(&c, r);
  pb::GenerateResponse m, last;
  while (reader->Read(&m)) last = m;
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(std::vector<float>(last.prompt_logprobs().begin(), last.prompt_logprobs().end()),
            std::vector<float>(whole.prompt_logprobs().begin(), whole.prompt_logprobs().end()));
  r.set_prompt_logprobs_start(6);
  EXPECT_EQ(unary(*stub, r, &whole).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  r.set_prompt_logprobs_start(0);
  const grpc::Status zero = unary(*stub, r, &whole);
  EXPECT_EQ(zero.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(zero.error_message().find("max_tokens"), std::string::npos) << zero.error_message();
}

}  // namespace
}  // namespace tandem::testing

namespace tandem::testing {
namespace {

TEST_F(ServingE2E, TlsServesAndRefusesPlaintext) {
  const std::string key = log("key.pem"), cert = log("cert.pem");
  const std::string openssl = "openssl req -x509 -newkey rsa:2048 -nodes -keyout " + key +
                              " -out " + cert +
                              " -days 1 -subj /CN=localhost"
                              " -addext subjectAltName=DNS:localhost,IP:127.0.0.1 >/dev/null 2>&1";
  if (std::system(openssl.c_str()) != 0) GTEST_SKIP() << "no openssl to make a certificate";
  auto server = serve({"--tls-cert", cert, "--tls-key", key}, "serve.log");
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = read_text(cert);
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");
  auto secure = pb::Generation::NewStub(
      grpc::CreateCustomChannel(server->address(), grpc::SslCredentials(ssl), args));
  pb::GenerateResponse out;
  grpc::ClientContext c;
  c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  const grpc::Status s = secure->Generate(&c, greedy("The quick", 4), &out);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(out.token_ids_size(), 4);
  // A plaintext client gets nowhere.
  auto plain = connect(server->address());
  grpc::ClientContext pc;
  pc.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  EXPECT_FALSE(plain->Generate(&pc, greedy("The quick", 4), &out).ok());

  // A router reaches the TLS replica over TLS (verifying it with the CA) and serves TLS itself.
  auto router = std::make_unique<ServerProcess>(
      std::vector<std::string>{"router", "--replicas", server->address(), "--replica-tls-ca", cert,
                               "--tls-cert", cert, "--tls-key", key, "--metrics-port", "0",
                               "--health-interval-ms", "100"},
      log("router.log"));
  EXPECT_TRUE(eventually(
      [&] { return scrape(router->metrics_port(), "tandem_router_replicas_healthy") == 1.0; },
      10.0))
      << router->process().log();
  auto via_router = pb::Generation::NewStub(
      grpc::CreateCustomChannel(router->address(), grpc::SslCredentials(ssl), args));
  pb::GenerateResponse routed;
  grpc::ClientContext rc;
  rc.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  const grpc::Status rs = via_router->Generate(&rc, greedy("The quick", 4), &routed);
  EXPECT_TRUE(rs.ok()) << rs.error_message() << "\n" << router->process().log();
  EXPECT_EQ(routed.token_ids_size(), 4);
  // Without the CA the router cannot reach the replica: it never enters the rotation.
  auto blind = std::make_unique<ServerProcess>(
      std::vector<std::string>{"router", "--replicas", server->address(), "--metrics-port", "0",
                               "--health-interval-ms", "100"},
      log("blind_router.log"));
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  EXPECT_EQ(scrape(blind->metrics_port(), "tandem_router_replicas_healthy"), 0.0);
}

}  // namespace
}  // namespace tandem::testing
