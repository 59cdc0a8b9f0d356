// Errors users can read.
//
// Every failure caused by user input (a config, a checkpoint, a token file, a request, a flag) is
// reported by throwing tandem::Error whose message names the thing at fault (file, key, tensor,
// request) and what was expected. CLI entry points print the message as one line and exit non-zero.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace tandem {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {
inline void append_all(std::ostringstream&) {}
template <typename T, typename... Rest>
void append_all(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  append_all(os, rest...);
}
}  // namespace detail

// Builds a message from streamable parts: throw Error(cat("file ", path, ": bad magic")).
template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream os;
  detail::append_all(os, parts...);
  return os.str();
}

// Throws tandem::Error with the concatenated parts when `condition` is false. For user input only
// (internal invariants use TANDEM_CHECK in check.h, which points at a bug instead).
template <typename... Parts>
void require(bool condition, const Parts&... parts) {
  if (!condition) throw Error(cat(parts...));
}

}  // namespace tandem
