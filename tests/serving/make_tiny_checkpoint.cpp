// Writes a tiny GPT-2 checkpoint (random weights, a BPE vocabulary
// learned from a few sentences) into the directory given as argv[1]: what the serving tests serve.
// Deterministic; argv[2], when given, is the weights' seed (the same vocabulary and shapes, other
// weights: what the weight-update tests push).
#include <cstdio>
#include <string>
#include <vector>

#include "runtime/model_io.h"
#include "runtime/tokenizer.h"
#include "runtime/transformer.h"

int main(int argc, char** argv) {
  if (argc != 2 && argc != 3) {
    std::fprintf(stderr, "usage: make_tiny_checkpoint DIR [SEED]\n");
    return 2;
  }
  try {
    const std::vector<std::string> texts = {
        "The quick brown fox jumps over the lazy dog. ",
        "In the beginning God created the heaven and the earth. ",
        "And the earth was without form, and void; and darkness was upon the face of the deep. ",
        "Serving a model means answering many requests at once, quickly and fairly. "};
    const tandem::BpeTokenizer tokenizer = tandem::BpeTokenizer::train(texts, 320);
    tandem::ModelConfig c;
    c.family = tandem::ModelFamily::kGpt2;
    c.vocab_size = tokenizer.vocab_size();
    c.max_seq_len = 1024;  // long enough that a request can still be running when a test cancels it
    // Tests that act on a running request do not rely on the model being slow (it is not, on a
    // fast CPU): they give the server a floor on the time per step (TANDEM_TEST_MIN_STEP_MS).
    c.n_embd = 32;
    c.n_layer = 2;
    c.n_head = 4;
    c.n_kv_head = 4;
    c.ffn_hidden = 64;
    tandem::Transformer model(c);
    model.init_weights(argc == 3 ? std::stoull(argv[2]) : 1234);
    tandem::save_pretrained(model, argv[1]);
    tokenizer.save_dir(argv[1]);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_tiny_checkpoint: %s\n", e.what());
    return 1;
  }
}
