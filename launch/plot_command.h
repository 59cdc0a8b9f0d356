// `tandem plot RUN_DIR [--out FILE.png]`: a training run's metrics.jsonl drawn by gnuplot as one
// PNG of four panels (train loss raw and smoothed with the validation loss; eval accuracy, or a
// "no accuracy evaluations" panel; learning rate; tokens/s) plus the same figure as an SVG beside
// it (FILE.svg). Default: RUN_DIR/plot.png and RUN_DIR/plot.svg.
//
// gnuplot is found on PATH and run on a script with the data inline (datablocks); it renders into
// a private temporary directory, and each output is then written atomically (temporary name,
// fsync, rename), so a failure leaves the previous plot, if any, and no temporary files. Bad
// input (no metrics file, an empty or damaged one, an unwritable --out, no gnuplot) throws
// tandem::Error with one line naming the file.
#pragma once

#include <string>

namespace tandem {

struct PlotCommandOptions {
  std::string run_dir;  // a training run directory (or its metrics file)
  std::string out;      // FILE.png; empty: RUN_DIR/plot.png
};

// Writes the PNG and the SVG and prints their paths; returns the exit status (0).
int run_plot_command(const PlotCommandOptions& options);

}  // namespace tandem
