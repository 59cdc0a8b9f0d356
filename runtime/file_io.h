// Durable file writes: every file Tandem writes goes to a temporary name in the same directory,
// is fsynced, then renamed over the destination (and the directory fsynced), so a crash leaves
// either the old file or the new one, never half a file.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace tandem {

class AtomicFileWriter {
 public:
  // Creates a unique temporary file `.<name>.tmpXXXXXX` beside `path` (mode 0644); throws
  // tandem::Error naming the path (and whether its directory is missing or not writable).
  explicit AtomicFileWriter(const std::string& path);
  ~AtomicFileWriter();  // removes the temporary file unless commit() succeeded
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  void write(const void* data, size_t bytes);
  void write(std::string_view text) { write(text.data(), text.size()); }
  // fsync, rename over the destination, fsync the directory.
  void commit();

 private:
  std::string path_, tmp_path_;
  int fd_ = -1;
  bool committed_ = false;
};

void write_file_atomic(const std::string& path, std::string_view contents);
// Whole file as a string; throws tandem::Error naming the path.
std::string read_file(const std::string& path);
// fsyncs a directory so renames inside it are durable.
void fsync_directory(const std::string& dir);

}  // namespace tandem
