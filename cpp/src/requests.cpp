// The request path: a client's INFER is parsed once (on the I/O thread), queued, and run by a
// serving thread on the version its slot serves, with the Python node's codes and messages.
#include "node.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace zm {

namespace {

using gen::is_retryable;
bool server_error(const std::string& code) { return gen::is_server_error(code); }
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

std::vector<zmq::message_t> error_reply(const std::string& code, const std::string& message, const std::string& model,
                                        const std::string& id) {
  ErrorReply e;
  e.code = code, e.message = utf8_prefix(message, 4000), e.name = model, e.retryable = is_retryable(code), e.id = id;
  std::vector<zmq::message_t> out;
  out.emplace_back(std::string(kind_name(Kind::Error)));
  out.emplace_back(encode(e));
  return out;
}

Request Requests::admit(std::string client, std::vector<zmq::message_t>& frames, double now) const {
  Request r;
  r.client = std::move(client);
  std::string first(static_cast<const char*>(frames[0].data()), frames[0].size());
  if (first != kind_name(Kind::Infer) || frames.size() < 2) throw Error("bad_request", "expected [INFER, header, tensor frames...]");
  try {
    r.header = decode<InferRequest>(Kind::Infer, frames[1].data(), frames[1].size(), &r.keep);
  } catch (const Error& e) {
    throw Error("bad_request", std::string("bad INFER header: ") + e.what());
  }
  size_t size = 0;
  for (auto& f : frames) size += f.size();
  size_t n = frames.size() - 2;
  if (size > s_.limits.max_request_bytes || n > s_.limits.max_request_tensors)
    throw Error("too_large", "request of " + std::to_string(n) + " tensor(s), " + std::to_string(size) +
                                 " bytes; limits " + std::to_string(s_.limits.max_request_tensors) + " / " +
                                 std::to_string(s_.limits.max_request_bytes));
  for (size_t i = 2; i < frames.size(); ++i) r.tensors.emplace_back(std::move(frames[i]));
  // only a served model's requests are keyed (and so counted as evidence): a client's model
  // names must not grow the queue's per-model state
  if (s_.args.max_batch > 1 && s_.slots.count(r.header.model) &&
      std::find(s_.args.unbatched.begin(), s_.args.unbatched.end(), r.header.model) == s_.args.unbatched.end())
    r.key = batch_key(r.header.inputs, r.rows);
  r.received = now;
  r.expires = r.header.timeout_ms > 0 ? now + r.header.timeout_ms / 1000 : 1e300;
  return r;
}

std::vector<zmq::message_t> Requests::refuse(const Error& e, const std::string& model, const std::string& id) {
  std::string code = e.code == "bad_message" ? "bad_request" : e.code;
  if (auto it = s_.counts.find(model); it != s_.counts.end()) {
    it->second.requests++;
    if (server_error(code)) it->second.errors++;
  }
  return error_reply(code, e.what(), model, id);
}

std::vector<c10::IValue> Requests::prepare(Request& r, const Lease& cur) const {
  const InferRequest& h = r.header;
  if (!cur) throw Error("not_ready", "no version of '" + h.model + "' loaded yet");
  if (h.version && h.version != cur->manifest->seq)
    throw Error("version_unavailable", h.model + " seq " + std::to_string(h.version) + " is not served by this node");
  if (h.inputs.type == msgpack::type::NIL) throw Error("bad_request", "INFER header without inputs");
  std::vector<std::pair<const void*, size_t>> bufs;
  for (auto& t : r.tensors) bufs.emplace_back(t.data(), t.size());
  c10::IValue tree;
  try {
    tree = decode_tree(h.inputs, bufs);
  } catch (const Error& e) {
    throw Error("bad_request", e.what());
  }
  if (!tree.isTuple()) throw Error("bad_request", "inputs must be a tuple of positional arguments");
  std::vector<c10::IValue> args;
  for (auto& x : tree.toTupleRef().elements()) args.push_back(x.isTensor() ? c10::IValue(x.toTensor().to(cur->device)) : x);
  check_inputs(*cur->manifest, args);
  return args;
}

std::vector<zmq::message_t> Requests::reply(Request& r, const Lease& cur, const c10::IValue& out, double queue_ms,
                                            double infer_ms, int64_t batch, const std::string& worker) {
  const InferRequest& h = r.header;
  msgpack::sbuffer spec;
  msgpack::packer<msgpack::sbuffer> pk(spec);
  std::vector<at::Tensor> tensors;
  encode_tree(out, pk, tensors);
  auto outputs = msgpack::unpack(spec.data(), spec.size());
  InferReply reply;
  reply.id = h.id, reply.model = h.model, reply.label = cur->manifest->label, reply.seq = cur->manifest->seq;
  reply.worker = worker, reply.outputs = outputs.get();
  reply.queue_ms = queue_ms, reply.infer_ms = infer_ms, reply.batch = batch;
  std::vector<zmq::message_t> frames;
  frames.emplace_back(std::string(kind_name(Kind::Ok)));
  frames.emplace_back(encode(reply));
  for (auto& t : tensors) frames.emplace_back(t.data_ptr(), t.numel() * t.element_size());
  s_.counts.at(h.model).requests++;  // never inserts: the map is fixed at start
  return frames;
}

namespace {
int64_t rows_of(const std::vector<c10::IValue>& args) {
  return !args.empty() && args[0].isTensor() && args[0].toTensor().dim() ? args[0].toTensor().size(0) : 1;
}
double ms_since(int64_t t_ns) { return std::round((now_ns() - t_ns) / 1e3) / 1e3; }
}  // namespace

std::vector<zmq::message_t> Requests::infer(Request& r, const std::string& worker) {
  const InferRequest& h = r.header;
  double queue_ms = std::round((now_s() - r.received) * 1e6) / 1e3;
  if (now_s() > r.expires) return {};  // the client has given up (or sent it again)
  try {
    auto it = s_.slots.find(h.model);
    if (it == s_.slots.end()) throw Error("unknown_model", "this node does not serve '" + h.model + "'");
    Lease cur = it->second.begin();  // held until the reply is built
    auto args = prepare(r, cur);
    int64_t t1 = now_ns();
    c10::IValue out;
    try {
      out = cur->forward(args);
    } catch (const std::exception& e) {
      throw Error("model_error", model_error_line(e.what()));
    }
    return reply(r, cur, out, queue_ms, ms_since(t1), rows_of(args), worker);
  } catch (const Error& e) {
    return refuse(e, h.model, h.id);
  } catch (const std::exception& e) {
    return refuse(Error("internal", e.what()), h.model, h.id);
  }
}

Replies Requests::infer_batch(std::vector<Request>& rs, const std::string& worker) {
  Replies out;
  auto it = s_.slots.find(rs[0].header.model);  // one model: the queue joined them by key
  if (it == s_.slots.end()) {
    for (auto& r : rs) out.emplace_back(r.client, infer(r, worker));
    return out;
  }
  Lease cur = it->second.begin();  // one version for the whole batch
  double now = now_s();
  std::vector<std::pair<size_t, std::vector<c10::IValue>>> ready;
  std::vector<int64_t> rows;
  for (size_t i = 0; i < rs.size(); ++i) {
    if (now > rs[i].expires) continue;  // its client has given up: no answer
    try {
      ready.emplace_back(i, prepare(rs[i], cur));
      rows.push_back(rows_of(ready.back().second));
    } catch (const Error& e) {
      out.emplace_back(rs[i].client, refuse(e, rs[i].header.model, rs[i].header.id));
    } catch (const std::exception& e) {
      out.emplace_back(rs[i].client, refuse(Error("internal", e.what()), rs[i].header.model, rs[i].header.id));
    }
  }
  int64_t total = 0;
  for (auto n : rows) total += n;
  std::vector<c10::IValue> parts;
  double infer_ms = 0;
  if (ready.size() > 1 && cur && total <= cur->batch) {
    int64_t t1 = now_ns();
    try {
      std::vector<std::vector<c10::IValue>> args;
      for (auto& rd : ready) args.push_back(rd.second);
      auto whole = cur->forward(join_inputs(args));
      parts = split_outputs(whole, rows);
    } catch (const std::exception& e) {
      parts.clear();  // each request alone: one bad sample fails only its own
    }
    infer_ms = ms_since(t1);
  }
  for (size_t k = 0; k < ready.size(); ++k) {
    Request& r = rs[ready[k].first];
    double queue_ms = std::round((now - r.received) * 1e6) / 1e3;
    try {
      if (!parts.empty()) {
        out.emplace_back(r.client, reply(r, cur, parts[k], queue_ms, infer_ms, total, worker));
        continue;
      }
      int64_t t1 = now_ns();
      c10::IValue res;
      try {
        res = cur->forward(ready[k].second);
      } catch (const std::exception& e) {
        throw Error("model_error", model_error_line(e.what()));
      }
      out.emplace_back(r.client, reply(r, cur, res, queue_ms, ms_since(t1), rows[k], worker));
    } catch (const Error& e) {
      out.emplace_back(r.client, refuse(e, r.header.model, r.header.id));
    } catch (const std::exception& e) {
      out.emplace_back(r.client, refuse(Error("internal", e.what()), r.header.model, r.header.id));
    }
  }
  return out;
}

std::vector<zmq::message_t> Requests::models(const std::vector<zmq::message_t>& frames) const {
  if (frames.size() != 2) throw Error("bad_request", "expected [MODELS, header]");
  auto req = decode<ModelsRequest>(Kind::Models, frames[1].data(), frames[1].size());
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(buf);
  pk.pack_map(4);
  pk.pack(std::string("node")), pk.pack(s_.node_id);
  pk.pack(std::string("models")), pk.pack_array(static_cast<uint32_t>(s_.slots.size()));
  for (const auto& [name, slot] : s_.slots) {
    auto cur = slot.newest();  // every serving thread runs this one (or will, once it is swapped in)
    pk.pack_map(2);
    pk.pack(std::string("name")), pk.pack(name);
    pk.pack(std::string("versions")), pk.pack_array(cur ? 1 : 0);
    if (!cur) continue;
    const Manifest& m = *cur->manifest;
    pk.pack_map(6);
    pk.pack(std::string("seq")), pk.pack(m.seq);
    pk.pack(std::string("label")), pk.pack(m.label);
    pk.pack(std::string("workers")), pk.pack(s_.args.threads);
    pk.pack(std::string("batch")), pk.pack(std::max<int64_t>(1, std::min(s_.args.max_batch, cur->batch)));
    pk.pack(std::string("inputs"));
    if (m.inputs_spec) pk.pack(*m.inputs_spec); else pk.pack_array(0);
    pk.pack(std::string("outputs"));
    if (m.outputs) pk.pack(*m.outputs); else pk.pack_nil();
  }
  pk.pack(std::string("v")), pk.pack(V);
  pk.pack(std::string("id")), pk.pack(req.id);
  std::vector<zmq::message_t> out;
  out.emplace_back(std::string(kind_name(Kind::ModelsReply)));
  out.emplace_back(buf.data(), buf.size());
  return out;
}

int64_t Requests::cap(const std::string& model) const {
  auto it = s_.slots.find(model);
  if (it == s_.slots.end()) return 1;
  auto cur = it->second.newest();
  return cur ? std::min<int64_t>(s_.args.max_batch, cur->batch) : 1;
}

bool WorkQueue::push(Request r) {
  std::lock_guard<std::mutex> lk(mu_);
  if (q_.size() >= max_) return false;
  if (!r.key.empty()) evidence_.arrived(r.header.model, r.received);
  q_.push_back(std::move(r));
  cv_.notify_one();
  return true;
}

std::vector<Request> WorkQueue::pop(double wait_s, std::vector<Request>& stale,
                                    const std::function<int64_t(const std::string&)>& cap, double free_since) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait_for(lk, std::chrono::duration<double>(wait_s), [this] { return stopped_ || !q_.empty(); });
  while (true) {
    double now = now_s();
    for (auto it = q_.begin(); it != q_.end();) {  // the unwanted go first
      if (it->expires < now) {
        it = q_.erase(it);  // nobody waits for it any more: no answer
      } else if (now - it->received > timeout_s_) {
        stale.push_back(std::move(*it));
        it = q_.erase(it);
      } else {
        ++it;
      }
    }
    if (q_.empty()) return {};
    const Request& head = q_.front();
    std::vector<size_t> take = {0};
    int64_t rows = head.rows, limit = head.key.empty() ? 1 : cap(head.header.model);
    for (size_t i = 1; i < q_.size() && rows < limit; ++i) {
      const Request& r = q_[i];
      if (r.key == head.key && r.header.model == head.header.model && r.header.version == head.header.version &&
          rows + r.rows <= limit) {
        take.push_back(i);
        rows += r.rows;
      }
    }
    double until = evidence_.hold_until(head.header.model, take.size(), rows, limit, head.received, now,
                                        free_since);
    if (until > 0 && !stopped_) {  // more are coming: wait for them (a push wakes us)
      ++holds;
      cv_.wait_for(lk, std::chrono::duration<double>(until - now));
      continue;  // again: more came, or the delay is over and the batch goes as it is
    }
    std::vector<Request> out;
    for (size_t i : take) out.push_back(std::move(q_[i]));
    for (auto i = take.rbegin(); i != take.rend(); ++i) q_.erase(q_.begin() + static_cast<std::ptrdiff_t>(*i));
    if (limit > 1) evidence_.dispatched(out[0].header.model, out.size(), now);
    ++forwards;
    requests += out.size();
    ++busy_;
    return out;
  }
}

void WorkQueue::done(const std::string& model, double seconds) {
  std::lock_guard<std::mutex> lk(mu_);
  evidence_.served(model, seconds);
  --busy_;
}

bool WorkQueue::idle() const {
  std::lock_guard<std::mutex> lk(mu_);
  return q_.empty() && busy_ == 0;
}

void WorkQueue::stop() {
  std::lock_guard<std::mutex> lk(mu_);
  stopped_ = true;
  cv_.notify_all();
}

}  // namespace zm
