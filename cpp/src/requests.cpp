// The request path: a client's INFER is parsed once (on the I/O thread), queued, and run by a
// serving thread on the version its slot serves, with the Python node's codes and messages.
#include "node.hpp"

#include <chrono>
#include <cmath>
#include <cstring>

namespace zm {

namespace {

bool is_retryable(const std::string& code) { return code == "not_ready" || code == "worker_lost" || code == "unavailable"; }
bool server_error(const std::string& code) { return code == "model_error" || code == "internal" || code == "worker_lost"; }
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

std::vector<zmq::message_t> Requests::infer(Request& r, const std::string& worker) {
  const InferRequest& h = r.header;
  double queue_ms = std::round((now_s() - r.received) * 1e6) / 1e3;
  if (now_s() > r.expires) return {};  // the client has given up (or sent it again)
  try {
    auto it = s_.slots.find(h.model);
    if (it == s_.slots.end()) throw Error("unknown_model", "this node does not serve '" + h.model + "'");
    Lease cur = it->second.begin();  // held until the reply is built
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
    int64_t t1 = now_ns();
    c10::IValue out;
    try {
      out = const_cast<torch::jit::Module&>(cur->module).forward(args);
    } catch (const std::exception& e) {
      throw Error("model_error", model_error_line(e.what()));
    }
    int64_t t2 = now_ns();
    msgpack::sbuffer spec;
    msgpack::packer<msgpack::sbuffer> pk(spec);
    std::vector<at::Tensor> tensors;
    encode_tree(out, pk, tensors);
    auto outputs = msgpack::unpack(spec.data(), spec.size());
    InferReply reply;
    reply.id = h.id, reply.model = h.model, reply.label = cur->manifest->label, reply.seq = cur->manifest->seq;
    reply.worker = worker, reply.outputs = outputs.get();
    reply.queue_ms = queue_ms, reply.infer_ms = std::round((t2 - t1) / 1e3) / 1e3;
    std::vector<zmq::message_t> frames;
    frames.emplace_back(std::string(kind_name(Kind::Ok)));
    frames.emplace_back(encode(reply));
    for (auto& t : tensors) frames.emplace_back(t.data_ptr(), t.numel() * t.element_size());
    s_.counts.at(h.model).requests++;  // never inserts: the map is fixed at start
    return frames;
  } catch (const Error& e) {
    return refuse(e, h.model, h.id);
  } catch (const std::exception& e) {
    return refuse(Error("internal", e.what()), h.model, h.id);
  }
}

bool WorkQueue::push(Request r) {
  std::lock_guard<std::mutex> lk(mu_);
  if (q_.size() >= max_) return false;
  q_.push_back(std::move(r));
  cv_.notify_one();
  return true;
}

std::optional<Request> WorkQueue::pop(double wait_s, std::vector<Request>& stale) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait_for(lk, std::chrono::duration<double>(wait_s), [this] { return stopped_ || !q_.empty(); });
  double now = now_s();
  while (!q_.empty()) {
    Request r = std::move(q_.front());
    q_.pop_front();
    if (r.expires < now) continue;  // nobody waits for it any more: no answer
    if (now - r.received > timeout_s_) {
      stale.push_back(std::move(r));
      continue;
    }
    ++busy_;
    return r;
  }
  return std::nullopt;
}

void WorkQueue::done() {
  std::lock_guard<std::mutex> lk(mu_);
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
