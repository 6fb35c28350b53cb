// The C++ node, in the units its threads run: the request path (a client's INFER parsed once,
// queued, answered by a serving thread), the load path (verify, cache, load, check, swap) and
// the follow path (the hub's broadcasts and replies into the Follower, the loader's results
// back). `Node` composes them with its sockets and threads; each unit is reachable from the
// tests without them.
#pragma once

#include "batching.hpp"
#include "follower.hpp"
#include "frames.hpp"
#include "model.hpp"

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>
#include <zmq.hpp>

namespace zm {

void log(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

struct Args {
  std::string hub, bind, device = "cpu", cache = ".zmqmodels/cache", node_id, load_from = "file", list;
  std::vector<std::string> models, trust, labels;
  int threads = 1;
  size_t queue_max = 1024;
  double queue_timeout_s = 10.0;
  int64_t max_batch = 32;          // rows joined into one forward (1: no batching)
  double batch_delay_s = 0.0002;   // the longest a request waits for others to join it
  std::vector<std::string> unbatched;  // models whose requests are never joined
};

struct Counts {
  std::atomic<uint64_t> requests{0}, errors{0};
};

// What the node's units share: set up once, then read (slots and counts are thread-safe).
struct NodeState {
  explicit NodeState(Args a);
  Args args;
  Cache cache;
  Limits limits;
  Trust trust;
  c10::Device device = at::kCPU;
  std::string node_id;
  Config follow_config;
  std::map<std::string, Slot> slots;
  std::map<std::string, Counts> counts;
};

// -- the request path ----------------------------------------------------------------------
std::vector<zmq::message_t> error_reply(const std::string& code, const std::string& message, const std::string& model,
                                        const std::string& id);

struct Request {
  std::string client;        // the ROUTER identity to answer
  InferRequest header;       // parsed once, on the I/O thread
  msgpack::object_handle keep;  // owns header.inputs
  std::vector<zmq::message_t> tensors;
  double received = 0, expires = 0;  // monotonic s; expires: the client's own deadline
  std::string key;  // requests with equal keys may share a forward ("": never joined)
  int64_t rows = 1;  // its size along the batch dimension
};

using Replies = std::vector<std::pair<std::string, std::vector<zmq::message_t>>>;  // (client, frames)

class Requests {
 public:
  explicit Requests(NodeState& s) : s_(s) {}
  // A client's message after the REQ envelope ([INFER, header, tensors...]): the request, or
  // Error with the code to answer (bad_request, too_large).
  Request admit(std::string client, std::vector<zmq::message_t>& frames, double now) const;
  // Run `r` on the served version; the reply frames (empty: the client gave up, no reply).
  std::vector<zmq::message_t> infer(Request& r, const std::string& worker);
  // Run requests of one model, pin and key as one forward where the version was proven
  // batchable (each validated first; a failed forward is run again request by request).
  Replies infer_batch(std::vector<Request>& rs, const std::string& worker);
  // The most rows a request for `model` may share a forward with (1: none).
  int64_t cap(const std::string& model) const;
  // A client's [MODELS, header]: the MODELS_REPLY of what is served now (docs/protocol.md).
  std::vector<zmq::message_t> models(const std::vector<zmq::message_t>& frames) const;
  // A refusal of a request for `model`: counted, and its reply.
  std::vector<zmq::message_t> refuse(const Error& e, const std::string& model, const std::string& id);

 private:
  std::vector<c10::IValue> prepare(Request& r, const Lease& cur) const;
  std::vector<zmq::message_t> reply(Request& r, const Lease& cur, const c10::IValue& out, double queue_ms,
                                    double infer_ms, int64_t batch, const std::string& worker);
  NodeState& s_;
};

// Requests waiting for a serving thread: bounded; a thread takes the oldest one still wanted,
// with the queued requests that may share its forward (the Python broker's rules).
class WorkQueue {
 public:
  WorkQueue(size_t max, double timeout_s, double batch_delay_s = 0)
      : max_(max), timeout_s_(timeout_s), evidence_(batch_delay_s) {}
  bool push(Request r);  // false: full
  // The next request and those that may join it (`cap(model)` rows at most), waiting up to
  // `wait_s` for one and, while the evidence says more are coming, up to the batch delay for
  // more; those past the queue timeout go to `stale` (answered `unavailable` by the caller),
  // those past their client's deadline are dropped. Empty: nothing came.
  // `free_since`: when the calling serving thread finished its last forward.
  std::vector<Request> pop(double wait_s, std::vector<Request>& stale,
                           const std::function<int64_t(const std::string&)>& cap, double free_since);
  void done(const std::string& model, double seconds);  // a popped batch was answered after `seconds`
  bool idle() const;  // nothing queued, nothing in a serving thread's hands
  // forwards handed out, requests in them, and waits for more (the node logs them at exit)
  std::atomic<uint64_t> forwards{0}, requests{0}, holds{0};
  void stop();

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Request> q_;
  size_t max_, busy_ = 0;
  double timeout_s_;
  bool stopped_ = false;
  Evidence evidence_;
};

// -- the load path -------------------------------------------------------------------------
struct Result {  // what the loader tells the follow path
  enum Kind { Loaded, Rejected, Held, StoreFailed } kind;
  std::string name, label, reason;
  uint64_t seq = 0;
  double load_s = 0, check_s = 0, cache_write_s = 0;
  std::string format{};  // Loaded: the part of the release served
  Completed kept{};  // StoreFailed: the verified release, to be written again
};

struct Job {
  bool activate = false;  // a held staged release: load it from the cache
  Completed c;
  std::string name;
  uint64_t seq = 0;
};

class Loads {
 public:
  Loads(NodeState& s, std::function<void(Result)> post) : s_(s), post_(std::move(post)) {}
  void run(Job& j);  // deliver a completed release, or activate a held one
  void deliver(Job& j);
  void activate(Job& j);
  // Load, check and swap in; the old version is freed here once its last request ends.
  void load(const std::shared_ptr<Manifest>& m, const std::string& path, const uint8_t* data, Result& r);
  std::atomic<bool> stopping{false};

 private:
  NodeState& s_;
  std::function<void(Result)> post_;
};

// -- the follow path -----------------------------------------------------------------------
class Follows {
 public:
  Follows(NodeState& s, Follower& f) : s_(s), f_(f) {}
  void on_broadcast(std::vector<zmq::message_t>& msg, double now);  // [topic, kind, ...]
  void on_reply(std::vector<zmq::message_t>& msg, double now);      // [kind, ...] from the hub
  void on_results(std::deque<Result>& done, double now);            // from the loader
  // The follower's actions: sends are queued for the hub, the rest become the loader's jobs.
  void carry(Actions actions);
  // Completed, activated and rewritten releases the loader is to take.
  std::vector<Job> jobs();
  bool idle() const { return sends.empty() && completed_.empty() && unstaged_.empty() && rewrites_.empty(); }
  std::vector<Frames> sends;                  // to the hub (DEALER), in order
  std::map<std::string, Completed> unstored;  // verified releases whose cache write failed

 private:
  NodeState& s_;
  Follower& f_;
  std::vector<Completed> completed_;                        // assembled: verify, cache, load
  std::vector<std::pair<std::string, uint64_t>> unstaged_;  // held staged releases now activated
  std::vector<std::pair<std::string, uint64_t>> rewrites_;  // failed cache writes to try again
};

// -- the node ------------------------------------------------------------------------------
class Node {
 public:
  explicit Node(Args a);
  void restore();  // serve the cache at once, before the hub answers
  int run(const std::atomic<bool>& stop);

 private:
  void follow_loop();
  void load_loop();
  void serve_loop(const std::string& wid);
  void post(Result r);

  NodeState s_;
  Follower follower_;
  Requests requests_;
  Loads loads_;
  Follows follows_;
  WorkQueue work_;
  zmq::context_t ctx_;
  std::mutex jobs_mu_, results_mu_;
  std::condition_variable jobs_cv_;
  std::deque<Job> jobs_;
  std::deque<Result> results_;
  zmq::socket_t* push_ = nullptr;  // the loader thread's own (post() runs only there)
  std::atomic<bool> stopping_{false};
  bool wake_bound_ = false;
};

}  // namespace zm
