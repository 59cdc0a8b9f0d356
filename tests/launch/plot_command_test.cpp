// `tandem plot RUN_DIR`: a real (tiny) training run's metrics drawn as a PNG and an SVG; bad input
// is one error line naming the problem, with nothing written and no temporary file left behind.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "runtime/file_io.h"
#include "tests/test_support.h"
#include "training/token_shard.h"

namespace tandem {
namespace {

namespace fs = std::filesystem;

struct Result {
  int status = -1;
  std::string out, err;
};

// Runs `[env] tandem ARGS`, stdout and stderr into files named after the running test.
Result run(const std::string& args, const std::string& env = "") {
  const std::string err_file = ::testing::TempDir() + "/tandem_plot_stderr_" +
                               ::testing::UnitTest::GetInstance()->current_test_info()->name() +
                               "_" + std::to_string(::getpid()) + ".txt";
  const std::string out_file = err_file + ".out";
  const std::string cmd = env + " " + std::string(TANDEM_BINARY_DIR) + "/tandem " + args + " >" +
                          out_file + " 2>" + err_file;
  const int raw = std::system(cmd.c_str());
  Result r;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  std::ifstream err(err_file), out(out_file);
  r.err.assign(std::istreambuf_iterator<char>(err), {});
  r.out.assign(std::istreambuf_iterator<char>(out), {});
  fs::remove(err_file);
  fs::remove(out_file);
  return r;
}

void expect_one_line_error(const Result& r, const std::string& needle) {
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(r.err.rfind("tandem: error: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos)
      << "stderr '" << r.err << "' should name '" << needle << "'";
}

bool gnuplot_installed() {
  return std::system("command -v gnuplot >/dev/null 2>&1") == 0;
}

std::string read_text(const fs::path& path) {
  return read_file(path.string());
}

// Files whose names say they are temporary (ours: ".NAME.tmpXXXXXX"), in `dir`.
std::vector<std::string> temporary_files(const fs::path& dir) {
  std::vector<std::string> found;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.find(".tmp") != std::string::npos) found.push_back(name);
  }
  return found;
}

// Tests that render call this first (bad input is reported before gnuplot is looked for).
#define SKIP_WITHOUT_GNUPLOT()                                                                  \
  do {                                                                                          \
    if (!gnuplot_installed())                                                                   \
      GTEST_SKIP() << "gnuplot is not installed (launch/install-deps.sh installs gnuplot-nox)"; \
  } while (0)

class PlotTest : public ::testing::Test {
 protected:
  // A run directory trained by `tandem train` on a 31-token corpus: `steps` steps, the
  // validation loss evaluated after every step.
  fs::path train_run(int steps) {
    const fs::path data = dir_ / "data";
    fs::create_directories(data);
    std::vector<int32_t> tokens(4000);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i % 31);
    write_token_shard((data / "train_000000.bin").string(), tokens, 32);
    write_token_shard((data / "val_000000.bin").string(), tokens, 32);
    write_file_atomic((data / "prepare.json").string(), testing::prepare_summary_json(32, 31));
    const fs::path run_dir = dir_ / "run";
    const Result r =
        run("train --data.dir=" + data.string() + " --checkpoint.dir=" + run_dir.string() +
                " --train.steps=" + std::to_string(steps) +
                " --eval.every=1 --eval.batches=1 --data.batch_size=2 --data.seq_len=8"
                " --model.max_seq_len=8 --model.n_layer=1 --model.n_embd=16 --model.n_head=2"
                " --model.ffn_hidden=32 --eval.sample_tokens=0 --train.threads=1",
            "OMP_NUM_THREADS=1");
    EXPECT_EQ(r.status, 0) << r.err;
    return run_dir;
  }

  std::string metrics_with(const std::string& lines) {
    const fs::path run_dir = dir_ / "crafted";
    fs::create_directories(run_dir);
    write_file_atomic((run_dir / "metrics.jsonl").string(), lines);
    return run_dir.string();
  }

  testing::ScratchDir scratch_{"tandem_plot"};
  const fs::path dir_ = scratch_.path();
};

void expect_png_and_svg(const fs::path& png, const fs::path& svg) {
  ASSERT_TRUE(fs::exists(png)) << png;
  ASSERT_TRUE(fs::exists(svg)) << svg;
  const std::string png_bytes = read_text(png), svg_text = read_text(svg);
  EXPECT_EQ(png_bytes.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_GT(png_bytes.size(), 5000u);
  EXPECT_TRUE(svg_text.starts_with("<?xml") || svg_text.starts_with("<svg"))
      << svg_text.substr(0, 80);
  EXPECT_GT(svg_text.size(), 5000u);
  EXPECT_NE(svg_text.find("</svg>"), std::string::npos);
}

TEST_F(PlotTest, TrainedRunWithEvaluationsEveryStepPlotsPngAndSvg) {
  SKIP_WITHOUT_GNUPLOT();
  const fs::path run_dir = train_run(6);
  const std::string metrics = read_text(run_dir / "metrics.jsonl");
  ASSERT_GE(std::count(metrics.begin(), metrics.end(), '\n'), 13) << metrics;  // 6 steps, 7 evals
  const Result r = run("plot " + run_dir.string());
  ASSERT_EQ(r.status, 0) << r.err;
  expect_png_and_svg(run_dir / "plot.png", run_dir / "plot.svg");
  EXPECT_NE(r.out.find((run_dir / "plot.png").string()), std::string::npos) << r.out;
  EXPECT_NE(r.out.find((run_dir / "plot.svg").string()), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("6 training steps, 7 validation losses"), std::string::npos) << r.out;
  EXPECT_TRUE(temporary_files(run_dir).empty());

  // --out elsewhere; a second plot replaces the first.
  const fs::path out = dir_ / "figures" / "loss.png";
  fs::create_directories(out.parent_path());
  for (int i = 0; i < 2; ++i) {
    const Result again = run("plot " + run_dir.string() + " --out " + out.string());
    ASSERT_EQ(again.status, 0) << again.err;
  }
  expect_png_and_svg(out, dir_ / "figures" / "loss.svg");
  EXPECT_TRUE(temporary_files(out.parent_path()).empty());
}

TEST_F(PlotTest, RunWithoutEvaluationsStillPlots) {
  SKIP_WITHOUT_GNUPLOT();
  const fs::path run_dir = train_run(4);
  // The same run with every evaluation line taken out (as a run stopped before its first one).
  std::istringstream in(read_text(run_dir / "metrics.jsonl"));
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.find("val_loss") == std::string::npos) kept += line + "\n";
  }
  const std::string crafted = metrics_with(kept);
  const Result r = run("plot " + crafted);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("4 training steps, 0 validation losses"), std::string::npos) << r.out;
  expect_png_and_svg(fs::path(crafted) / "plot.png", fs::path(crafted) / "plot.svg");
}

TEST_F(PlotTest, AccuracyAndUnknownKeysPlot) {
  SKIP_WITHOUT_GNUPLOT();
  std::string lines = R"({"step":0,"memory":{"total":1}})"
                      "\n";
  for (int step = 1; step <= 40; ++step) {
    lines += "{\"step\":" + std::to_string(step) +
             ",\"loss\":" + std::to_string(5.0 - step * 0.05) +
             ",\"lr\":0.001,\"grad_norm\":1.5,\"tokens_per_s\":" + std::to_string(1000 + step) +
             ",\"mfu\":0.1,\"step_ms\":12,\"future_key\":[1,2]}\n";
    if (step % 10 == 0) {
      lines += "{\"step\":" + std::to_string(step) +
               ",\"val_loss\":" + std::to_string(5.1 - step * 0.04) + "}\n";
      lines +=
          "{\"step\":" + std::to_string(step) + ",\"acc\":" + std::to_string(0.2 + step * 0.005) +
          ",\"acc_norm\":" + std::to_string(0.25 + step * 0.005) + ",\"task\":\"hellaswag\"}\n";
    }
  }
  lines += R"({"step":40,"val_loss":null})"
           "\n";  // a NaN, as nlohmann::json writes it
  const std::string run_dir = metrics_with(lines);
  const Result r = run("plot " + run_dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("40 training steps, 4 validation losses, 4 accuracy evaluations"),
            std::string::npos)
      << r.out;
  expect_png_and_svg(fs::path(run_dir) / "plot.png", fs::path(run_dir) / "plot.svg");
}

TEST_F(PlotTest, MissingMetricsFileIsNamed) {
  fs::create_directories(dir_ / "empty_run");
  const std::string run_dir = (dir_ / "empty_run").string();
  expect_one_line_error(run("plot " + run_dir), run_dir + "/metrics.jsonl: no such file (is " +
                                                    run_dir + " a training run directory?)");
  expect_one_line_error(run("plot " + (dir_ / "nowhere").string()), "nowhere: no such directory");
  EXPECT_FALSE(fs::exists(dir_ / "empty_run" / "plot.png"));
}

TEST_F(PlotTest, EmptyMetricsFileIsAnError) {
  const std::string run_dir = metrics_with("");
  expect_one_line_error(run("plot " + run_dir), "metrics.jsonl: empty file");
  EXPECT_FALSE(fs::exists(fs::path(run_dir) / "plot.png"));
}

TEST_F(PlotTest, DamagedLineNamesFileAndLine) {
  const std::string good = R"({"step":1,"loss":4.5,"lr":0.001,"tokens_per_s":100})"
                           "\n";
  std::string run_dir = metrics_with(good + "this is not json\n" + good);
  expect_one_line_error(run("plot " + run_dir), "metrics.jsonl:2: not a JSON line");
  run_dir = metrics_with(good + good +
                         R"({"step":"three","loss":4.0})"
                         "\n");
  expect_one_line_error(run("plot " + run_dir), "metrics.jsonl:3: \"step\" is not an integer");
  run_dir = metrics_with(good + R"({"step":2,"loss":"low"})"
                                "\n");
  expect_one_line_error(run("plot " + run_dir), "metrics.jsonl:2: \"loss\" is not a number");
  EXPECT_FALSE(fs::exists(fs::path(run_dir) / "plot.png"));
  EXPECT_TRUE(temporary_files(run_dir).empty());
}

TEST_F(PlotTest, UnfinishedLastLineIsLeftOut) {
  SKIP_WITHOUT_GNUPLOT();
  const std::string good = R"({"step":1,"loss":4.5,"lr":0.001,"tokens_per_s":100})"
                           "\n";
  const std::string run_dir = metrics_with(good + R"({"step":2,"loss":4.)");  // being written
  const Result r = run("plot " + run_dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("unfinished last line"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(fs::path(run_dir) / "plot.png"));
}

TEST_F(PlotTest, UnwritableOutIsNamed) {
  const std::string good = R"({"step":1,"loss":4.5,"lr":0.001,"tokens_per_s":100})"
                           "\n";
  const std::string run_dir = metrics_with(good);
  const std::string out = (dir_ / "no_such_dir" / "plot.png").string();
  expect_one_line_error(run("plot " + run_dir + " --out " + out), out);
  write_file_atomic((dir_ / "a_file").string(), "x");
  const std::string under_file = (dir_ / "a_file" / "plot.png").string();
  expect_one_line_error(run("plot " + run_dir + " --out " + under_file), under_file);
  fs::create_directories(dir_ / "dir.png");
  expect_one_line_error(run("plot " + run_dir + " --out " + (dir_ / "dir.png").string()),
                        "is a directory");
  const Result svg = run("plot " + run_dir + " --out " + (dir_ / "x.svg").string());
  EXPECT_EQ(svg.status, 2) << svg.err;
  EXPECT_NE(svg.err.find("must end in .png"), std::string::npos) << svg.err;
}

TEST_F(PlotTest, MissingGnuplotIsNamed) {
  const std::string good = R"({"step":1,"loss":4.5,"lr":0.001,"tokens_per_s":100})"
                           "\n";
  const std::string run_dir = metrics_with(good);
  expect_one_line_error(run("plot " + run_dir, "PATH=/nonexistent"),
                        "gnuplot not found; install the gnuplot-nox package");
  EXPECT_FALSE(fs::exists(fs::path(run_dir) / "plot.png"));
  EXPECT_TRUE(temporary_files(run_dir).empty());
}

TEST_F(PlotTest, UsageErrorsAndHelp) {
  const Result help = run("plot --help");
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.out.find("RUN_DIR"), std::string::npos) << help.out;
  for (const auto& [args, needle] : std::vector<std::pair<std::string, std::string>>{
           {"plot", "give the run directory"},
           {"plot a b", "unexpected argument 'b'"},
           {"plot a --smooth 3", "unknown flag '--smooth'"},
       }) {
    const Result r = run(args);
    EXPECT_EQ(r.status, 2) << args;
    EXPECT_EQ(r.err.rfind("tandem: usage error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace tandem
