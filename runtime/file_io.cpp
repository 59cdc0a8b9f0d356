#include "runtime/file_io.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
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

int open_regular_file(const std::string& path, const char* what, uint64_t* bytes) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw Error(cat("cannot open ", what, " ", path, ": ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int error = errno;
    ::close(fd);
    throw Error(cat("cannot stat ", what, " ", path, ": ", std::strerror(error)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    const char* kind = S_ISDIR(st.st_mode)    ? "a directory"
                       : S_ISFIFO(st.st_mode) ? "a FIFO"
                       : S_ISCHR(st.st_mode)  ? "a character device"
                       : S_ISBLK(st.st_mode)  ? "a block device"
                       : S_ISSOCK(st.st_mode) ? "a socket"
                                              : "not a regular file";
    throw Error(cat(what, " ", path, " is ", kind, ", expected a regular file"));
  }
  // Reads must block normally from here on (a regular file never blocks anyway).
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  if (bytes) *bytes = static_cast<uint64_t>(st.st_size);
  return fd;
}

std::string read_file(const std::string& path, size_t max_bytes) {
  uint64_t size = 0;
  const int fd = open_regular_file(path, "file", &size);
  if (size > max_bytes) {
    ::close(fd);
    throw Error(cat("file ", path, " is ", size, " bytes, more than the ", max_bytes,
                    " this reader accepts (is it the right file?)"));
  }
  std::string out(static_cast<size_t>(size), '\0');
  size_t done = 0;
  while (true) {
    if (done == out.size()) {
      // The file may have grown since fstat: read on, within the bound.
      if (out.size() >= max_bytes) {
        char probe;
        const ssize_t more = ::read(fd, &probe, 1);
        if (more > 0) {
          ::close(fd);
          throw Error(cat("file ", path, " grew past ", max_bytes, " bytes while being read"));
        }
        break;
      }
      out.resize(std::min(max_bytes, std::max<size_t>(out.size() * 2, 4096)));
    }
    const ssize_t n = ::read(fd, out.data() + done, out.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int error = errno;
      ::close(fd);
      throw Error(cat("cannot read ", path, ": ", std::strerror(error)));
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  out.resize(done);
  return out;
}

std::string rename_to_free_name(const std::string& path, const std::string& suffix) {
  for (int n = 1; n < 100000; ++n) {
    const std::string target = path + suffix + (n == 1 ? std::string() : "." + std::to_string(n));
    if (::renameat2(AT_FDCWD, path.c_str(), AT_FDCWD, target.c_str(), RENAME_NOREPLACE) == 0) {
      const std::string dir = std::filesystem::path(path).parent_path().string();
      fsync_directory(dir.empty() ? "." : dir);
      return target;
    }
    if (errno != EEXIST) {
      throw Error(cat("cannot rename ", path, " to ", target, ": ", std::strerror(errno)));
    }
  }
  throw Error(cat("cannot rename ", path, ": every name ", path, suffix, ".N is taken"));
}

DirectoryLock::DirectoryLock(const std::string& dir, const std::string& name,
                             const std::string& purpose)
    : path_((std::filesystem::path(dir) / name).string()) {
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(cat("cannot create lock file ", path_, ": ", std::strerror(errno)));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    std::string holder;
    char buf[64] = {};
    const ssize_t n = ::pread(fd_, buf, sizeof(buf) - 1, 0);
    if (n > 0) holder = std::string(buf, static_cast<size_t>(n));
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    ::close(fd_);
    fd_ = -1;
    if (error == EWOULDBLOCK) {
      throw Error(cat(dir, " is in use by another ", purpose,
                      holder.empty() ? std::string(" (pid unknown)") : cat(" (pid ", holder, ")"),
                      "; wait for it to finish or stop it first (lock file ", path_, ")"));
    }
    throw Error(cat("cannot lock ", path_, ": ", std::strerror(error)));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) == 0) {
    [[maybe_unused]] const ssize_t n = ::pwrite(fd_, pid.data(), pid.size(), 0);
  }
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock; the file stays (removing it would race)
}

LineAppender::LineAppender(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(cat("cannot open ", path, " for appending: ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd_);
    fd_ = -1;
    throw Error(cat(path, " is not a regular file"));
  }
  size_ = static_cast<uint64_t>(st.st_size);
}

LineAppender::~LineAppender() {
  if (fd_ >= 0) ::close(fd_);
}

void LineAppender::append_line(std::string_view line) {
  std::string text(line);
  text.push_back('\n');
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd_, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int error = n < 0 ? errno : ENOSPC;
      // Leave no torn line behind: cut the file back to its last complete line.
      if (done > 0 && ::ftruncate(fd_, static_cast<off_t>(size_)) != 0) {
        // Nothing more to do: the reader drops a torn last line anyway.
      }
      throw Error(cat("cannot write ", path_, ": ", std::strerror(error)));
    }
    done += static_cast<size_t>(n);
  }
  size_ += text.size();
}

void fsync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort: some filesystems refuse to open directories
  ::fsync(fd);
  ::close(fd);
}

}  // namespace tandem
