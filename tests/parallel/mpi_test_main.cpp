// main() of the multi-process test binaries: MPI is initialised before any test and every rank
// runs every test; a failure on any rank makes that rank (and so mpirun) exit non-zero.
#include <gtest/gtest.h>

#include <map>

#include "parallel/mpi_communicator.h"
#include "tests/parallel/mpi_test_main.h"

namespace tandem::testing {

ParallelContext& mpi_context(int tp) {
  static std::map<int, std::unique_ptr<ParallelContext>> contexts;
  auto& ctx = contexts[tp];
  if (!ctx) ctx = ParallelContext::create({.tp = tp, .timeout_s = 120, .device = Device::cpu()});
  return *ctx;
}

}  // namespace tandem::testing

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  tandem::mpi_initialize();
  // Only rank 0 prints the per-test lines; every rank prints failures.
  if (tandem::launched_under_mpi() && tandem::mpi_world_rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  return RUN_ALL_TESTS();
}
