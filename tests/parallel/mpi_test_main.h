// Shared by the multi-process test binaries (run by ctest under mpirun): the world context.
#pragma once

#include <memory>

#include "parallel/parallel_context.h"

namespace tandem::testing {

// A context over the whole job with the given tp (created on first use per tp value).
ParallelContext& mpi_context(int tp = 1);

}  // namespace tandem::testing
