#include "training/metrics_history.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "runtime/error.h"
#include "runtime/file_io.h"

namespace tandem {

namespace {

// A known key's value at `where`: appended unless it is absent or null (NaN in the file).
void take(const nlohmann::json& line, const char* key, long step, const std::string& where,
          std::vector<MetricPoint>& series) {
  const auto it = line.find(key);
  if (it == line.end() || it->is_null()) return;
  require(it->is_number(), where, ": \"", key, "\" is not a number (", it->dump(), ")");
  const double value = it->get<double>();
  if (std::isfinite(value)) series.push_back({step, value});
}

void sort_by_step(std::vector<MetricPoint>& series) {
  std::stable_sort(series.begin(), series.end(),
                   [](const MetricPoint& a, const MetricPoint& b) { return a.step < b.step; });
}

}  // namespace

MetricsHistory read_metrics_history(const std::string& path) {
  const std::string text = read_file(path);
  MetricsHistory h;
  std::istringstream in(text);
  std::string raw;
  long number = 0;
  const bool ends_with_newline = !text.empty() && text.back() == '\n';
  while (std::getline(in, raw)) {
    ++number;
    if (raw.find_first_not_of(" \t\r") == std::string::npos) continue;
    ++h.lines;
    const std::string where = cat(path, ":", number);
    const bool last = in.peek() == EOF;
    nlohmann::json line;
    try {
      line = nlohmann::json::parse(raw);
    } catch (const nlohmann::json::parse_error&) {
      if (last && !ends_with_newline) {
        h.skipped_unfinished_last_line = true;
        break;
      }
      throw Error(cat(where, ": not a JSON line (a damaged metrics file?)"));
    }
    require(line.is_object(), where, ": not a JSON object");
    const auto step = line.find("step");
    require(step != line.end(), where, ": no \"step\"");
    require(step->is_number_integer(), where, ": \"step\" is not an integer (", step->dump(), ")");
    const long s = step->get<long>();
    take(line, "loss", s, where, h.loss);
    take(line, "lr", s, where, h.lr);
    take(line, "grad_norm", s, where, h.grad_norm);
    take(line, "tokens_per_s", s, where, h.tokens_per_s);
    take(line, "val_loss", s, where, h.val_loss);
    take(line, "acc", s, where, h.acc);
    take(line, "acc_norm", s, where, h.acc_norm);
  }
  require(h.lines > 0, path, ": empty file (the run has written no metrics yet)");
  for (auto* series :
       {&h.loss, &h.lr, &h.grad_norm, &h.tokens_per_s, &h.val_loss, &h.acc, &h.acc_norm}) {
    sort_by_step(*series);
  }
  return h;
}

}  // namespace tandem
