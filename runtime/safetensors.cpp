#include "runtime/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string_view>
#include <unordered_set>

#include "runtime/error.h"
#include "runtime/file_io.h"

namespace tandem {

namespace {
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the reference implementation's limit
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  uint64_t file_bytes = 0;
  const int fd = open_regular_file(path, "safetensors file", &file_bytes);
  if (file_bytes < 8) {
    ::close(fd);
    throw Error(
        cat(path, ": truncated safetensors file (", file_bytes, " bytes, no header length)"));
  }
  f.map_bytes_ = file_bytes;
  f.map_ = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f.map_ == MAP_FAILED) {
    f.map_ = nullptr;
    throw Error(cat(path, ": cannot map: ", std::strerror(errno)));
  }
  const auto* bytes = static_cast<const uint8_t*>(f.map_);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | bytes[i];
  require(header_bytes <= kMaxHeaderBytes, path, ": corrupt safetensors header length ",
          header_bytes);
  require(8 + header_bytes <= file_bytes, path, ": truncated safetensors file (header of ",
          header_bytes, " bytes but the file has ", file_bytes, ")");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_bytes);
  } catch (const nlohmann::json::exception& e) {
    throw Error(cat(path, ": corrupt safetensors header (invalid JSON: ", e.what(), ")"));
  }
  require(header.is_object(), path, ": corrupt safetensors header (not a JSON object)");
  f.data_section_ = bytes + 8 + header_bytes;
  const uint64_t data_bytes = file_bytes - 8 - header_bytes;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      require(it->is_object(), path, ": __metadata__ must be an object of strings");
      for (auto m = it->begin(); m != it->end(); ++m) {
        require(m->is_string(), path, ": __metadata__ value '", m.key(), "' is not a string");
        f.metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const nlohmann::json& e = *it;
    auto bad = [&](const std::string& what) {
      return Error(cat(path, ": tensor '", name, "': ", what));
    };
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") ||
        !e.contains("data_offsets")) {
      throw bad("entry needs dtype, shape and data_offsets");
    }
    if (!e["dtype"].is_string()) throw bad("dtype is not a string");
    const auto dtype = dtype_from_name(e["dtype"].get<std::string>());
    if (!dtype) throw bad(cat("unsupported dtype ", e["dtype"].get<std::string>()));
    SafetensorsEntry entry{name, *dtype, {}, 0, 0};
    if (!e["shape"].is_array()) throw bad("shape is not an array");
    uint64_t numel = 1;
    for (const auto& d : e["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        throw bad("shape has a negative or non-integer dimension");
      entry.shape.push_back(d.get<int64_t>());
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d.get<int64_t>()), &numel)) {
        throw bad("shape has too many elements");
      }
    }
    const auto& offs = e["data_offsets"];
    if (!offs.is_array() || offs.size() != 2 || !offs[0].is_number_unsigned() ||
        !offs[1].is_number_unsigned()) {
      throw bad("data_offsets must be two non-negative integers");
    }
    entry.begin = offs[0].get<uint64_t>();
    entry.end = offs[1].get<uint64_t>();
    if (entry.begin > entry.end) throw bad("data_offsets begin > end");
    if (entry.end > data_bytes) {
      throw bad(cat("data [", entry.begin, ", ", entry.end, ") extends past the end of the file (",
                    data_bytes, " data bytes): truncated file?"));
    }
    uint64_t needed = 0;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(*dtype)), &needed)) {
      throw bad("shape has too many elements");
    }
    if (entry.end - entry.begin != needed) {
      throw bad(cat("has ", entry.end - entry.begin, " bytes but shape ", shape_str(entry.shape),
                    " of ", dtype_name(*dtype), " needs ", needed));
    }
    f.entries_.push_back(std::move(entry));
  }
  std::vector<const SafetensorsEntry*> sorted;
  for (const auto& e : f.entries_) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < sorted.size(); ++i) {
    require(sorted[i]->begin >= sorted[i - 1]->end, path, ": tensors '", sorted[i - 1]->name,
            "' and '", sorted[i]->name, "' overlap");
  }
  return f;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept {
  *this = std::move(o);
}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    if (map_ != nullptr) ::munmap(map_, map_bytes_);
    path_ = std::move(o.path_);
    map_ = std::exchange(o.map_, nullptr);
    map_bytes_ = std::exchange(o.map_bytes_, 0);
    data_section_ = std::exchange(o.data_section_, nullptr);
    entries_ = std::move(o.entries_);
    metadata_ = std::move(o.metadata_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  for (const auto& e : entries_) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

const void* SafetensorsFile::data(const SafetensorsEntry& entry) const {
  return data_section_ + entry.begin;
}

void SafetensorsFile::read_f32(const std::string& name, const Shape& expected_shape,
                               float* out) const {
  const SafetensorsEntry* e = check_f32(name, expected_shape);
  convert_to_f32(data(*e), e->dtype, static_cast<size_t>(shape_numel(e->shape)), out);
}

const SafetensorsEntry* SafetensorsFile::check_f32(const std::string& name,
                                                   const Shape& expected_shape) const {
  const SafetensorsEntry* e = find(name);
  require(e != nullptr, path_, ": missing tensor '", name, "'");
  require(is_floating(e->dtype), path_, ": tensor '", name, "' has dtype ", dtype_name(e->dtype),
          ", expected a floating type (F32, BF16 or F16)");
  require(e->shape == expected_shape, path_, ": tensor '", name, "' has shape ",
          shape_str(e->shape), ", expected ", shape_str(expected_shape));
  return e;
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // The header is written as text, one entry after another: linear in the number of tensors
  // (an ordered JSON object would search its keys on every insert, quadratic in the count).
  std::string text = "{";
  auto quoted = [](const std::string& s) { return nlohmann::json(s).dump(); };
  if (!metadata.empty()) text += "\"__metadata__\":" + nlohmann::json(metadata).dump();
  std::unordered_set<std::string_view> names;
  names.reserve(tensors.size());
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    require(t.name != "__metadata__" && names.insert(t.name).second, path, ": tensor name '",
            t.name, "' is reserved or given twice");
    const uint64_t bytes = static_cast<uint64_t>(shape_numel(t.shape)) * dtype_size(t.dtype);
    if (text.size() > 1) text += ',';
    text += quoted(t.name);
    text += ":{\"dtype\":\"";
    text += dtype_name(t.dtype);
    text += "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (i) text += ',';
      text += std::to_string(t.shape[i]);
    }
    text += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + bytes) +
            "]}";
    offset += bytes;
  }
  text += '}';
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned
  uint8_t len[8];
  for (int i = 0; i < 8; ++i)
    len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
  AtomicFileWriter w(path);
  w.write(len, 8);
  w.write(text);
  for (const auto& t : tensors) {
    w.write(t.data, static_cast<size_t>(shape_numel(t.shape)) * dtype_size(t.dtype));
  }
  w.commit();
}

}  // namespace tandem
