// The node: its sockets and threads around the request, load and follow paths (node.hpp).
#include "node.hpp"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <torch/cuda.h>

#include <cstdarg>
#include <cstdio>
#include <thread>
#include <zmq_addon.hpp>

namespace zm {

namespace fs = std::filesystem;

void log(const char* fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::string line;  // one line of printable ASCII: peers' bytes are escaped, never echoed raw
  for (const char* p = buf; *p; ++p) {
    auto c = static_cast<unsigned char>(*p);
    if (c >= 0x20 && c < 0x7f) {
      line += static_cast<char>(c);
    } else {
      char esc[5];
      std::snprintf(esc, sizeof esc, "\\x%02x", c);
      line += esc;
    }
  }
  std::fprintf(stderr, "zmqmodels-node: %s\n", line.c_str());
}

namespace {

std::string str(const zmq::message_t& m) { return std::string(static_cast<const char*>(m.data()), m.size()); }

void lower_priority() {  // this thread only (Linux: nice applies per thread id)
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
}

template <class F>
void guarded(const char* what, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    log("dropped a %s: %s", what, e.what());
  }
}

void send_all(zmq::socket_t& s, std::vector<zmq::message_t>& frames, zmq::send_flags last = zmq::send_flags::none) {
  for (size_t i = 0; i < frames.size(); ++i) s.send(std::move(frames[i]), i + 1 < frames.size() ? zmq::send_flags::sndmore : last);
}

// The host and a digest of the cache directory's real path (zmqmodels.node.follower.default_node_id):
// a node restarted on the same machine and cache keeps its id; one with no cache is host-pid.
std::string default_node_id(const std::string& host, const std::string& cache) {
  if (cache.empty()) return host + "-" + std::to_string(getpid());
  std::string real = fs::weakly_canonical(fs::absolute(cache)).string();
  Sha256 sha;
  sha.update(real.data(), real.size());
  return host + "-" + sha.hex().substr(0, 8);
}

}  // namespace

NodeState::NodeState(Args a) : args(std::move(a)), cache(args.cache) {
  cache.lock();  // one node per cache directory, Python or C++
  device = c10::Device(args.device);
  if (device.is_cuda() && !torch::cuda::is_available())
    throw Error("bad_request", "device '" + args.device + "': no CUDA device on this machine");
  if (device.is_cuda() && device.index() >= static_cast<int>(torch::cuda::device_count()))
    throw Error("bad_request", "device '" + args.device + "': this machine has " +
                                   std::to_string(torch::cuda::device_count()) + " CUDA device(s)");
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  Config& cfg = follow_config;
  cfg.host = host;
  cfg.pid = getpid();
  cfg.node_id = args.node_id.empty() ? default_node_id(host, args.cache) : args.node_id;
  cfg.device = args.device;
  cfg.labels = args.labels;
  for (const auto& t : args.trust) {  // a key, a key file, or a directory of *.pub files
    if (!fs::is_directory(t)) {
      cfg.trust.keys.insert(Trust::load_key(t));
      continue;
    }
    size_t before = cfg.trust.keys.size();
    for (const auto& e : fs::directory_iterator(t))
      if (e.path().extension() == ".pub") cfg.trust.keys.insert(Trust::load_key(e.path().string()));
    if (cfg.trust.keys.size() == before) throw Error("bad_request", "no *.pub keys in " + t);
  }
  trust = cfg.trust;
  node_id = cfg.node_id;
  for (const auto& m : args.models) slots[m], counts[m];
}

Node::Node(Args a)
    : s_(std::move(a)),
      follower_(s_.args.models, s_.follow_config),
      requests_(s_),
      loads_(s_, [this](Result r) { post(std::move(r)); }),
      follows_(s_, follower_),
      work_(s_.args.queue_max, s_.args.queue_timeout_s, s_.args.batch_delay_s) {}

void Node::restore() {
  for (const auto& name : s_.args.models) {
    auto [serve, held] = s_.cache.startup(name, s_.trust, s_.limits);
    if (serve) {
      try {
        auto loaded = load_release(serve->first, serve->second, nullptr, 0, s_.device);
        s_.slots.at(name).offer(loaded);
        follower_.known(name, serve->first->seq, serve->first->label);
        log("serving cached %s seq %llu", name.c_str(), static_cast<unsigned long long>(serve->first->seq));
      } catch (const Error& e) {
        log("cached %s seq %llu unusable: %s", name.c_str(), static_cast<unsigned long long>(serve->first->seq),
            e.what());
      }
    }
    if (held) {
      Follow& st = follower_.follow(name);
      st.done_seq = std::max(st.done_seq, held);
      (void)follower_.held(name, held);  // reported once the sockets are up (report_all)
    }
  }
}

int Node::run(const std::atomic<bool>& stop) {
  zmq::socket_t front(ctx_, zmq::socket_type::router), replies(ctx_, zmq::socket_type::pull);
  for (auto* s : {&front, &replies}) s->set(zmq::sockopt::linger, 0);
  front.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(s_.limits.max_request_bytes + (1 << 20)));
  replies.bind("inproc://replies");
  front.bind(s_.args.bind);
  std::string bound = front.get(zmq::sockopt::last_endpoint);
  // receiving (hashing, copying chunks) and loading run on their own threads, below the
  // serving threads' priority: a release never delays the thread that routes requests
  std::thread follower([this] { follow_loop(); });
  std::thread loader([this] { load_loop(); });
  std::vector<std::thread> workers;
  for (int i = 0; i < s_.args.threads; ++i) workers.emplace_back([this, i] { serve_loop("w" + std::to_string(i)); });
  log("node %s serving on %s (device %s, %d serving thread(s))", s_.node_id.c_str(), bound.c_str(),
      s_.args.device.c_str(), s_.args.threads);
  std::printf("%s\n", bound.c_str());
  std::fflush(stdout);

  double drain_until = 0;
  std::vector<zmq_pollitem_t> items = {{front.handle(), 0, ZMQ_POLLIN, 0}, {replies.handle(), 0, ZMQ_POLLIN, 0}};
  auto answer = [&](const std::string& client, std::vector<zmq::message_t> reply) {
    front.send(zmq::buffer(client), zmq::send_flags::sndmore);
    front.send(zmq::message_t(), zmq::send_flags::sndmore);
    send_all(front, reply);
  };
  std::vector<zmq::message_t> msg;
  while (true) {
    if (stop && drain_until == 0) {
      drain_until = now_s() + 10.0;
      log("stopping: answering what is queued and in flight (up to 10s)");
    }
    if (drain_until > 0 && (work_.idle() || now_s() > drain_until)) break;
    try {
      zmq::poll(items.data(), items.size(), std::chrono::milliseconds(20));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) throw;
    }
    double now = now_s();
    for (int n = 0; (items[0].revents & ZMQ_POLLIN) && n < 1024; ++n) {  // clients
      msg.clear();
      if (!zmq::recv_multipart(front, std::back_inserter(msg), zmq::recv_flags::dontwait)) break;
      if (msg.size() < 3 || msg[1].size() != 0) continue;  // not a REQ envelope: nowhere to answer
      std::string client = str(msg[0]);
      std::vector<zmq::message_t> frames;
      for (size_t i = 2; i < msg.size(); ++i) frames.emplace_back(std::move(msg[i]));
      std::string model, id;
      try {
        if (str(frames[0]) == kind_name(Kind::Models)) {  // what is served now, answered at once
          answer(client, requests_.models(frames));
          continue;
        }
        Request r = requests_.admit(client, frames, now);
        model = r.header.model, id = r.header.id;
        if (drain_until > 0) throw Error("unavailable", "node " + s_.node_id + " is shutting down");
        if (!work_.push(std::move(r))) throw Error("unavailable", "queue full");
      } catch (const Error& e) {
        answer(client, requests_.refuse(e, model, id));
      }
    }
    for (int n = 0; (items[1].revents & ZMQ_POLLIN) && n < 1024; ++n) {  // answers from serving threads
      msg.clear();
      if (!zmq::recv_multipart(replies, std::back_inserter(msg), zmq::recv_flags::dontwait)) break;
      std::string client = str(msg[0]);
      std::vector<zmq::message_t> reply;
      for (size_t i = 1; i < msg.size(); ++i) reply.emplace_back(std::move(msg[i]));
      answer(client, std::move(reply));
    }
  }
  log("node %s stopped", s_.node_id.c_str());
  {
    std::lock_guard<std::mutex> lk(jobs_mu_);  // a waiter checks it under this lock
    stopping_ = true;
  }
  loads_.stopping = true;
  work_.stop();
  jobs_cv_.notify_all();
  for (auto& t : workers) t.join();
  loader.join();
  follower.join();
  log("stopped: %llu request(s) answered in %llu forward(s); %llu wait(s) for a batch to fill",
      static_cast<unsigned long long>(work_.requests), static_cast<unsigned long long>(work_.forwards),
      static_cast<unsigned long long>(work_.holds));
  return 0;
}

void Node::serve_loop(const std::string& wid) {
  zmq::socket_t out(ctx_, zmq::socket_type::push);
  out.set(zmq::sockopt::linger, 0);
  out.connect("inproc://replies");
  c10::InferenceMode guard;
  std::string worker = s_.node_id + "/" + wid;
  auto send = [&](const std::string& client, std::vector<zmq::message_t> reply) {
    out.send(zmq::buffer(client), zmq::send_flags::sndmore);
    send_all(out, reply);
  };
  std::vector<Request> stale;
  double free_since = now_s();
  while (!stopping_) {
    auto batch = work_.pop(0.2, stale, [this](const std::string& model) { return requests_.cap(model); },
                           free_since);
    for (auto& s : stale)
      send(s.client, requests_.refuse(Error("unavailable", "queued for longer than " +
                                                std::to_string(static_cast<int>(s_.args.queue_timeout_s)) + "s"),
                                      s.header.model, s.header.id));
    stale.clear();
    if (batch.empty()) continue;
    double started = now_s();
    if (batch.size() == 1) {
      auto reply = requests_.infer(batch[0], worker);
      if (!reply.empty()) send(batch[0].client, std::move(reply));
    } else {
      for (auto& [client, reply] : requests_.infer_batch(batch, worker)) send(client, std::move(reply));
    }
    free_since = now_s();
    work_.done(batch[0].header.model, free_since - started);
  }
}

void Node::follow_loop() {
  lower_priority();
  zmq::socket_t sub(ctx_, zmq::socket_type::sub), dealer(ctx_, zmq::socket_type::dealer);
  zmq::socket_t wake(ctx_, zmq::socket_type::pull);
  for (auto* s : {&sub, &dealer, &wake}) s->set(zmq::sockopt::linger, 0);
  sub.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(s_.limits.max_frame_bytes()));
  dealer.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(s_.limits.max_frame_bytes()));
  sub.set(zmq::sockopt::rcvhwm, 16);
  sub.set(zmq::sockopt::subscribe, std::string(1, '\0'));
  for (const auto& m : s_.args.models) sub.set(zmq::sockopt::subscribe, m + std::string(1, '\0'));
  wake.bind("inproc://loaded");
  {
    std::lock_guard<std::mutex> lk(jobs_mu_);
    wake_bound_ = true;
  }
  jobs_cv_.notify_all();
  if (!s_.args.hub.empty()) {
    sub.connect(pub_endpoint(s_.args.hub));
    dealer.connect(s_.args.hub);
  }
  double now = now_s(), next_report = 0;
  follows_.carry(follower_.start(now));
  follows_.carry(follower_.report_all());
  std::vector<zmq_pollitem_t> items = {{sub.handle(), 0, ZMQ_POLLIN, 0},
                                       {dealer.handle(), 0, ZMQ_POLLIN, 0},
                                       {wake.handle(), 0, ZMQ_POLLIN, 0}};
  std::vector<zmq::message_t> msg;
  auto carry = [&] {
    while (!follows_.idle()) {
      for (auto& frames : follows_.sends)
        for (size_t i = 0; i < frames.size(); ++i)
          dealer.send(zmq::buffer(frames[i]), i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::dontwait);
      follows_.sends.clear();
      auto jobs = follows_.jobs();  // may add reports (loading) to sends
      if (!jobs.empty()) {
        std::lock_guard<std::mutex> lk(jobs_mu_);
        for (auto& j : jobs) jobs_.push_back(std::move(j));
        jobs_cv_.notify_one();
      }
    }
  };
  while (!stopping_) {
    try {
      zmq::poll(items.data(), items.size(), std::chrono::milliseconds(50));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) throw;
    }
    now = now_s();
    for (int n = 0; (items[0].revents & ZMQ_POLLIN) && n < 64; ++n) {  // broadcasts
      msg.clear();
      if (!zmq::recv_multipart(sub, std::back_inserter(msg), zmq::recv_flags::dontwait)) break;
      follower_.heard(now);
      guarded("broadcast", [&] { follows_.on_broadcast(msg, now); });
    }
    for (int n = 0; (items[1].revents & ZMQ_POLLIN) && n < 64; ++n) {  // fetch replies
      msg.clear();
      if (!zmq::recv_multipart(dealer, std::back_inserter(msg), zmq::recv_flags::dontwait)) break;
      follower_.heard(now);
      guarded("reply", [&] { follows_.on_reply(msg, now); });
    }
    if (items[2].revents & ZMQ_POLLIN) {
      zmq::message_t m;
      while (wake.recv(m, zmq::recv_flags::dontwait)) {
      }
      std::deque<Result> done;
      {
        std::lock_guard<std::mutex> lk(results_mu_);
        done.swap(results_);
      }
      follows_.on_results(done, now);
    }
    follows_.carry(follower_.tick(now));
    if (now >= next_report) {
      next_report = now + gen::HEARTBEAT_INTERVAL_S;
      for (const auto& m : s_.args.models) follower_.count(m, s_.counts.at(m).requests, s_.counts.at(m).errors);
      follows_.carry(follower_.report_all());
    }
    carry();
  }
  // say "stopped" (not left to go "lost"); the reports get a moment to leave
  dealer.set(zmq::sockopt::linger, gen::STOP_REPORT_LINGER_MS);
  follows_.carry(follower_.stopping());
  carry();
}

void Node::post(Result r) {
  {
    std::lock_guard<std::mutex> lk(results_mu_);
    results_.push_back(std::move(r));
  }
  push_->send(zmq::str_buffer("1"), zmq::send_flags::dontwait);
}

void Node::load_loop() {
  lower_priority();
  {
    std::unique_lock<std::mutex> lk(jobs_mu_);
    jobs_cv_.wait(lk, [this] { return wake_bound_ || stopping_; });
  }
  zmq::socket_t push(ctx_, zmq::socket_type::push);
  push.set(zmq::sockopt::linger, 0);
  push.connect("inproc://loaded");
  push_ = &push;
  c10::InferenceMode guard;
  while (true) {
    Job j;
    {
      std::unique_lock<std::mutex> lk(jobs_mu_);
      jobs_cv_.wait(lk, [this] { return stopping_ || !jobs_.empty(); });
      if (stopping_) break;
      j = std::move(jobs_.front());
      jobs_.pop_front();
    }
    try {
      loads_.run(j);
    } catch (const std::exception& e) {
      log("loader: %s", e.what());
    }
  }
  push_ = nullptr;
}

}  // namespace zm
