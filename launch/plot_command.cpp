#include "launch/plot_command.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/error.h"
#include "runtime/file_io.h"
#include "training/metrics_history.h"

extern char** environ;

namespace tandem {

namespace {

namespace fs = std::filesystem;

// ---- where things are -----------------------------------------------------------------------

struct PlotPaths {
  std::string metrics, png, svg;
};

PlotPaths resolve_paths(const PlotCommandOptions& o) {
  std::error_code ec;
  const fs::file_status run = fs::status(o.run_dir, ec);
  require(fs::exists(run), o.run_dir, ": no such directory (give a training run directory, e.g. ",
          "runs/demo)");
  PlotPaths p;
  fs::path dir = o.run_dir;
  if (fs::is_directory(run)) {
    p.metrics = (dir / "metrics.jsonl").string();
    require(fs::exists(fs::status(p.metrics, ec)), p.metrics, ": no such file (is ", o.run_dir,
            " a training run directory?)");
  } else {
    p.metrics = o.run_dir;  // the metrics file itself
    dir = dir.parent_path().empty() ? fs::path(".") : dir.parent_path();
  }
  fs::path png = o.out.empty() ? dir / "plot.png" : fs::path(o.out);
  require(png.extension() == ".png", "plot: --out ", png.string(),
          " must end in .png (the SVG is written beside it)");
  require(!fs::is_directory(fs::status(png, ec)), "plot: --out ", png.string(), " is a directory");
  p.png = png.string();
  p.svg = fs::path(png).replace_extension(".svg").string();
  return p;
}

// The first executable `gnuplot` on PATH.
std::string find_gnuplot() {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path != nullptr ? path : "");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (fs::path(dir.empty() ? "." : dir) / "gnuplot").string();
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        ::access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  throw Error("plot: gnuplot not found; install the gnuplot-nox package");
}

// A private directory under $TMPDIR (or /tmp), removed with everything in it.
class ScratchDirectory {
 public:
  ScratchDirectory() {
    std::string pattern = (fs::temp_directory_path() / "tandem-plot.XXXXXX").string();
    require(::mkdtemp(pattern.data()) != nullptr, "plot: cannot create a temporary directory ",
            pattern, ": ", std::strerror(errno));
    path_ = pattern;
  }
  ~ScratchDirectory() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  ScratchDirectory(const ScratchDirectory&) = delete;
  ScratchDirectory& operator=(const ScratchDirectory&) = delete;
  std::string file(const char* name) const { return (fs::path(path_) / name).string(); }

 private:
  std::string path_;
};

// ---- the gnuplot script -----------------------------------------------------------------------

// A gnuplot single-quoted string ('' is a quote; no escapes are interpreted). Control characters
// would end the command, so they become '?'.
std::string quoted(const std::string& text) {
  std::string out = "'";
  for (const char c : text) {
    if (c == '\'') {
      out += "''";
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += '?';
    } else {
      out += c;
    }
  }
  return out + "'";
}

std::string number(double v) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.9g", v);
  return buffer;
}

std::string short_number(double v) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.4f", v);
  return buffer;
}

// The steps an exponential moving average spans: about 1/25 of the run, within [5, 200]. A run
// of fewer than 10 steps gets no average (its raw curve says it all).
int smoothing_span(size_t points) {
  return static_cast<int>(std::clamp<size_t>(points / 25, 5, 200));
}
constexpr size_t kMinPointsToSmooth = 10;

// At most about `max_points` of a series, evenly spaced, the last one kept: a curve of a long run
// (a million steps) would otherwise make gnuplot slow and the SVG huge for no visible gain.
// Averages are computed on the whole series before this.
constexpr size_t kMaxPointsPerCurve = 5000;
std::vector<MetricPoint> thinned(const std::vector<MetricPoint>& series) {
  if (series.size() <= kMaxPointsPerCurve) return series;
  const size_t stride = (series.size() + kMaxPointsPerCurve - 1) / kMaxPointsPerCurve;
  std::vector<MetricPoint> out;
  for (size_t i = 0; i < series.size(); i += stride) out.push_back(series[i]);
  if ((series.size() - 1) % stride != 0) out.push_back(series.back());
  return out;
}

// An exponential moving average with alpha = 2 / (span + 1), started at the first value (no
// bias towards zero at the start).
std::vector<MetricPoint> moving_average(const std::vector<MetricPoint>& series, int span) {
  const double alpha = 2.0 / (span + 1.0);
  std::vector<MetricPoint> out;
  if (series.size() < kMinPointsToSmooth) return out;
  out.reserve(series.size());
  double average = 0.0;
  for (size_t i = 0; i < series.size(); ++i) {
    average = i == 0 ? series[i].value : average + alpha * (series[i].value - average);
    out.push_back({series[i].step, average});
  }
  return out;
}

void add_datablock(std::string& script, const char* name, const std::vector<MetricPoint>& series) {
  script += cat("$", name, " << EOD\n");
  for (const MetricPoint& p : thinned(series)) script += cat(p.step, " ", number(p.value), "\n");
  script += "EOD\n";
}

// One curve of a panel: `$name` drawn as lines (points when it holds a single point, which a line
// would not show).
struct Curve {
  const char* block;
  const std::vector<MetricPoint>* series;
  std::string title, style;
};

std::string plot_command(const std::vector<Curve>& curves) {
  std::string command = "plot ";
  bool first = true;
  for (const Curve& c : curves) {
    if (c.series->empty()) continue;
    const std::string style = c.series->size() == 1 ? "points pt 7 ps 1.2" : c.style;
    command += cat(first ? "" : ", \\\n     ", "$", c.block, " using 1:2 with ", style, " title ",
                   quoted(c.title));
    first = false;
  }
  return command + "\n";
}

bool any_points(const std::vector<Curve>& curves) {
  return std::any_of(curves.begin(), curves.end(),
                     [](const Curve& c) { return !c.series->empty(); });
}

// A panel: its settings, then either its curves or, with no data, the message in its middle.
std::string panel(const std::string& title, const std::string& settings,
                  const std::vector<Curve>& curves, const std::string& no_data_message) {
  std::string s = cat("set title ", quoted(title), "\n");
  if (!any_points(curves)) {
    return s +
           "unset border; unset xtics; unset ytics; unset key; unset grid\n"
           "unset xlabel; unset ylabel\n"
           "set label 1 " +
           quoted(no_data_message) +
           " at graph 0.5, graph 0.5 center font ',13'\n"
           "plot [0:1] [0:1] NaN notitle\n"
           "unset label 1; set border; set xtics; set ytics; set key; set grid\n"
           "set xlabel 'step'\n";
  }
  return s + "set autoscale y; set offsets 0, 0, 0, 0; unset format y; set key top right\n" +
         settings + plot_command(curves);
}

struct Figure {
  std::string datablocks, body;
};

Figure build_figure(const MetricsHistory& h, const std::string& run_name) {
  const int loss_span = smoothing_span(h.loss.size());
  const int tps_span = smoothing_span(h.tokens_per_s.size());
  const std::vector<MetricPoint> loss_ema = moving_average(h.loss, loss_span);
  const std::vector<MetricPoint> tps_ema = moving_average(h.tokens_per_s, tps_span);

  Figure f;
  add_datablock(f.datablocks, "loss", h.loss);
  add_datablock(f.datablocks, "loss_ema", loss_ema);
  add_datablock(f.datablocks, "val_loss", h.val_loss);
  add_datablock(f.datablocks, "acc", h.acc);
  add_datablock(f.datablocks, "acc_norm", h.acc_norm);
  add_datablock(f.datablocks, "lr", h.lr);
  add_datablock(f.datablocks, "tokens_per_s", h.tokens_per_s);
  add_datablock(f.datablocks, "tokens_per_s_ema", tps_ema);

  // The figure's title: what the run reached.
  std::string summary = run_name;
  if (!h.loss.empty()) {
    summary +=
        cat(": ", h.loss.size(), " steps, last train loss ", short_number(h.loss.back().value));
  }
  if (!h.val_loss.empty()) {
    const auto best = std::min_element(
        h.val_loss.begin(), h.val_loss.end(),
        [](const MetricPoint& a, const MetricPoint& b) { return a.value < b.value; });
    summary += cat(h.loss.empty() ? ": " : ", ", "best val loss ", short_number(best->value),
                   " (step ", best->step, ")");
  }

  // Every panel shares the step axis of the whole run.
  long first_step = 0, last_step = 0;
  bool any = false;
  for (const auto* series : {&h.loss, &h.val_loss, &h.acc, &h.acc_norm, &h.lr, &h.tokens_per_s}) {
    for (const MetricPoint& p : *series) {
      first_step = any ? std::min(first_step, p.step) : p.step;
      last_step = any ? std::max(last_step, p.step) : p.step;
      any = true;
    }
  }

  std::string& b = f.body;
  b += cat("set multiplot layout 2,2 title ", quoted(summary), " font ',13'\n");
  b += "set grid; set key top right opaque; set xlabel 'step'; set mxtics\n";
  if (any && first_step < last_step) {
    b += cat("set xrange [", first_step, ":", last_step, "]\n");
  } else {
    b += "set autoscale x\n";
  }
  b += panel(h.val_loss.empty() ? "loss (no validation evaluations)" : "loss",
             "set ylabel 'cross-entropy (nats/token)'\n",
             {{"loss", &h.loss, "train loss", "lines lc rgb '#9ecae1' lw 1"},
              {"loss_ema", &loss_ema, cat("train loss, EMA over ", loss_span, " steps"),
               "lines lc rgb '#08519c' lw 2"},
              {"val_loss", &h.val_loss, "validation loss",
               "linespoints lc rgb '#d62728' lw 2 pt 7 ps 0.8"}},
             "no training steps or evaluations");
  b += panel(
      "eval accuracy", "set ylabel 'accuracy'; set key bottom right\n",
      {{"acc", &h.acc, "acc", "linespoints lc rgb '#2ca02c' lw 2 pt 7 ps 0.8"},
       {"acc_norm", &h.acc_norm, "acc_norm", "linespoints lc rgb '#9467bd' lw 2 pt 5 ps 0.8"}},
      "no accuracy evaluations (acc, acc_norm) in this run");
  b += panel("learning rate",
             "set ylabel 'lr'; set format y '%.1e'\n"
             "set yrange [0:*]; set offsets 0, 0, graph 0.05, 0\n",
             {{"lr", &h.lr, "", "lines lc rgb '#ff7f0e' lw 2"}}, "no training steps");
  b += panel("throughput", "set ylabel 'tokens/s'; set key bottom right\n",
             {{"tokens_per_s", &h.tokens_per_s, "tokens/s", "lines lc rgb '#c7e9c0' lw 1"},
              {"tokens_per_s_ema", &tps_ema, cat("tokens/s, EMA over ", tps_span, " steps"),
               "lines lc rgb '#006d2c' lw 2"}},
             "no training steps");
  b += "unset multiplot\n";
  return f;
}

// ---- running gnuplot ------------------------------------------------------------------------

// The last non-empty line of a log, for an error message.
std::string last_line(const std::string& text) {
  std::istringstream in(text);
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r^") != std::string::npos) last = line;
  }
  return last;
}

// Runs `gnuplot --default-settings SCRIPT` (no ~/.gnuplot), stdin from /dev/null, stdout and
// stderr into LOG; throws with gnuplot's last message when it fails.
void run_gnuplot(const std::string& gnuplot, const std::string& script, const std::string& log) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  std::vector<std::string> args = {gnuplot, "--default-settings", script};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int spawn_error =
      ::posix_spawn(&pid, gnuplot.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  require(spawn_error == 0, "plot: cannot run ", gnuplot, ": ", std::strerror(spawn_error));
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    require(errno == EINTR, "plot: waiting for gnuplot: ", std::strerror(errno));
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return;
  std::string said;
  try {
    said = last_line(read_file(log, 1 << 20));
  } catch (const Error&) {
  }
  const std::string how = WIFEXITED(status) ? cat("exited with status ", WEXITSTATUS(status))
                                            : cat("was killed by signal ", WTERMSIG(status));
  throw Error(cat("plot: gnuplot (", gnuplot, ") ", how, said.empty() ? "" : ": ", said));
}

}  // namespace

int run_plot_command(const PlotCommandOptions& options) {
  const PlotPaths paths = resolve_paths(options);
  const MetricsHistory history = read_metrics_history(paths.metrics);
  // The outputs' temporary files first: an unwritable --out fails before any rendering.
  AtomicFileWriter png_out(paths.png);
  AtomicFileWriter svg_out(paths.svg);
  const std::string gnuplot = find_gnuplot();

  ScratchDirectory scratch;
  const std::string png = scratch.file("plot.png"), svg = scratch.file("plot.svg");
  const std::string run_name = fs::path(paths.metrics).parent_path().string();
  const Figure figure = build_figure(history, run_name.empty() ? "." : run_name);
  std::string script = figure.datablocks;
  script += cat("set terminal pngcairo noenhanced size 1600,1000 font 'sans,10'\n", "set output ",
                quoted(png), "\n", figure.body);
  script += cat("set terminal svg noenhanced size 1600,1000 dynamic font 'sans,10' ",
                "background '#ffffff'\n", "set output ", quoted(svg), "\n", figure.body,
                "unset output\n");
  const std::string script_path = scratch.file("plot.gp");
  write_file_atomic(script_path, script);
  run_gnuplot(gnuplot, script_path, scratch.file("gnuplot.log"));

  const std::string png_bytes = read_file(png), svg_bytes = read_file(svg);
  require(!png_bytes.empty() && !svg_bytes.empty(), "plot: gnuplot wrote an empty image");
  png_out.write(png_bytes);
  png_out.commit();
  svg_out.write(svg_bytes);
  svg_out.commit();
  if (history.skipped_unfinished_last_line) {
    std::fprintf(stderr, "tandem: plot: %s: left out its unfinished last line\n",
                 paths.metrics.c_str());
  }
  std::printf(
      "tandem: plotted %s (%zu training steps, %zu validation losses, %zu accuracy "
      "evaluations)\n",
      paths.metrics.c_str(), history.loss.size(), history.val_loss.size(),
      std::max(history.acc.size(), history.acc_norm.size()));
  std::printf("tandem: wrote %s\ntandem: wrote %s\n", paths.png.c_str(), paths.svg.c_str());
  return 0;
}

}  // namespace tandem
