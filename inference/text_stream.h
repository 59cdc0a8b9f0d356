// TextStream: turns a request's generated tokens into text deltas and catches stop strings.
//
// Tokens arrive as byte pieces (a byte-level BPE token is a byte string; a UTF-8 character may
// span tokens). push() returns the text that is safe to show now: it holds back a trailing
// incomplete UTF-8 character and the longest tail that could still grow into a stop string, so
// a streamed delta never contains part of a stop string. When a stop string completes (even
// across token boundaries), the text before it is released, the stop string and anything after
// it are dropped, and stopped() turns true. flush() releases what is held back at the end.
// Bytes are passed through unchanged (a NUL byte or invalid UTF-8 included).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace tandem {

class TextStream {
 public:
  explicit TextStream(std::vector<std::string> stop_strings = {});

  std::string push(std::string_view piece);
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;  // received, not yet released
  bool stopped_ = false;
};

}  // namespace tandem
