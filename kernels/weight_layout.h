// How a weight matrix is stored, shared by the CPU and CUDA kernels. GPT-2's Conv1D keeps
// [in, out]; nn.Linear (Llama, LM heads) keeps [out, in]. Weights are used in the layout the
// checkpoint has, so loading is a copy.
#pragma once

namespace tandem {
enum class WeightLayout { kInOut, kOutIn };
}  // namespace tandem
