// Durable file writes: every file Tandem writes goes to a temporary name in the same directory,
// is fsynced, then renamed over the destination (and the directory fsynced), so a crash leaves
// either the old file or the new one, never half a file.
#pragma once

#include <cstddef>
#include <cstdint>
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

// The largest file read_file reads by default: configs, JSON state and tokenizer files are far
// smaller, and a mistaken path (a disk image, /dev/zero) must not eat the machine's memory.
inline constexpr size_t kDefaultMaxReadBytes = size_t{1} << 30;

// Whole file as a string. Only regular files are read (a FIFO, a device or a directory is an
// error, never a hang), and at most max_bytes of them. Throws tandem::Error naming the path.
std::string read_file(const std::string& path, size_t max_bytes = kDefaultMaxReadBytes);

// Opens `path` read-only, refusing anything but a regular file without blocking on a FIFO.
// Returns the descriptor (the caller closes it) and sets *bytes to the file size; throws
// tandem::Error naming `what` (e.g. "safetensors file") and the path.
int open_regular_file(const std::string& path, const char* what, uint64_t* bytes);

// fsyncs a directory so renames inside it are durable.
void fsync_directory(const std::string& dir);

// Renames `path` to the first free name among `path + suffix`, `path + suffix + ".2"`, ... and
// returns it. Never replaces anything (renameat2 RENAME_NOREPLACE), so every set-aside copy keeps
// a name of its own. Throws tandem::Error naming both paths when the rename fails.
std::string rename_to_free_name(const std::string& path, const std::string& suffix);

// An exclusive advisory lock (flock) on `<dir>/<name>`, held while the object lives and released
// by the kernel when the process dies, however it dies. The file holds the holder's pid.
class DirectoryLock {
 public:
  // Throws tandem::Error naming the directory and the holder's pid when another process (or
  // another DirectoryLock of this process) holds it.
  DirectoryLock(const std::string& dir, const std::string& name, const std::string& purpose);
  ~DirectoryLock();
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

// Appends whole lines to a file, stopping at the first failure: a failed or short write is
// rolled back (the file is truncated to its last complete line) and reported as tandem::Error
// naming the file and the reason (e.g. "No space left on device"), never ignored.
class LineAppender {
 public:
  explicit LineAppender(const std::string& path);
  ~LineAppender();
  LineAppender(const LineAppender&) = delete;
  LineAppender& operator=(const LineAppender&) = delete;
  void append_line(std::string_view line);  // adds the '\n'
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

}  // namespace tandem
