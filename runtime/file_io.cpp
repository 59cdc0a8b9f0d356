#include "runtime/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "runtime/error.h"

namespace tandem {

AtomicFileWriter::AtomicFileWriter(const std::string& path) : path_(path) {
  const std::filesystem::path target(path);
  const std::string dir = target.parent_path().empty() ? "." : target.parent_path().string();
  std::string pattern = dir + "/." + target.filename().string() + ".tmpXXXXXX";
  fd_ = ::mkostemp(pattern.data(), O_CLOEXEC);
  if (fd_ < 0) {
    const int error = errno;
    if (error == ENOENT || error == ENOTDIR) {
      throw Error(cat("cannot write ", path, ": directory '", dir,
                      "' does not exist or is not a directory"));
    }
    throw Error(cat("cannot write ", path, ": directory '", dir, "' is not writable (",
                    std::strerror(error), ")"));
  }
  tmp_path_ = pattern;
  ::fchmod(fd_, 0644);  // mkstemp creates 0600; our files are meant to be shared
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_path_.c_str());
}

void AtomicFileWriter::write(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd_, p, bytes);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(cat("cannot write ", path_, ": ", std::strerror(errno)));
    }
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

void AtomicFileWriter::commit() {
  if (::fsync(fd_) != 0) throw Error(cat("cannot fsync ", path_, ": ", std::strerror(errno)));
  const int closed = ::close(fd_);
  fd_ = -1;
  if (closed != 0) throw Error(cat("cannot close ", path_, ": ", std::strerror(errno)));
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    throw Error(cat("cannot rename ", tmp_path_, " to ", path_, ": ", std::strerror(errno)));
  }
  committed_ = true;
  const std::string dir = std::filesystem::path(path_).parent_path().string();
  fsync_directory(dir.empty() ? "." : dir);
}

void write_file_atomic(const std::string& path, std::string_view contents) {
  AtomicFileWriter w(path);
  w.write(contents);
  w.commit();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(cat("cannot open ", path, ": ", std::strerror(errno)));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void fsync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort: some filesystems refuse to open directories
  ::fsync(fd);
  ::close(fd);
}

}  // namespace tandem
