// zmqmodels-node: follow a hub, verify releases, swap them in-process with no stall (LibTorch
// loads on a background thread while serving threads keep answering), serve REQ/REP inference
// with the Python node's codec, codes and messages. See README §C++ node.
#include "follower.hpp"
#include "model.hpp"

#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstring>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <iostream>
#include <mutex>
#include <regex>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

namespace fs = std::filesystem;
using namespace zm;

namespace {

std::atomic<bool> g_stop{false};

void log(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
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

struct Args {
  std::string hub, bind, device = "cpu", cache = ".zmqmodels/cache", node_id, load_from = "file", list;
  std::vector<std::string> models, trust, labels;
  int threads = 1;
  size_t queue_max = 1024;
  double queue_timeout_s = 10.0;
};

const char* const kUsage =
    "usage: zmqmodels-node --model NAME [--model ...] --bind ADDR [--hub ADDR] [--device cpu|cuda[:N]]\n"
    "                      [--cache DIR] [--node-id ID] [--trust PUBKEY|FILE|DIR ...] [--threads N]\n"
    "                      [--label L ...] [--load-from file|memory]\n"
    "       zmqmodels-node --list PATH\n"
    "ADDR: tcp://HOST:PORT (bind: tcp://*:PORT) or ipc://PATH\n";

// A bad argument: one line and exit status 1, before anything is bound or printed.
[[noreturn]] void bad_argument(const std::string& why) {
  std::fprintf(stderr, "zmqmodels-node: error: %s (see --help)\n", why.c_str());
  std::exit(1);
}

// "" if `addr` is an endpoint ZeroMQ takes, else why not (with the likely fix).
std::string endpoint_problem(const std::string& opt, const std::string& addr) {
  static const std::regex tcp(R"(^tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+):(\d{1,5})$)");
  std::smatch m;
  if (addr.rfind("ipc://", 0) == 0) return addr.size() > 6 ? "" : opt + " " + addr + ": ipc:// needs a path";
  if (addr.rfind("tcp://", 0) == 0) {
    if (!std::regex_match(addr, m, tcp) || std::stoi(m[2].str()) > 65535)
      return opt + " " + addr + ": use tcp://HOST:PORT with a port of 0-65535";
    return "";
  }
  if (addr.find("://") == std::string::npos) return opt + " " + addr + " has no scheme: did you mean tcp://" + addr + "?";
  return opt + " " + addr + ": use tcp://HOST:PORT or ipc://PATH";
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) bad_argument(k + " needs a value");
      return argv[++i];
    };
    if (k == "--hub") a.hub = val();
    else if (k == "--model") a.models.push_back(val());
    else if (k == "--bind") a.bind = val();
    else if (k == "--device") a.device = val();
    else if (k == "--cache") a.cache = val();
    else if (k == "--node-id") a.node_id = val();
    else if (k == "--trust") a.trust.push_back(val());
    else if (k == "--label") a.labels.push_back(val());
    else if (k == "--threads") {
      std::string v = val();
      if (!std::regex_match(v, std::regex("^[1-9][0-9]{0,3}$"))) bad_argument("--threads " + v + ": a number from 1 to 9999");
      a.threads = std::stoi(v);
    } else if (k == "--load-from") a.load_from = val();
    else if (k == "--list") a.list = val();
    else if (k == "-h" || k == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else bad_argument("unknown option " + k);
  }
  if (!a.list.empty()) return a;
  if (a.models.empty()) bad_argument("--model is required");
  if (a.bind.empty()) bad_argument("--bind is required");
  static const std::regex name("^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$");
  for (const auto& m : a.models)
    if (!std::regex_match(m, name)) bad_argument("--model " + m + ": names are 1-128 of A-Z a-z 0-9 . _ - (no leading dot)");
  for (const auto& [opt, addr] : {std::pair{"--bind", a.bind}, std::pair{"--hub", a.hub}})
    if (!addr.empty())
      if (auto why = endpoint_problem(opt, addr); !why.empty()) bad_argument(why);
  if (a.load_from != "file" && a.load_from != "memory") bad_argument("--load-from " + a.load_from + ": file or memory");
  if (!std::regex_match(a.device, std::regex("^(cpu|cuda(:[0-9]+)?)$")))
    bad_argument("--device " + a.device + ": cpu, cuda or cuda:N");
  return a;
}

std::string str(const zmq::message_t& m) { return std::string(static_cast<const char*>(m.data()), m.size()); }

bool is_retryable(const std::string& code) { return code == "not_ready" || code == "worker_lost" || code == "unavailable"; }

std::vector<zmq::message_t> error_reply(const std::string& code, const std::string& message, const std::string& model,
                                        const std::string& id) {
  MapWriter w(8);
  w.kv("code", code).kv("message", message.substr(0, 4000)).kv("name", model).kv("seq", 0).kv("retryable", is_retryable(code));
  w.kv("v", V).kv("id", id);
  w.key("indices").packer().pack_array(0);
  std::vector<zmq::message_t> out;
  out.emplace_back(std::string("ERROR"));
  out.emplace_back(w.bytes());
  return out;
}

bool server_error(const std::string& code) { return code == "model_error" || code == "internal" || code == "worker_lost"; }

struct Counts {
  std::atomic<uint64_t> requests{0}, errors{0};
};

// What the loader thread tells the I/O thread.
struct Result {
  enum Kind { Loaded, Rejected, Held, StoreFailed } kind;
  std::string name, label, reason;
  uint64_t seq = 0;
  double load_s = 0, check_s = 0, cache_write_s = 0;
  Completed kept{};  // StoreFailed: the verified release, to be written again
};

struct Job {
  bool activate = false;  // a held staged release: load it from the cache
  Completed c;
  std::string name;
  uint64_t seq = 0;
};

class Node {
 public:
  explicit Node(Args a) : args_(std::move(a)), cache_(args_.cache) {
    cache_.lock();  // one node per cache directory, Python or C++
    device_ = c10::Device(args_.device);
    if (device_.is_cuda() && !torch::cuda::is_available())
      throw Error("bad_request", "device '" + args_.device + "': no CUDA device on this machine");
    if (device_.is_cuda() && device_.index() >= static_cast<int>(torch::cuda::device_count()))
      throw Error("bad_request", "device '" + args_.device + "': this machine has " +
                                     std::to_string(torch::cuda::device_count()) + " CUDA device(s)");
    char host[256] = {0};
    gethostname(host, sizeof host - 1);
    Config cfg;
    cfg.host = host;
    cfg.pid = getpid();
    cfg.node_id = args_.node_id.empty() ? std::string(host) + "-" + std::to_string(getpid()) : args_.node_id;
    cfg.device = args_.device;
    cfg.labels = args_.labels;
    for (const auto& t : args_.trust) {  // a key, a key file, or a directory of *.pub files
      if (!fs::is_directory(t)) {
        cfg.trust.keys.insert(Trust::load_key(t));
        continue;
      }
      size_t before = cfg.trust.keys.size();
      for (const auto& e : fs::directory_iterator(t))
        if (e.path().extension() == ".pub") cfg.trust.keys.insert(Trust::load_key(e.path().string()));
      if (cfg.trust.keys.size() == before) throw Error("bad_request", "no *.pub keys in " + t);
    }
    trust_ = cfg.trust;
    node_id_ = cfg.node_id;
    follower_ = std::make_unique<Follower>(args_.models, cfg);
    for (const auto& m : args_.models) slots_[m], counts_[m];
  }

  void restore() {  // serve the cache at once, before the hub answers
    for (const auto& name : args_.models) {
      auto top = cache_.latest(name, trust_, limits_, true);  // the newest, staged or not
      auto serve = top;
      uint64_t held = 0;
      if (top && !cache_.is_active(*top->first)) {  // staged, not activated: hold it
        held = top->first->seq;
        serve = cache_.latest(name, trust_, limits_, false);
      }
      if (serve) {
        try {
          auto loaded = load_release(serve->first, serve->second, nullptr, 0, device_);
          slots_[name].offer(loaded);
          follower_->known(name, serve->first->seq, serve->first->label);
          log("serving cached %s seq %llu", name.c_str(), static_cast<unsigned long long>(serve->first->seq));
        } catch (const Error& e) {
          log("cached %s seq %llu unusable: %s", name.c_str(), static_cast<unsigned long long>(serve->first->seq),
              e.what());
        }
      }
      if (held) {
        Follow& st = follower_->follow(name);
        st.done_seq = std::max(st.done_seq, held);
        follower_->held(name, held);
      }
    }
    follower_->sends.clear();  // reported once the sockets are up
  }

  int run() {
    zmq::socket_t front(ctx_, zmq::socket_type::router), back(ctx_, zmq::socket_type::router);
    for (auto* s : {&front, &back}) s->set(zmq::sockopt::linger, 0);
    front.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(limits_.max_request_bytes + (1 << 20)));
    back.bind("inproc://workers");
    front.bind(args_.bind);
    std::string bound = front.get(zmq::sockopt::last_endpoint);
    // receiving (hashing, copying chunks) and loading run on their own threads, below the
    // serving threads' priority: a release never delays the thread that routes requests
    std::thread follower([this] { follow_loop(); });
    std::thread loader([this] { load_loop(); });
    std::vector<std::thread> workers;
    for (int i = 0; i < args_.threads; ++i) workers.emplace_back([this, i] { serve_loop("w" + std::to_string(i)); });
    log("node %s serving on %s (device %s, %d serving thread(s))", node_id_.c_str(), bound.c_str(),
        args_.device.c_str(), args_.threads);
    std::printf("%s\n", bound.c_str());
    std::fflush(stdout);

    double now = now_s(), drain_until = 0;
    std::deque<std::string> idle;
    std::set<std::string> busy;
    struct Pending {
      std::vector<zmq::message_t> frames;  // client id, then the INFER message
      std::string model, id;
      double received, expires;
      int64_t received_ns;
    };
    std::deque<Pending> queue;
    std::vector<zmq_pollitem_t> items = {{front.handle(), 0, ZMQ_POLLIN, 0}, {back.handle(), 0, ZMQ_POLLIN, 0}};
    auto send_client = [&](std::string client, std::vector<zmq::message_t> reply) {
      front.send(zmq::buffer(client), zmq::send_flags::sndmore);
      front.send(zmq::message_t(), zmq::send_flags::sndmore);
      zmq::send_multipart(front, reply);
    };
    while (true) {
      if (g_stop && drain_until == 0) {
        drain_until = now_s() + 10.0;
        log("stopping: answering what is queued and in flight (up to 10s)");
      }
      if (drain_until > 0 && ((queue.empty() && busy.empty()) || now_s() > drain_until)) break;
      try {
        zmq::poll(items.data(), items.size(), std::chrono::milliseconds(20));
      } catch (const zmq::error_t& e) {
        if (e.num() != EINTR) throw;
      }
      now = now_s();
      std::vector<zmq::message_t> msg;
      for (int n = 0; (items[0].revents & ZMQ_POLLIN) && n < 1024; ++n) {  // clients
        msg.clear();
        if (!zmq::recv_multipart(front, std::back_inserter(msg), zmq::recv_flags::dontwait)) break;
        if (msg.size() < 3 || msg[1].size() != 0) continue;  // not a REQ envelope: nowhere to answer
        std::string client = str(msg[0]), id, model;
        double timeout_ms = 0;
        try {
          if (str(msg[2]) != "INFER" || msg.size() < 4) throw Error("bad_request", "expected [INFER, header, tensor frames...]");
          auto oh = unpack_header(msg[3].data(), msg[3].size(), "INFER");
          Map h(oh.get(), "INFER header");
          auto* ido = h.get("id");
          if (ido && ido->type == msgpack::type::STR && is_utf8(ido->via.str.ptr, ido->via.str.size))
            id = std::string(ido->via.str.ptr, ido->via.str.size);
          else
            throw Error("bad_request", "bad INFER header: id must be a string");
          model = h.str("model");
          timeout_ms = h.f64("timeout_ms", 0);
          size_t size = 0;
          for (size_t i = 2; i < msg.size(); ++i) size += msg[i].size();
          if (size > limits_.max_request_bytes || msg.size() - 4 > limits_.max_request_tensors)
            throw Error("too_large", "request of " + std::to_string(msg.size() - 4) + " tensor(s), " +
                                         std::to_string(size) + " bytes; limits " +
                                         std::to_string(limits_.max_request_tensors) + " / " +
                                         std::to_string(limits_.max_request_bytes));
          if (drain_until > 0) throw Error("unavailable", "node " + node_id_ + " is shutting down");
          if (queue.size() >= args_.queue_max) throw Error("unavailable", "queue full");
        } catch (const Error& e) {
          if (slots_.count(model)) counts_.at(model).requests++;
          send_client(client, error_reply(e.code == "bad_message" ? "bad_request" : e.code, e.what(), model, id));
          continue;
        }
        Pending p{{}, model, id, now, timeout_ms > 0 ? now + timeout_ms / 1000 : 1e300,
                  std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count()};
        p.frames.emplace_back(std::move(msg[0]));
        for (size_t i = 2; i < msg.size(); ++i) p.frames.emplace_back(std::move(msg[i]));
        queue.push_back(std::move(p));
      }
      for (int n = 0; (items[1].revents & ZMQ_POLLIN) && n < 1024; ++n) {  // serving threads
        msg.clear();
        if (!zmq::recv_multipart(back, std::back_inserter(msg), zmq::recv_flags::dontwait)) break;
        std::string wid = str(msg[0]);
        if (msg.size() >= 3) {
          std::string client = str(msg[1]);
          std::vector<zmq::message_t> reply;
          for (size_t i = 2; i < msg.size(); ++i) reply.emplace_back(std::move(msg[i]));
          send_client(client, std::move(reply));
        }
        busy.erase(wid);
        idle.push_back(wid);
      }
      // queued requests: drop those nobody waits for any more, hand the rest to free threads
      while (!queue.empty() && (queue.front().expires < now || now - queue.front().received > args_.queue_timeout_s)) {
        Pending& p = queue.front();
        if (p.expires >= now)
          send_client(str(p.frames[0]), error_reply("unavailable", "queued for longer than " +
                                                        std::to_string(static_cast<int>(args_.queue_timeout_s)) + "s",
                                                    p.model, p.id));
        queue.pop_front();
      }
      while (!idle.empty() && !queue.empty()) {
        std::string wid = idle.front();
        idle.pop_front();
        Pending p = std::move(queue.front());
        queue.pop_front();
        back.send(zmq::buffer(wid), zmq::send_flags::sndmore);
        back.send(std::move(p.frames[0]), zmq::send_flags::sndmore);
        back.send(zmq::buffer(&p.received_ns, sizeof p.received_ns), zmq::send_flags::sndmore);
        for (size_t i = 1; i < p.frames.size(); ++i)
          back.send(std::move(p.frames[i]), i + 1 < p.frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
        busy.insert(wid);
      }
    }
    log("node %s stopped", node_id_.c_str());
    stopping_ = true;
    jobs_cv_.notify_all();
    for (auto& t : workers) t.join();
    loader.join();
    follower.join();
    return 0;
  }

  // -- the follower thread: the hub's broadcasts and replies, reports, loader results ------------
  void follow_loop() {
    lower_priority();
    zmq::socket_t sub(ctx_, zmq::socket_type::sub), dealer(ctx_, zmq::socket_type::dealer);
    zmq::socket_t wake(ctx_, zmq::socket_type::pull);
    for (auto* s : {&sub, &dealer, &wake}) s->set(zmq::sockopt::linger, 0);
    sub.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(limits_.max_frame_bytes()));
    dealer.set(zmq::sockopt::maxmsgsize, static_cast<int64_t>(limits_.max_frame_bytes()));
    sub.set(zmq::sockopt::rcvhwm, 16);
    sub.set(zmq::sockopt::subscribe, std::string(1, '\0'));
    for (const auto& m : args_.models) sub.set(zmq::sockopt::subscribe, m + std::string(1, '\0'));
    wake.bind("inproc://loaded");
    {
      std::lock_guard<std::mutex> lk(jobs_mu_);
      wake_bound_ = true;
    }
    jobs_cv_.notify_all();
    if (!args_.hub.empty()) {
      sub.connect(pub_endpoint(args_.hub));
      dealer.connect(args_.hub);
    }
    double now = now_s(), next_report = 0;
    follower_->start(now);
    follower_->report_all();
    std::vector<zmq_pollitem_t> items = {{sub.handle(), 0, ZMQ_POLLIN, 0},
                                         {dealer.handle(), 0, ZMQ_POLLIN, 0},
                                         {wake.handle(), 0, ZMQ_POLLIN, 0}};
    std::vector<zmq::message_t> msg;
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
        follower_->heard(now);
        guarded("broadcast", [&] { on_broadcast(msg, now); });
      }
      for (int n = 0; (items[1].revents & ZMQ_POLLIN) && n < 64; ++n) {  // fetch replies
        msg.clear();
        if (!zmq::recv_multipart(dealer, std::back_inserter(msg), zmq::recv_flags::dontwait)) break;
        follower_->heard(now);
        guarded("reply", [&] { on_reply(msg, now); });
      }
      if (items[2].revents & ZMQ_POLLIN) {
        zmq::message_t m;
        while (wake.recv(m, zmq::recv_flags::dontwait)) {
        }
        on_results(now);
      }
      follower_->tick(now);
      if (now >= next_report) {
        next_report = now + 0.5;
        for (const auto& m : args_.models) follower_->count(m, counts_.at(m).requests, counts_.at(m).errors);
        follower_->report_all();
      }
      carry(dealer);
    }
  }

  static void lower_priority() {  // this thread only (Linux: nice applies per thread id)
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
  }

 private:
  template <class F>
  void guarded(const char* what, F&& f) {
    try {
      f();
    } catch (const std::exception& e) {
      log("dropped a %s: %s", what, e.what());
    }
  }

  void carry(zmq::socket_t& dealer) {
    for (auto& frames : follower_->sends) {
      for (size_t i = 0; i < frames.size(); ++i)
        dealer.send(zmq::buffer(frames[i]), i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::dontwait);
    }
    follower_->sends.clear();
    std::vector<Job> jobs;
    for (auto& c : follower_->completed) {
      if (!c.manifest->staged) follower_->set_state(c.manifest->name, "loading", c.manifest->seq, c.manifest->label);
      if (auto it = unstored_.find(c.manifest->name); it != unstored_.end() && it->second.manifest->seq < c.manifest->seq)
        unstored_.erase(it);  // superseded
      Job j;
      j.c = std::move(c);
      jobs.push_back(std::move(j));
    }
    follower_->completed.clear();
    for (auto& [name, seq] : follower_->rewrites) {
      auto it = unstored_.find(name);
      if (it == unstored_.end() || it->second.manifest->seq != seq) continue;
      Job j;
      j.c = std::move(it->second);  // written again; the state stays "error" until that succeeds
      unstored_.erase(it);
      jobs.push_back(std::move(j));
    }
    follower_->rewrites.clear();
    for (auto& [name, seq] : follower_->unstaged) {
      Job j;
      j.activate = true, j.name = name, j.seq = seq;
      jobs.push_back(std::move(j));
    }
    follower_->unstaged.clear();
    if (!jobs.empty()) {
      std::lock_guard<std::mutex> lk(jobs_mu_);
      for (auto& j : jobs) jobs_.push_back(std::move(j));
      jobs_cv_.notify_one();
    }
    if (!follower_->sends.empty()) carry(dealer);
  }

  void on_broadcast(std::vector<zmq::message_t>& msg, double now) {
    if (msg.size() < 2) throw Error("bad_message", "broadcast of " + std::to_string(msg.size()) + " frame(s)");
    std::string topic = str(msg[0]), kind = str(msg[1]);
    if (topic.size() == 1 && topic[0] == '\0') return;  // the hub's own beat: heard
    if (topic.empty() || topic.back() != '\0') throw Error("bad_message", "topic without its NUL");
    std::string name = topic.substr(0, topic.size() - 1);
    if (!follower_->follows(name)) throw Error("bad_message", "broadcast on an unsubscribed topic");
    if (kind == "MANIFEST" && (msg.size() == 3 || msg.size() == 4)) {
      auto m = decode_manifest(msg[2].data(), msg[2].size(), limits_, false);
      if (m->name != name) throw Error("bad_message", "manifest for '" + m->name + "' on topic '" + name + "'");
      follower_->on_manifest(m, str(msg[2]), msg.size() == 4 ? str(msg[3]) : "", now, false);
    } else if (kind == "CHUNK" && msg.size() == 4) {
      auto oh = unpack_header(msg[2].data(), msg[2].size(), "CHUNK");
      Map h(oh.get());
      if (h.str("name") != name) throw Error("bad_message", "chunk for another topic");
      follower_->on_chunk(name, h.u64("seq"), h.u64("index"), msg[3].data(), msg[3].size(), now, false);
    } else if (kind == "HEARTBEAT" && msg.size() == 3) {
      auto oh = unpack_header(msg[2].data(), msg[2].size(), "HEARTBEAT");
      Map h(oh.get());
      if (h.str("name") == name) follower_->on_beat(name, h.u64("seq"), h.str("sha256"), h.u64("active"), now);
    } else if (kind == "ACTIVATE" && msg.size() == 3) {
      auto oh = unpack_header(msg[2].data(), msg[2].size(), "ACTIVATE");
      Map h(oh.get());
      if (h.str("name") != name) throw Error("bad_message", "activation for another topic");
      follower_->on_activate(name, h.u64("seq"), h.strs("nodes"));
    } else {
      throw Error("bad_message", "unexpected broadcast " + kind.substr(0, 32) + " of " + std::to_string(msg.size()) + " frame(s)");
    }
  }

  void on_reply(std::vector<zmq::message_t>& msg, double now) {
    if (msg.empty()) throw Error("bad_message", "empty reply");
    std::string kind = str(msg[0]);
    if (kind == "MANIFEST" && (msg.size() == 2 || msg.size() == 3)) {
      auto m = decode_manifest(msg[1].data(), msg[1].size(), limits_, false);
      follower_->on_manifest(m, str(msg[1]), msg.size() == 3 ? str(msg[2]) : "", now, true);
    } else if (kind == "CHUNK" && msg.size() == 3) {
      auto oh = unpack_header(msg[1].data(), msg[1].size(), "CHUNK");
      Map h(oh.get());
      follower_->on_chunk(h.str("name"), h.u64("seq"), h.u64("index"), msg[2].data(), msg[2].size(), now, true);
    } else if (kind == "ERROR" && msg.size() == 2) {
      auto oh = unpack_header(msg[1].data(), msg[1].size(), "ERROR");
      Map h(oh.get());
      if (h.str("code") != "not_found") log("hub error %s: %s", h.str("code").c_str(), h.str("message").c_str());
      follower_->on_error(h.str("code"), h.str("name"), h.u64("seq"), h.u64s("indices"));
    } else {
      throw Error("bad_message", "unexpected reply " + kind.substr(0, 32));
    }
  }

  void on_results(double now) {
    std::deque<Result> done;
    {
      std::lock_guard<std::mutex> lk(results_mu_);
      done.swap(results_);
    }
    for (auto& r : done) {
      if (r.cache_write_s > 0) follower_->stage(r.name, r.seq, "cache_write", r.cache_write_s);
      switch (r.kind) {
        case Result::Loaded:
          counts_[r.name].requests = 0, counts_[r.name].errors = 0;
          follower_->stage(r.name, r.seq, "load", r.load_s);
          follower_->stage(r.name, r.seq, "check", r.check_s);
          follower_->set_state(r.name, "serving", r.seq, r.label);
          log("%s seq %llu serving (load %.3fs, check %.3fs)", r.name.c_str(), static_cast<unsigned long long>(r.seq),
              r.load_s, r.check_s);
          break;
        case Result::Rejected: {
          log("%s seq %llu rejected: %s", r.name.c_str(), static_cast<unsigned long long>(r.seq), r.reason.c_str());
          follower_->reject(r.name, r.seq, r.label, r.reason);
          auto cur = slots_[r.name].newest();
          Follow& st = follower_->follow(r.name);
          st.state = cur ? "serving" : "idle", st.seq = cur ? cur->manifest->seq : 0;
          st.label = cur ? cur->manifest->label : "", st.reason = "";
          break;
        }
        case Result::Held:
          log("%s seq %llu staged (served once activated)", r.name.c_str(), static_cast<unsigned long long>(r.seq));
          follower_->held(r.name, r.seq);
          break;
        case Result::StoreFailed:
          log("%s seq %llu: cache write failed: %s", r.name.c_str(), static_cast<unsigned long long>(r.seq), r.reason.c_str());
          follower_->store_failed(r.name, r.seq, r.label, r.reason, now);
          unstored_[r.name] = std::move(r.kept);
          break;
      }
    }
  }

  void post(Result r) {
    {
      std::lock_guard<std::mutex> lk(results_mu_);
      results_.push_back(std::move(r));
    }
    push_->send(zmq::str_buffer("1"), zmq::send_flags::dontwait);
  }

  // -- the loader thread: verify, cache, load, check, swap ---------------------------------------
  void load_loop() {
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
        jobs_cv_.wait_for(lk, std::chrono::milliseconds(200), [this] { return stopping_ || !jobs_.empty(); });
        if (stopping_) break;
        if (jobs_.empty()) continue;
        j = std::move(jobs_.front());
        jobs_.pop_front();
      }
      try {
        j.activate ? activate(j) : deliver(j);
      } catch (const std::exception& e) {
        log("loader: %s", e.what());
      }
    }
    push_ = nullptr;
  }

  void deliver(Job& j) {
    auto m = j.c.manifest;
    Result r{Result::Rejected, m->name, m->label, "", m->seq};
    if (j.c.digest != m->archive_sha256) {
      r.reason = "archive sha256 mismatch";
      return post(r);
    }
    double t0 = now_s();
    try {
      cache_.put(j.c);
    } catch (const Error& e) {
      r.kind = Result::StoreFailed, r.reason = e.what();
      r.kept = std::move(j.c);
      return post(r);
    }
    r.cache_write_s = now_s() - t0;
    if (m->staged) {
      r.kind = Result::Held;
      return post(r);
    }
    load(m, args_.load_from == "memory" ? "" : cache_.path(m->name, m->seq).string(), j.c.archive.get(), r);
  }

  void activate(Job& j) {
    Result r{Result::Rejected, j.name, "", "", j.seq};
    fs::path p = cache_.path(j.name, j.seq);
    std::shared_ptr<Manifest> m;
    try {
      std::string raw = read_all(fs::path(p).replace_extension(".manifest"));
      m = decode_manifest(raw.data(), raw.size(), limits_, true);
      cache_.activate(j.name, j.seq);
    } catch (const Error& e) {
      r.reason = std::string("activated, but its cache entry is gone: ") + e.what();
      return post(r);
    }
    r.label = m->label;
    log("%s seq %llu activated", j.name.c_str(), static_cast<unsigned long long>(j.seq));
    std::string bytes;
    if (args_.load_from == "memory") bytes = read_all(p);
    load(m, args_.load_from == "memory" ? "" : p.string(), reinterpret_cast<const uint8_t*>(bytes.data()), r);
  }

  void load(const std::shared_ptr<Manifest>& m, const std::string& path, const uint8_t* data, Result& r) {
    try {
      auto loaded = load_release(m, path, data, m->archive_bytes, device_);
      if (auto cur = slots_[m->name].newest(); cur && cur->manifest->seq > m->seq) {  // never step back
        r.kind = Result::Rejected, r.reason = "superseded by seq " + std::to_string(cur->manifest->seq);
        return post(r);
      }
      auto old = slots_[m->name].offer(loaded);  // in-flight requests finish on the old one
      r.kind = Result::Loaded, r.load_s = loaded->load_s, r.check_s = loaded->check_s;
      post(r);
      // free the old version here, once its last request ends, not on a serving thread
      for (int i = 0; old && old.use_count() > 1 && i < 30000 && !stopping_; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      old.reset();
      return;
    } catch (const Error& e) {
      r.kind = Result::Rejected, r.reason = e.what();
      cache_.discard(m->name, m->seq);
    }
    post(r);
  }

  // -- serving threads ---------------------------------------------------------------------------
  void serve_loop(const std::string& wid) {
    zmq::socket_t sock(ctx_, zmq::socket_type::dealer);
    sock.set(zmq::sockopt::routing_id, wid);
    sock.set(zmq::sockopt::linger, 0);
    sock.connect("inproc://workers");
    sock.send(zmq::str_buffer("READY"), zmq::send_flags::none);
    c10::InferenceMode guard;
    std::string worker = node_id_ + "/" + wid;
    while (!stopping_) {
      zmq_pollitem_t item{sock.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, std::chrono::milliseconds(200));
      if (!(item.revents & ZMQ_POLLIN)) continue;
      std::vector<zmq::message_t> msg;
      if (!zmq::recv_multipart(sock, std::back_inserter(msg))) continue;
      if (msg.size() < 3) continue;
      int64_t received_ns = 0;
      std::memcpy(&received_ns, msg[1].data(), std::min<size_t>(8, msg[1].size()));
      std::vector<zmq::message_t> reply = infer(msg, received_ns, worker);
      sock.send(std::move(msg[0]), reply.empty() ? zmq::send_flags::none : zmq::send_flags::sndmore);
      zmq::send_multipart(sock, reply);
    }
  }

  std::vector<zmq::message_t> infer(std::vector<zmq::message_t>& msg, int64_t received_ns, const std::string& worker) {
    // msg: client, received_ns, INFER, header, tensors...
    int64_t t0 = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
    std::string id, model;
    try {
      auto oh = unpack_header(msg[3].data(), msg[3].size(), "INFER");
      Map h(oh.get(), "INFER header");
      id = h.str("id");
      model = h.str("model");
      uint64_t pin = h.u64("version");
      double timeout_ms = h.f64("timeout_ms", 0);
      if (timeout_ms > 0 && t0 > received_ns + static_cast<int64_t>(timeout_ms * 1e6)) return {};  // given up
      auto it = slots_.find(model);
      if (it == slots_.end()) throw Error("unknown_model", "this node does not serve '" + model + "'");
      auto cur = it->second.begin();
      struct End {  // the slot counts the request until its reply is built
        Slot* slot;
        ~End() {
          if (slot) slot->end();
        }
      } end{cur ? &it->second : nullptr};
      if (!cur) throw Error("not_ready", "no version of '" + model + "' loaded yet");
      if (pin && pin != cur->manifest->seq)
        throw Error("version_unavailable", model + " seq " + std::to_string(pin) + " is not served by this node");
      auto* spec = h.get("inputs");
      if (!spec) throw Error("bad_request", "INFER header without inputs");
      std::vector<std::pair<const void*, size_t>> bufs;
      for (size_t i = 4; i < msg.size(); ++i) bufs.emplace_back(msg[i].data(), msg[i].size());
      c10::IValue tree;
      try {
        tree = decode_tree(*spec, bufs);
      } catch (const Error& e) {
        throw Error("bad_request", e.what());
      }
      if (!tree.isTuple()) throw Error("bad_request", "inputs must be a tuple of positional arguments");
      std::vector<c10::IValue> args;
      for (auto& x : tree.toTupleRef().elements()) args.push_back(x.isTensor() ? c10::IValue(x.toTensor().to(cur->device)) : x);
      check_inputs(*cur->manifest, args);
      int64_t t1 = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
      c10::IValue out;
      try {
        out = const_cast<torch::jit::Module&>(cur->module).forward(args);
      } catch (const std::exception& e) {
        throw Error("model_error", model_error_line(e.what()));
      }
      int64_t t2 = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
      MapWriter w(9);
      w.kv("id", id).kv("model", model).kv("label", cur->manifest->label).kv("seq", cur->manifest->seq).kv("worker", worker);
      std::vector<at::Tensor> tensors;
      w.key("outputs");
      encode_tree(out, w.packer(), tensors);
      w.kv("queue_ms", std::round((t0 - received_ns) / 1e3) / 1e3).kv("infer_ms", std::round((t2 - t1) / 1e3) / 1e3);
      w.kv("v", V);
      std::vector<zmq::message_t> reply;
      reply.emplace_back(std::string("OK"));
      reply.emplace_back(w.bytes());
      for (auto& t : tensors) reply.emplace_back(t.data_ptr(), t.numel() * t.element_size());
      counts_[model].requests++;
      return reply;
    } catch (const Error& e) {
      std::string code = e.code == "bad_message" ? "bad_request" : e.code;
      if (counts_.count(model)) {
        counts_[model].requests++;
        if (server_error(code)) counts_[model].errors++;
      }
      return error_reply(code, e.what(), model, id);
    } catch (const std::exception& e) {
      if (counts_.count(model)) counts_[model].requests++, counts_[model].errors++;
      return error_reply("internal", e.what(), model, id);
    }
  }

  Args args_;
  Cache cache_;
  Limits limits_;
  Trust trust_;
  c10::Device device_ = at::kCPU;
  std::string node_id_;
  std::unique_ptr<Follower> follower_;
  std::map<std::string, Slot> slots_;
  std::map<std::string, Counts> counts_;
  zmq::context_t ctx_;
  std::mutex jobs_mu_, results_mu_;
  std::condition_variable jobs_cv_;
  std::deque<Job> jobs_;
  std::deque<Result> results_;
  std::map<std::string, Completed> unstored_;  // I/O thread: verified releases whose cache write failed
  zmq::socket_t* push_ = nullptr;  // the loader thread's own (post() runs only there)
  std::atomic<bool> stopping_{false};
  bool wake_bound_ = false;
};

}  // namespace

int main(int argc, char** argv) {
  Args args = parse(argc, argv);
  if (!args.list.empty()) {
    try {
      list_parameters(args.list, std::cout);
      return 0;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "zmqmodels-node: cannot list %s: %s\n", args.list.c_str(), e.what());
      return 1;
    }
  }
  struct sigaction sa {};
  sa.sa_handler = [](int) { g_stop = true; };
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  at::set_num_threads(1);  // one intra-op thread per serving thread
  try {
    Node node(args);
    node.restore();
    return node.run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "zmqmodels-node: %s\n", e.what());
    return 1;
  }
}
