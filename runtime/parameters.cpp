#include "runtime/parameters.h"

namespace tandem {

void ParamLayout::add(const std::string& name, const Shape& shape, ParamKind kind,
                      int tp_split_dim, const Shape& global_shape, int tp_blocks) {
  require(index_.count(name) == 0, "duplicate parameter name ", name);
  ParamSpec spec{name,         shape,       total_,   shape_numel(shape),
                 kind,         tp_split_dim, global_shape.empty() ? shape : global_shape,
                 tp_blocks};
  index_[name] = specs_.size();
  specs_.push_back(spec);
  total_ += spec.numel;
}

const ParamSpec* ParamLayout::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &specs_[it->second];
}

const ParamSpec& ParamLayout::at(const std::string& name) const {
  const ParamSpec* spec = find(name);
  require(spec != nullptr, "model has no parameter named '", name, "'");
  return *spec;
}

}  // namespace tandem
