// read_metrics_history: the series of a metrics.jsonl by step; unknown keys and nulls are left
// out, damaged lines are errors naming FILE:LINE, an unfinished last line is skipped.
#include "training/metrics_history.h"

#include <gtest/gtest.h>

#include "runtime/file_io.h"
#include "tests/test_support.h"

namespace tandem {
namespace {

class MetricsHistoryTest : public ::testing::Test {
 protected:
  std::string write(const std::string& text) {
    const std::string path = scratch_ / "metrics.jsonl";
    write_file_atomic(path, text);
    return path;
  }
  testing::ScratchDir scratch_{"tandem_metrics_history"};
};

TEST_F(MetricsHistoryTest, ReadsEachSeriesByStepAndIgnoresUnknownKeys) {
  const MetricsHistory h = read_metrics_history(write(
      "{\"step\":0,\"memory\":{\"total\":10}}\n"
      "{\"step\":0,\"val_loss\":5.5}\n"
      "\n"
      "{\"step\":2,\"loss\":4.0,\"lr\":0.002,\"grad_norm\":1,\"tokens_per_s\":200,\"new\":\"x\"}\n"
      "{\"step\":1,\"loss\":4.5,\"lr\":0.001,\"grad_norm\":2,\"tokens_per_s\":100}\n"
      "{\"step\":2,\"val_loss\":null}\n"
      "{\"step\":2,\"acc\":0.25,\"acc_norm\":0.3}\n"));
  ASSERT_EQ(h.loss.size(), 2u);
  EXPECT_EQ(h.loss[0].step, 1);
  EXPECT_DOUBLE_EQ(h.loss[0].value, 4.5);
  EXPECT_EQ(h.loss[1].step, 2);
  EXPECT_EQ(h.lr.size(), 2u);
  EXPECT_EQ(h.grad_norm.size(), 2u);
  EXPECT_EQ(h.tokens_per_s.size(), 2u);
  ASSERT_EQ(h.val_loss.size(), 1u);  // the null (NaN) one is left out
  EXPECT_EQ(h.val_loss[0].step, 0);
  ASSERT_EQ(h.acc.size(), 1u);
  EXPECT_DOUBLE_EQ(h.acc_norm[0].value, 0.3);
  EXPECT_EQ(h.lines, 6);
  EXPECT_FALSE(h.skipped_unfinished_last_line);
}

TEST_F(MetricsHistoryTest, DamagedLinesNameFileAndLine) {
  const std::string ok = "{\"step\":1,\"loss\":4.5}\n";
  for (const auto& [text, needle] : std::vector<std::pair<std::string, std::string>>{
           {ok + "garbage\n", "metrics.jsonl:2: not a JSON line"},
           {ok + "[1,2]\n", "metrics.jsonl:2: not a JSON object"},
           {ok + "{\"loss\":1}\n", "metrics.jsonl:2: no \"step\""},
           {ok + "{\"step\":\"7\"}\n", "metrics.jsonl:2: \"step\" is not an integer"},
           {ok + "{\"step\":1.5}\n", "metrics.jsonl:2: \"step\" is not an integer"},
           {ok + ok + "{\"step\":3,\"lr\":[1]}\n", "metrics.jsonl:3: \"lr\" is not a number"},
           {"", "metrics.jsonl: empty file"},
           {"\n\n", "metrics.jsonl: empty file"},
       }) {
    const std::string path = write(text);
    EXPECT_NE(testing::error_message_of([&] { read_metrics_history(path); }).find(needle),
              std::string::npos)
        << text;
  }
  EXPECT_NE(testing::error_message_of([&] {
              read_metrics_history(scratch_ / "none.jsonl");
            }).find("none.jsonl"),
            std::string::npos);
}

TEST_F(MetricsHistoryTest, UnfinishedLastLineIsSkipped) {
  const MetricsHistory h =
      read_metrics_history(write("{\"step\":1,\"loss\":4.5}\n{\"step\":2,\"lo"));
  EXPECT_EQ(h.loss.size(), 1u);
  EXPECT_TRUE(h.skipped_unfinished_last_line);
  // A damaged line that ends with a newline is not unfinished.
  EXPECT_NE(testing::error_message_of([&] {
              read_metrics_history(write("{\"step\":1,\"loss\":4.5}\n{\"step\":2,\"lo\n"));
            }).find(":2: not a JSON line"),
            std::string::npos);
}

}  // namespace
}  // namespace tandem
