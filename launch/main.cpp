// The tandem command line: one executable, one subcommand per job.
#include <cstdio>
#include <cstring>
#include <string>

#include "kernels/cpu/kernels.h"
#include "runtime/dtype.h"
#include "runtime/error.h"

namespace {

int print_usage() {
  std::printf(
      "usage: tandem <command> [options]\n\n"
      "commands:\n"
      "  info                  build and machine facts (CUDA, BLAS threading, threads)\n"
      "  help                  this text\n");
  return 0;
}

int run_info() {
  std::printf("tandem: CUDA backend %s, %d CUDA device(s)\n", tandem::cuda_built() ? "built" : "not built",
              tandem::cuda_device_count());
  std::printf("tandem: OpenBLAS parallel mode %d (2 = OpenMP), %d threads\n",
              tandem::cpu::blas_parallel_mode(), tandem::cpu::num_threads());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string command = argc > 1 ? argv[1] : "help";
    if (command == "help" || command == "--help" || command == "-h") return print_usage();
    if (command == "info") return run_info();
    std::fprintf(stderr, "tandem: unknown command '%s' (try 'tandem help')\n", command.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tandem: error: %s\n", e.what());
    return 1;
  }
}
