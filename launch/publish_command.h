// `tandem publish --model CKPT --to HOST:PORT --update-token-file F [--version V] [--chunk-mb 4]`:
// pushes a checkpoint's weights to a running one-process replica (the UpdateWeights RPC of
// proto/tandem.proto), which swaps them in between engine steps: requests running finish on the
// old weights, new ones run on the pushed ones. The checkpoint is read and checked as `tandem
// serve` reads it (BF16/F16 files are sent as F32), then sent tensor by tensor in chunks of at
// most --chunk-mb MiB per message (keep it within the replica's --max-message-mb), with the
// XXH3-64 checksum and the version in the last message. Prints the version and the time taken;
// a refusal (wrong token, a replica without updates, a timeout, a mismatched model) is one line
// naming the replica's status and reason, and exit 1.
#pragma once

#include <atomic>
#include <string>

namespace tandem {

struct PublishCommandOptions {
  std::string model_dir;          // checkpoint directory (config.json, model.safetensors)
  std::string to;                 // HOST:PORT of the replica
  std::string update_token_file;  // the replica's --update-token-file
  std::string version;            // empty: the checkpoint directory's name
  int chunk_mb = 4;
  double timeout_s = 600.0;  // the whole push, the replica's wait for running requests included
};

// Returns the exit status (0; 128 + signal when stopped); throws tandem::Error on failure.
int run_publish_command(const PublishCommandOptions& options, const std::atomic<int>& stop_signal);

}  // namespace tandem
