// Deterministic sums of per-rank scalars: every rank's value is gathered and the values are added
// in rank order, so the result is bit-identical on every rank and across runs (unlike an MPI
// reduction, whose order may depend on the algorithm MPI picks). For losses, gradient-norm
// partials and flags: a handful of scalars per step. Collective over a host communicator.
#pragma once

#include <vector>

#include "runtime/communicator.h"

namespace tandem {

// Every rank's value, in rank order.
std::vector<double> gather_in_rank_order(Communicator& group, double value);
double sum_in_rank_order(Communicator& group, double value);

}  // namespace tandem
