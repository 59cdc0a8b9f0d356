// End-to-end tests of weight updates (UpdateWeights, `tandem publish`): a real `tandem serve`
// on a loopback port, a second tiny checkpoint with other weights, gRPC clients in the test.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "runtime/file_io.h"
#include "runtime/model_io.h"
#include "runtime/tokenizer.h"
#include "runtime/transformer.h"
#include "serving/weight_update.h"
#include "tests/serving/serving_test_support.h"
#include "tests/test_support.h"

namespace tandem::testing {
namespace {

namespace pb = tandem::v1;

class ServingE2EWeightUpdates : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::make_unique<ScratchDir>("weight_update_e2e");
    old_dir_ = (dir_->path() / "model").string();
    new_dir_ = (dir_->path() / "model_b").string();
    const std::string maker = std::string(TANDEM_BINARY_DIR) + "/tests/make_tiny_checkpoint ";
    ASSERT_EQ(std::system((maker + old_dir_).c_str()), 0);
    ASSERT_EQ(std::system((maker + new_dir_ + " 99").c_str()), 0);
    update_token_ = log("update_token");
    std::ofstream(update_token_) << "update-s3cret\n";
    generate_token_ = log("generate_token");
    std::ofstream(generate_token_) << "generate-s3cret\n";
  }
  void TearDown() override { ::unsetenv("TANDEM_TEST_MIN_STEP_MS"); }
  std::string log(const std::string& name) const { return (dir_->path() / name).string(); }

  // `tandem serve` of the old checkpoint; slow: each engine step lasts >= 5 ms (the test hook),
  // so a long request is still running while the test acts.
  std::unique_ptr<ServerProcess> serve(std::vector<std::string> extra, const std::string& name,
                                       bool slow = false) {
    std::vector<std::string> args = {"serve", "--model",   old_dir_, "--metrics-port",
                                     "0",     "--threads", "1",      "--drain-grace",
                                     "10"};
    args.insert(args.end(), extra.begin(), extra.end());
    if (slow) ::setenv("TANDEM_TEST_MIN_STEP_MS", "5", 1);
    auto server = std::make_unique<ServerProcess>(args, log(name));
    ::unsetenv("TANDEM_TEST_MIN_STEP_MS");
    return server;
  }

  // `tandem publish`; returns its exit status, its output in *out.
  int publish(const std::string& address, const std::string& token_file, const std::string& name,
              std::string* out, const std::string& version = "v2") {
    ChildProcess p({tandem_binary(), "publish", "--model", new_dir_, "--to", address,
                    "--update-token-file", token_file, "--version", version, "--chunk-mb", "1"},
                   log(name));
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(100);
    while (p.running() && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    const int status = p.stop(SIGKILL, 1.0);
    *out = p.log();
    return status;
  }

  std::unique_ptr<ScratchDir> dir_;
  std::string old_dir_, new_dir_, update_token_, generate_token_;
};

pb::GenerateRequest greedy(const std::string& prompt, int max_tokens) {
  pb::GenerateRequest r;
  r.set_prompt(prompt);
  r.set_max_tokens(max_tokens);
  r.mutable_sampling()->set_temperature(0.0f);
  r.set_ignore_eos(true);
  return r;
}

struct Answer {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<std::string> versions;  // of every message
};

Answer generate(pb::Generation::Stub& stub, const pb::GenerateRequest& r,
                const std::string& token = "", std::atomic<bool>* started = nullptr) {
  grpc::ClientContext c;
  c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(100));
  if (!token.empty()) c.AddMetadata("authorization", "Bearer " + token);
  Answer out;
  auto reader = stub.GenerateStream(&c, r);
  pb::GenerateResponse m;
  while (reader->Read(&m)) {
    out.tokens.insert(out.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    out.text += m.text();
    out.versions.push_back(m.weights_version());
    if (started != nullptr) *started = true;
  }
  out.status = reader->Finish();
  return out;
}

std::string weights_version(pb::Generation::Stub& stub, const std::string& token = "") {
  grpc::ClientContext c;
  if (!token.empty()) c.AddMetadata("authorization", "Bearer " + token);
  pb::ModelInfoResponse info;
  const grpc::Status s = stub.ModelInfo(&c, pb::ModelInfoRequest(), &info);
  return s.ok() ? info.weights_version() : "(ModelInfo failed: " + s.error_message() + ")";
}

// The messages of a whole update of checkpoint `dir` (chunks of at most chunk_elements), the
// commit last.
std::vector<pb::UpdateWeightsRequest> update_messages(const std::string& dir,
                                                      const std::string& version,
                                                      int64_t chunk_elements = 1000) {
  ModelConfig config;
  const Tensor weights = load_full_weights(dir, config);
  const ParamLayout layout = Transformer::hf_layout(config);
  serving::WeightChecksum checksum;
  std::vector<pb::UpdateWeightsRequest> out;
  for (const ParamSpec& s : layout.specs()) {
    for (int64_t offset = 0; offset < s.numel; offset += chunk_elements) {
      const int64_t n = std::min(chunk_elements, s.numel - offset);
      pb::UpdateWeightsRequest m;
      pb::WeightChunk* c = m.mutable_chunk();
      c->set_name(s.name);
      for (int64_t d : s.shape) c->add_shape(d);
      c->set_dtype("F32");
      c->set_offset(offset);
      c->set_data(weights.data<float>() + s.offset + offset, n * sizeof(float));
      checksum.add(*c);
      out.push_back(std::move(m));
    }
  }
  pb::UpdateWeightsRequest last;
  last.mutable_commit()->set_xxh3_64(checksum.digest());
  last.mutable_commit()->set_version(version);
  out.push_back(std::move(last));
  return out;
}

// Sends `messages` (all, or the first `cancel_after` and then cancels the call).
grpc::Status push(pb::Generation::Stub& stub, const std::string& token,
                  const std::vector<pb::UpdateWeightsRequest>& messages, int cancel_after = -1) {
  grpc::ClientContext c;
  c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(100));
  if (!token.empty()) c.AddMetadata("authorization", "Bearer " + token);
  pb::UpdateWeightsResponse response;
  auto writer = stub.UpdateWeights(&c, &response);
  for (size_t i = 0; i < messages.size(); ++i) {
    if (cancel_after >= 0 && static_cast<int>(i) == cancel_after) {
      c.TryCancel();
      break;
    }
    if (!writer->Write(messages[i])) break;
  }
  if (cancel_after < 0) writer->WritesDone();
  return writer->Finish();
}

std::string series_version(const std::string& version) {
  return "tandem_weights_version_info{version=\"" + version + "\"}";
}

TEST_F(ServingE2EWeightUpdates,
       PublishedWeightsServeLikeTheCheckpointAndARunningStreamKeepsTheOld) {
  auto server = serve({"--update-token-file", update_token_}, "serve.log", /*slow=*/true);
  auto stub = connect(server->address());
  EXPECT_EQ(weights_version(*stub), "model");
  EXPECT_EQ(scrape(server->metrics_port(), series_version("model")), 1.0);
  EXPECT_EQ(scrape(server->metrics_port(), "tandem_update_staging_bytes"), 0.0);

  // The whole run of a long request on the old weights, for reference.
  const pb::GenerateRequest long_request = greedy("And the earth was without form", 600);
  const Answer old_run = generate(*stub, long_request);
  ASSERT_TRUE(old_run.status.ok()) << old_run.status.error_message();

  const std::vector<std::string> prompts = {"The quick brown fox", "In the beginning"};
  std::vector<std::vector<int32_t>> before;
  for (const std::string& prompt : prompts)
    before.push_back(generate(*stub, greedy(prompt, 20)).tokens);

  // The same request running while the new weights are published.
  std::atomic<bool> started{false};
  Answer during;
  std::thread runner([&] { during = generate(*stub, long_request, "", &started); });
  ASSERT_TRUE(eventually([&] { return started.load(); }, 60));
  std::string out;
  const int status = publish(server->address(), update_token_, "publish.log", &out);
  runner.join();
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("published v2 to " + server->address()), std::string::npos) << out;
  ASSERT_TRUE(during.status.ok()) << during.status.error_message();
  EXPECT_EQ(during.tokens, old_run.tokens) << "the running stream mixed weights";
  for (const std::string& v : during.versions) EXPECT_EQ(v, "model");

  EXPECT_EQ(weights_version(*stub), "v2");
  EXPECT_EQ(scrape(server->metrics_port(), series_version("v2")), 1.0);
  EXPECT_EQ(scrape(server->metrics_port(), "tandem_update_staging_bytes"), 0.0);

  // The replica's greedy outputs now equal `tandem generate` on the pushed checkpoint (byte for
  // byte: random weights make tokens that are not whole characters, which a response's text
  // shows as U+FFFD, so the tokens' bytes are compared).
  const BpeTokenizer tokenizer = BpeTokenizer::load_dir(new_dir_);
  bool changed = false;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string& prompt = prompts[i];
    const std::string generated = log("generate.out");
    const std::string command = tandem_binary() + " generate --model " + new_dir_ + " --prompt '" +
                                prompt + "' --max-new-tokens 20 --temperature 0 --ignore-eos > " +
                                generated + " 2> " + log("generate.err");
    ASSERT_EQ(std::system(command.c_str()), 0) << read_text(log("generate.err"));
    const Answer now = generate(*stub, greedy(prompt, 20));
    ASSERT_TRUE(now.status.ok()) << now.status.error_message();
    std::string bytes;
    for (int32_t t : now.tokens) bytes += tokenizer.decode_token(t);
    EXPECT_EQ(now.tokens.size(), 20u);
    EXPECT_EQ(prompt + bytes + "\n", read_text(generated)) << prompt;
    for (const std::string& v : now.versions) EXPECT_EQ(v, "v2");
    changed = changed || now.tokens != before[i];
  }
  EXPECT_TRUE(changed) << "the two checkpoints answer alike: the test shows nothing";
  EXPECT_EQ(server->process().stop(SIGTERM, 30), 0);
}

TEST_F(ServingE2EWeightUpdates, RefusedUpdatesLeaveTheOldWeightsServingAndFreeTheStaging) {
  auto server = serve({"--update-token-file", update_token_, "--auth-token-file", generate_token_,
                       "--update-timeout", "1"},
                      "serve.log", /*slow=*/true);
  auto stub = connect(server->address());
  const std::string gen = "generate-s3cret", upd = "update-s3cret";
  const Answer reference = generate(*stub, greedy("The quick brown fox", 12), gen);
  ASSERT_TRUE(reference.status.ok()) << reference.status.error_message();
  const auto good = update_messages(new_dir_, "v2");
  ASSERT_GT(good.size(), 10u);

  // After each refusal: the old weights serve, the staging memory is freed.
  auto expect_unchanged = [&](const std::string& what) {
    EXPECT_EQ(weights_version(*stub, gen), "model") << what;
    EXPECT_TRUE(eventually(
        [&] { return scrape(server->metrics_port(), "tandem_update_staging_bytes") == 0.0; }, 30))
        << what;
    EXPECT_EQ(scrape(server->metrics_port(), series_version("model")), 1.0) << what;
    const Answer a = generate(*stub, greedy("The quick brown fox", 12), gen);
    EXPECT_TRUE(a.status.ok()) << what << ": " << a.status.error_message();
    EXPECT_EQ(a.tokens, reference.tokens) << what;
  };
  auto expect_refused = [&](const grpc::Status& s, grpc::StatusCode code,
                            const std::string& in_message, const std::string& what) {
    EXPECT_EQ(s.error_code(), code) << what << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(in_message), std::string::npos)
        << what << ": " << s.error_message();
    expect_unchanged(what);
  };

  expect_refused(push(*stub, "", good), grpc::StatusCode::UNAUTHENTICATED, "update token",
                 "no token");
  expect_refused(push(*stub, "wrong", good), grpc::StatusCode::UNAUTHENTICATED, "update token",
                 "a wrong token");
  expect_refused(push(*stub, gen, good), grpc::StatusCode::UNAUTHENTICATED, "update token",
                 "the generation token");

  const std::string first = good[0].chunk().name();
  auto bad = good;
  bad[3].mutable_chunk()->set_name("transformer.h.0.no_such.weight");
  expect_refused(push(*stub, upd, bad), grpc::StatusCode::INVALID_ARGUMENT,
                 "transformer.h.0.no_such.weight", "a wrong name");
  bad = good;
  bad[0].mutable_chunk()->set_shape(0, bad[0].chunk().shape(0) + 1);
  expect_refused(push(*stub, upd, bad), grpc::StatusCode::INVALID_ARGUMENT, first, "a wrong shape");
  bad = good;
  bad[0].mutable_chunk()->set_dtype("BF16");
  expect_refused(push(*stub, upd, bad), grpc::StatusCode::INVALID_ARGUMENT, first, "a wrong dtype");
  bad = good;
  bad[0].mutable_chunk()->set_offset(1LL << 40);
  expect_refused(push(*stub, upd, bad), grpc::StatusCode::INVALID_ARGUMENT, "outside",
                 "a chunk beyond its tensor");
  bad = good;
  bad[1] = bad[0];  // the same elements twice
  expect_refused(push(*stub, upd, bad), grpc::StatusCode::INVALID_ARGUMENT, "overlap",
                 "a chunk sent twice");
  bad = good;
  bad.erase(bad.begin() + 2);
  expect_refused(push(*stub, upd, bad), grpc::StatusCode::INVALID_ARGUMENT, "incomplete",
                 "a missing chunk");
  bad = good;
  bad.pop_back();
  expect_refused(push(*stub, upd, bad), grpc::StatusCode::INVALID_ARGUMENT, "without a commit",
                 "no commit");
  bad = good;
  (*bad[5].mutable_chunk()->mutable_data())[0] ^= 0x40;  // corrupted on the way
  expect_refused(push(*stub, upd, bad), grpc::StatusCode::DATA_LOSS, "checksum", "a corrupt chunk");
  // A client that goes away mid-push.
  push(*stub, upd, good, static_cast<int>(good.size() / 2));
  expect_unchanged("a client that disconnects");

  // Requests running past --update-timeout: the update is refused, the stream goes on.
  std::atomic<bool> started{false};
  Answer during;
  const pb::GenerateRequest long_request = greedy("And the earth was without form", 1000);
  std::thread runner([&] { during = generate(*stub, long_request, gen, &started); });
  ASSERT_TRUE(eventually([&] { return started.load(); }, 60));
  expect_refused(push(*stub, upd, good), grpc::StatusCode::ABORTED, "--update-timeout",
                 "requests outliving the timeout");
  runner.join();
  EXPECT_TRUE(during.status.ok()) << during.status.error_message();
  EXPECT_EQ(during.tokens.size(), 1000u) << "the running request was cut";
  for (const std::string& v : during.versions) EXPECT_EQ(v, "model");

  // `tandem publish` with a wrong token: one line naming the refusal, exit 1.
  const std::string wrong_token = log("wrong_token");
  std::ofstream(wrong_token) << "nope\n";
  std::string out;
  EXPECT_EQ(publish(server->address(), wrong_token, "publish.log", &out), 1) << out;
  EXPECT_NE(out.find("UNAUTHENTICATED"), std::string::npos) << out;

  // And the good update still goes through afterwards.
  EXPECT_TRUE(push(*stub, upd, good).ok());
  EXPECT_EQ(weights_version(*stub, gen), "v2");
  EXPECT_EQ(scrape(server->metrics_port(), "tandem_update_staging_bytes"), 0.0);
  EXPECT_EQ(server->process().stop(SIGTERM, 30), 0);
}

TEST_F(ServingE2EWeightUpdates, AReplicaWithoutAnUpdateTokenRefusesUpdates) {
  auto server = serve({}, "serve.log");
  auto stub = connect(server->address());
  const grpc::Status s = push(*stub, "update-s3cret", update_messages(new_dir_, "v2"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
  EXPECT_NE(s.error_message().find("--update-token-file"), std::string::npos);
  EXPECT_EQ(weights_version(*stub), "model");
  std::string out;
  EXPECT_EQ(publish(server->address(), update_token_, "publish.log", &out), 1) << out;
  EXPECT_NE(out.find("PERMISSION_DENIED"), std::string::npos) << out;
  EXPECT_EQ(server->process().stop(SIGTERM, 30), 0);
}

TEST_F(ServingE2EWeightUpdates, TrainingPushesItsWeightsAfterEachEvaluationToARunningReplica) {
  // A small corpus and a run that checkpoints at step 2; a replica serves that checkpoint; the
  // run then goes on to step 6 with eval.publish_to pointing at the replica (and at a port where
  // nothing listens: that push fails, is logged, and training goes on).
  std::string corpus;
  for (int i = 0; i < 200; ++i) {
    corpus += "In the beginning God created the heaven and the earth. And God said, Let there be "
              "light: and there was light. " + std::to_string(i % 7) + "\n";
  }
  write_file_atomic(log("corpus.txt"), corpus);
  const std::string tandem = tandem_binary();
  ASSERT_EQ(std::system((tandem + " prepare --input " + log("corpus.txt") + " --out " +
                         log("data") + " --train-tokenizer --vocab-size 300 >/dev/null 2>&1")
                            .c_str()),
            0);
  const std::string run = log("run");
  const std::string train = tandem + " train --data.dir=" + log("data") + " --checkpoint.dir=" +
                            run +
                            " --data.batch_size=4 --data.seq_len=16 --model.max_seq_len=64"
                            " --model.n_layer=2 --model.n_embd=32 --model.n_head=4"
                            " --model.ffn_hidden=64 --train.threads=1 --eval.every=2"
                            " --eval.batches=1 --eval.sample_tokens=0 --checkpoint.every=2"
                            " --checkpoint.keep_last=10 ";
  ASSERT_EQ(std::system((train + "--train.steps=2 >" + log("train1.log") + " 2>&1").c_str()), 0)
      << read_text(log("train1.log"));
  const std::string step2 = run + "/checkpoints/step_00000002";
  auto server = std::make_unique<ServerProcess>(
      std::vector<std::string>{"serve", "--model", step2, "--metrics-port", "0", "--threads", "1",
                               "--update-token-file", update_token_},
      log("serve.log"));
  ASSERT_GT(server->port(), 0) << server->process().log();
  // A port nothing listens on: bind one, note it, close it.
  int unused_port = 0;
  {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    socklen_t n = sizeof(a);
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n);
    unused_port = ntohs(a.sin_port);
    ::close(fd);
  }
  ASSERT_EQ(std::system((train + "--train.steps=6 --checkpoint.resume=true --eval.publish_to=" +
                         server->address() + ",127.0.0.1:" + std::to_string(unused_port) +
                         " --eval.publish_token_file=" + update_token_ + " >" + log("train2.log") +
                         " 2>&1")
                            .c_str()),
            0)
      << read_text(log("train2.log"));
  const std::string train_log = read_text(log("train2.log"));
  EXPECT_NE(train_log.find("published run/step_00000006 to " + server->address()),
            std::string::npos)
      << train_log;
  EXPECT_NE(train_log.find("failed (training goes on)"), std::string::npos) << train_log;
  // The replica now serves the step-6 weights: its version, and tandem generate's greedy text on
  // the step-6 checkpoint.
  auto stub = connect(server->address());
  grpc::ClientContext ic;
  pb::ModelInfoResponse info;
  ASSERT_TRUE(stub->ModelInfo(&ic, pb::ModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.weights_version(), "run/step_00000006");
  const Answer served = generate(*stub, greedy("In the beginning", 12));
  ASSERT_TRUE(served.status.ok()) << served.status.error_message();
  const std::string expected_file = log("expected.txt");
  ASSERT_EQ(std::system((tandem + " generate --model " + run +
                         "/checkpoints/step_00000006 --prompt 'In the beginning' --temperature 0"
                         " --max-new-tokens 12 --ignore-eos --threads 1 >" + expected_file +
                         " 2>/dev/null")
                            .c_str()),
            0);
  EXPECT_EQ("In the beginning" + served.text + "\n", read_text(expected_file));
}

}  // namespace
}  // namespace tandem::testing
