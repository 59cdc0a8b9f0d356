// Builds without the CUDA backend have no NCCL engine; these say so.
#include "parallel/nccl_communicator.h"

namespace tandem {

bool nccl_built() {
  return false;
}
std::string nccl_version() {
  return "";
}

}  // namespace tandem
