#include "serving/step_plan.h"

#include "runtime/error.h"

namespace tandem::serving {

namespace {
constexpr int32_t kMagic = 0x54535450;  // "TSTP"
constexpr int32_t kVersion = 2;         // 2: Kind::kKeepalive
constexpr size_t kHeader = 9;

void check(const StepPlan& p) {
  const size_t rows = p.tokens.size();
  require(p.positions.size() == rows && p.row_seq.size() == rows && p.slot_mapping.size() == rows,
          "step plan: tokens, positions, row_seq and slot_mapping must have one entry per row");
  require(p.num_seqs >= 0 && p.max_blocks_per_seq >= 0, "step plan: negative sequence counts");
  require(p.block_tables.size() ==
              static_cast<size_t>(p.num_seqs) * static_cast<size_t>(p.max_blocks_per_seq),
          "step plan: block_tables holds ", p.block_tables.size(), " entries, expected num_seqs ",
          p.num_seqs, " x max_blocks_per_seq ", p.max_blocks_per_seq);
  for (int32_t s : p.row_seq) {
    require(s >= 0 && s < p.num_seqs, "step plan: row_seq ", s, " outside [0, ", p.num_seqs, ")");
  }
  for (int32_t r : p.logit_rows) {
    require(r >= 0 && static_cast<size_t>(r) < rows, "step plan: logit row ", r, " outside [0, ",
            rows, ")");
  }
}
}  // namespace

StepPlan StepPlan::from_context(const AttentionContext& ctx, int64_t step) {
  require(ctx.num_rows >= 0 && ctx.num_seqs >= 0 && ctx.max_blocks_per_seq >= 0 &&
              ctx.num_logit_rows >= 0,
          "step plan: negative counts in the attention context");
  StepPlan p;
  p.step = step;
  p.num_seqs = ctx.num_seqs;
  p.max_blocks_per_seq = ctx.max_blocks_per_seq;
  const auto copy = [](const int32_t* src, size_t n) {
    return src == nullptr ? std::vector<int32_t>(n, 0) : std::vector<int32_t>(src, src + n);
  };
  p.tokens = copy(ctx.tokens, ctx.num_rows);
  p.positions = copy(ctx.positions, ctx.num_rows);
  p.row_seq = copy(ctx.row_seq, ctx.num_rows);
  p.slot_mapping = copy(ctx.slot_mapping, ctx.num_rows);
  p.block_tables = copy(ctx.block_tables, static_cast<size_t>(ctx.num_seqs) *
                                              static_cast<size_t>(ctx.max_blocks_per_seq));
  p.logit_rows = copy(ctx.logit_rows, ctx.num_logit_rows);
  check(p);
  return p;
}

StepPlan StepPlan::shutdown(int64_t step) {
  StepPlan p;
  p.kind = Kind::kShutdown;
  p.step = step;
  return p;
}

StepPlan StepPlan::keepalive(int64_t step) {
  StepPlan p;
  p.kind = Kind::kKeepalive;
  p.step = step;
  return p;
}

AttentionContext StepPlan::context() const {
  AttentionContext c;
  c.num_rows = static_cast<int>(tokens.size());
  c.tokens = tokens.data();
  c.positions = positions.data();
  c.row_seq = row_seq.data();
  c.slot_mapping = slot_mapping.data();
  c.num_seqs = num_seqs;
  c.max_blocks_per_seq = max_blocks_per_seq;
  c.block_tables = block_tables.data();
  c.num_logit_rows = static_cast<int>(logit_rows.size());
  c.logit_rows = logit_rows.data();
  return c;
}

std::vector<int32_t> StepPlan::encode() const {
  check(*this);
  std::vector<int32_t> out;
  out.reserve(kHeader + 4 * tokens.size() + block_tables.size() + logit_rows.size());
  const auto step_bits = static_cast<uint64_t>(step);
  out.insert(out.end(), {kMagic, kVersion, static_cast<int32_t>(kind),
                         static_cast<int32_t>(step_bits & 0xffffffffu),
                         static_cast<int32_t>(step_bits >> 32), static_cast<int32_t>(tokens.size()),
                         num_seqs, max_blocks_per_seq, static_cast<int32_t>(logit_rows.size())});
  for (const auto* v : {&tokens, &positions, &row_seq, &slot_mapping, &block_tables, &logit_rows}) {
    out.insert(out.end(), v->begin(), v->end());
  }
  return out;
}

StepPlan StepPlan::decode(const int32_t* data, size_t count) {
  require(count >= kHeader, "step plan: ", count, " words, shorter than the ", kHeader,
          "-word header");
  require(data[0] == kMagic, "step plan: bad magic ", data[0]);
  require(data[1] == kVersion, "step plan: version ", data[1], ", this build reads ", kVersion);
  StepPlan p;
  require(data[2] == static_cast<int32_t>(Kind::kStep) ||
              data[2] == static_cast<int32_t>(Kind::kShutdown) ||
              data[2] == static_cast<int32_t>(Kind::kKeepalive),
          "step plan: unknown kind ", data[2]);
  p.kind = static_cast<Kind>(data[2]);
  p.step = static_cast<int64_t>(static_cast<uint64_t>(static_cast<uint32_t>(data[3])) |
                                (static_cast<uint64_t>(static_cast<uint32_t>(data[4])) << 32));
  const int64_t rows = data[5], logits = data[8];
  p.num_seqs = data[6];
  p.max_blocks_per_seq = data[7];
  require(rows >= 0 && logits >= 0 && p.num_seqs >= 0 && p.max_blocks_per_seq >= 0,
          "step plan: negative counts in the header");
  const int64_t tables = static_cast<int64_t>(p.num_seqs) * p.max_blocks_per_seq;
  const int64_t expected = static_cast<int64_t>(kHeader) + 4 * rows + tables + logits;
  require(static_cast<int64_t>(count) == expected, "step plan: ", count,
          " words, the header announces ", expected);
  const int32_t* at = data + kHeader;
  const auto take = [&at](std::vector<int32_t>& v, int64_t n) {
    v.assign(at, at + n);
    at += n;
  };
  take(p.tokens, rows);
  take(p.positions, rows);
  take(p.row_seq, rows);
  take(p.slot_mapping, rows);
  take(p.block_tables, tables);
  take(p.logit_rows, logits);
  check(p);
  return p;
}

void broadcast_step_plan(Communicator& group, StepPlan& plan, int root) {
  std::vector<int32_t> buffer;
  int64_t length = 0;
  if (group.rank() == root) {
    buffer = plan.encode();
    length = static_cast<int64_t>(buffer.size());
  }
  group.broadcast(&length, 1, DType::kI64, root);
  require(length >= static_cast<int64_t>(kHeader), "step plan broadcast: length ", length);
  if (group.rank() != root) buffer.resize(static_cast<size_t>(length));
  group.broadcast(buffer.data(), buffer.size(), DType::kI32, root);
  if (group.rank() != root) plan = StepPlan::decode(buffer.data(), buffer.size());
}

}  // namespace tandem::serving
