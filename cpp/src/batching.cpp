#include "batching.hpp"

#include <cmath>

namespace zm {

namespace {
constexpr double kEvidenceS = gen::EVIDENCE_S;  // batches older than this say nothing about the load now
constexpr double kGapWeight = gen::GAP_WEIGHT;  // EWMA weight of the newest inter-arrival gap
}  // namespace

std::string batch_key(const msgpack::object& spec, int64_t& rows) {
  rows = 1;
  try {
    Map tree(spec, "inputs");
    if (tree.str("t") != "tuple") return "";
    const msgpack::object* items = tree.get("items");
    if (!items || items->type != msgpack::type::ARRAY || items->via.array.size == 0) return "";
    std::string key;
    int64_t n = -1;
    for (uint32_t i = 0; i < items->via.array.size; ++i) {
      Map node(items->via.array.ptr[i], "input");
      if (node.str("t") != "tensor") return "";
      const msgpack::object* shape = node.get("shape");
      if (!shape || shape->type != msgpack::type::ARRAY || shape->via.array.size == 0) return "";
      key += node.str("dtype") + "[";
      for (uint32_t d = 0; d < shape->via.array.size; ++d) {
        const msgpack::object& x = shape->via.array.ptr[d];
        if (x.type != msgpack::type::POSITIVE_INTEGER) return "";
        int64_t v = static_cast<int64_t>(x.via.u64);
        if (d == 0) {
          if (v == 0 || (n >= 0 && v != n)) return "";
          n = v;
        } else {
          key += std::to_string(v) + ",";
        }
      }
      key += "]";
    }
    rows = n;
    return key;
  } catch (const std::exception&) {
    rows = 1;
    return "";
  }
}

void Evidence::arrived(const std::string& model, double now) {
  Seen& s = seen_[model];
  if (s.last_arrival >= 0) {
    double g = std::max(0.0, now - s.last_arrival);
    s.gap = s.gap < 0 ? g : (1 - kGapWeight) * s.gap + kGapWeight * g;
  }
  s.last_arrival = now;
}

void Evidence::dispatched(const std::string& model, size_t count, double now) {
  Seen& s = seen_[model];
  s.last_count = count, s.last_batch = now;
}

void Evidence::served(const std::string& model, double seconds) {
  Seen& s = seen_[model];
  s.service = s.service == 0 ? seconds : (1 - gen::SERVICE_WEIGHT) * s.service + gen::SERVICE_WEIGHT * seconds;
}

double Evidence::hold_until(const std::string& model, size_t count, int64_t rows, int64_t cap, double oldest,
                            double now, double free_since) const {
  if (delay_s_ <= 0 || rows >= cap) return -1;
  auto it = seen_.find(model);
  if (it == seen_.end() || now - it->second.last_batch > kEvidenceS) return -1;
  const Seen& s = it->second;
  double until = std::max(oldest + delay_s_, free_since + std::min(gen::FILL_FRACTION * s.service, gen::FILL_MAX_S));
  double left = until - now;
  if (left <= 0) return -1;
  if (count >= s.last_count || s.gap < 0 || s.gap > left) return -1;
  return until;
}

std::vector<c10::IValue> join_inputs(const std::vector<std::vector<c10::IValue>>& args) {
  std::vector<c10::IValue> out;
  for (size_t k = 0; k < args[0].size(); ++k) {
    std::vector<at::Tensor> col;
    for (const auto& a : args) col.push_back(a.at(k).toTensor());
    out.emplace_back(at::cat(col, 0));
  }
  return out;
}

namespace {
c10::IValue slice(const c10::IValue& v, int64_t start, int64_t n, int64_t total) {
  if (v.isTensor()) {
    const at::Tensor& t = v.toTensor();
    if (t.dim() == 0 || t.size(0) != total) throw Error("split", "an output does not follow the batch");
    return t.narrow(0, start, n);
  }
  if (v.isTuple()) {
    std::vector<c10::IValue> xs;
    for (const auto& x : v.toTupleRef().elements()) xs.push_back(slice(x, start, n, total));
    return c10::ivalue::Tuple::create(std::move(xs));
  }
  if (v.isList()) {
    auto src = v.toList();
    c10::impl::GenericList l(src.elementType());
    for (const auto& x : src) l.push_back(slice(x, start, n, total));
    return l;
  }
  if (v.isGenericDict()) {
    auto src = v.toGenericDict();
    c10::impl::GenericDict d(src.keyType(), src.valueType());
    for (const auto& e : src) d.insert(e.key(), slice(e.value(), start, n, total));
    return d;
  }
  throw Error("split", std::string("an output is a ") + v.tagKind() + ", not a tensor");
}
}  // namespace

std::vector<c10::IValue> split_outputs(const c10::IValue& out, const std::vector<int64_t>& rows) {
  int64_t total = 0, start = 0;
  for (auto r : rows) total += r;
  std::vector<c10::IValue> parts;
  for (auto r : rows) {
    parts.push_back(slice(out, start, r, total));
    start += r;
  }
  return parts;
}

}  // namespace zm
