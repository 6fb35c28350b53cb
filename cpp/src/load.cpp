// zmqmodels-load: a closed-loop load generator speaking the node's inference protocol
// (docs/protocol.md §Inference) from native code, so a benchmark measures the server and not
// its client. One thread drives several DEALER sockets, each keeping its share of the requests
// in flight (a new one leaves as each reply comes back) and matching replies by `id`. It links
// libzmq and msgpack-c only: no LibTorch, no Python.
//
//   zmqmodels-load --connect ADDR --model NAME [--shape 1,784] [--inflight 64] [--sockets 4]
//                  [--seconds 3] [--version SEQ] [--connect-timeout 10] [--out FILE]
//
// Prints one JSON line: requests, seconds, req_s, p50_ms, p99_ms, batch (mean rows of the
// forward that answered), failures, errors by code, client_cpu_s (this process's own CPU, so a
// table can tell when the client is the limit), forwards (how many forwards of each size answered
// the requests, as the replies' `batch` says). `--out` also writes every request as
// [sent_s, latency_s, batch] (the rows bench_batching.py's Python clients write).
// Exit 0; 1 for a bad argument or a first reply that is an error (the node's one line);
// 2 when nothing answers the first request within --connect-timeout.
#include "generated.hpp"

#include <msgpack.hpp>
#include <zmq.h>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string connect, model, out;
  std::vector<int64_t> shape{1, 784};
  int inflight = 64, sockets = 4;
  double seconds = 3, connect_timeout = 10, drain = 30;  // a run, the first reply, the last replies
  uint64_t version = 0;
};

[[noreturn]] void fail(int code, const std::string& why) {
  std::fprintf(stderr, "zmqmodels-load: error: %s\n", why.c_str());
  std::exit(code);
}

const char* const kUsage =
    "usage: zmqmodels-load --connect ADDR --model NAME [--shape 1,784] [--inflight N] [--sockets S]\n"
    "                      [--seconds T] [--version SEQ] [--connect-timeout S] [--out FILE]\n";

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (i + 1 >= argc) fail(1, a + " needs a value (see --help)");
    std::string v = argv[++i];
    try {
      if (a == "--connect") o.connect = v;
      else if (a == "--model") o.model = v;
      else if (a == "--out") o.out = v;
      else if (a == "--inflight") o.inflight = std::stoi(v);
      else if (a == "--sockets") o.sockets = std::stoi(v);
      else if (a == "--seconds") o.seconds = std::stod(v);
      else if (a == "--connect-timeout") o.connect_timeout = std::stod(v);
      else if (a == "--version") o.version = std::stoull(v);
      else if (a == "--shape") {
        o.shape.clear();
        size_t at = 0;
        while (at <= v.size()) {
          size_t comma = v.find(',', at);
          o.shape.push_back(std::stoll(v.substr(at, comma - at)));
          if (comma == std::string::npos) break;
          at = comma + 1;
        }
      } else fail(1, "unknown option " + a + " (see --help)");
    } catch (const std::logic_error&) {
      fail(1, a + " " + v + ": not a number");
    }
  }
  if (o.connect.empty() || o.model.empty()) fail(1, "--connect and --model are required (see --help)");
  if (o.inflight < 1 || o.sockets < 1) fail(1, "--inflight and --sockets must be at least 1");
  o.sockets = std::min(o.sockets, o.inflight);
  for (int64_t d : o.shape)
    if (d < 1) fail(1, "--shape dimensions must be positive");
  return o;
}

// The INFER header of request `id` (docs/protocol.md §Inference, §Tensors): one float32 input.
std::string header(const Options& o, const std::string& id) {
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(buf);
  pk.pack_map(6);
  pk.pack("v"), pk.pack(zm::gen::PROTOCOL_VERSION);
  pk.pack("model"), pk.pack(o.model);
  pk.pack("id"), pk.pack(id);
  pk.pack("inputs");
  pk.pack_map(2), pk.pack("t"), pk.pack("tuple"), pk.pack("items"), pk.pack_array(1);
  pk.pack_map(4), pk.pack("t"), pk.pack("tensor"), pk.pack("dtype"), pk.pack("float32");
  pk.pack("shape"), pk.pack(o.shape), pk.pack("f"), pk.pack(0);
  pk.pack("version"), pk.pack(o.version);
  pk.pack("timeout_ms"), pk.pack(0);
  return std::string(buf.data(), buf.size());
}

struct Reply {
  bool ok = false;
  uint64_t id = UINT64_MAX;
  int64_t batch = 1;
  std::string code, message;
};

// A reply (empty delimiter, OK or ERROR, header, buffers...) -> what a table needs from it.
Reply read_reply(void* sock) {
  Reply r;
  std::vector<std::string> frames;
  int more = 1;
  while (more) {
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, sock, 0) < 0) fail(1, std::string("receive: ") + zmq_strerror(zmq_errno()));
    if (frames.size() < 3) frames.emplace_back(static_cast<char*>(zmq_msg_data(&m)), zmq_msg_size(&m));
    more = zmq_msg_more(&m);
    zmq_msg_close(&m);
  }
  if (frames.size() < 3) return r;
  r.ok = frames[1] == zm::gen::kind::OK;
  msgpack::object_handle oh = msgpack::unpack(frames[2].data(), frames[2].size());
  const msgpack::object& h = oh.get();
  if (h.type != msgpack::type::MAP) return r;
  for (uint32_t i = 0; i < h.via.map.size; ++i) {
    const auto& kv = h.via.map.ptr[i];
    if (kv.key.type != msgpack::type::STR) continue;
    std::string key(kv.key.via.str.ptr, kv.key.via.str.size);
    if (key == "id" && kv.val.type == msgpack::type::STR)
      r.id = std::strtoull(std::string(kv.val.via.str.ptr, kv.val.via.str.size).c_str(), nullptr, 10);
    else if (key == "batch" && kv.val.type == msgpack::type::POSITIVE_INTEGER) r.batch = kv.val.as<int64_t>();
    else if (key == "code" && kv.val.type == msgpack::type::STR) r.code = kv.val.as<std::string>();
    else if (key == "message" && kv.val.type == msgpack::type::STR) r.message = kv.val.as<std::string>();
  }
  return r;
}

struct Run {
  const Options& o;
  std::vector<void*> socks;
  std::string tensor;
  std::vector<Clock::time_point> sent;  // by id
  std::vector<std::pair<double, double>> rows;  // (sent s since start, latency s)
  std::vector<int64_t> batches;
  std::map<std::string, int64_t> errors;
  int64_t failures = 0, outstanding = 0;
  Clock::time_point t0 = Clock::now();

  void send(size_t s) {
    uint64_t id = sent.size();
    sent.push_back(Clock::now());
    std::string h = header(o, std::to_string(id));
    zmq_send(socks[s], "", 0, ZMQ_SNDMORE);
    zmq_send(socks[s], zm::gen::kind::INFER, std::strlen(zm::gen::kind::INFER), ZMQ_SNDMORE);
    zmq_send(socks[s], h.data(), h.size(), ZMQ_SNDMORE);
    zmq_send(socks[s], tensor.data(), tensor.size(), 0);
    ++outstanding;
  }

  void take(const Reply& r, Clock::time_point now) {
    if (r.id >= sent.size()) return;  // not one of ours
    --outstanding;
    if (!r.ok) {
      ++failures;
      ++errors[r.code.empty() ? "bad_reply" : r.code];
      return;
    }
    rows.emplace_back(std::chrono::duration<double>(sent[r.id] - t0).count(),
                      std::chrono::duration<double>(now - sent[r.id]).count());
    batches.push_back(r.batch);
  }
};

double pct(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

double cpu_s() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  void* ctx = zmq_ctx_new();
  Run run{o, {}, {}, {}, {}, {}, {}};
  int64_t elems = 1;
  for (int64_t d : o.shape) elems *= d;
  std::vector<float> x(static_cast<size_t>(elems));
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  for (float& f : x) f = normal(gen);
  run.tensor.assign(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float));
  for (int s = 0; s < o.sockets; ++s) {
    void* sock = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sock, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(sock, ZMQ_RCVHWM, &zero, sizeof zero);
    if (zmq_connect(sock, o.connect.c_str()) != 0)
      fail(1, "--connect " + o.connect + ": " + zmq_strerror(zmq_errno()));
    run.socks.push_back(sock);
  }
  // one request first: a wrong address or a wrong peer is one clear line, not a silent table
  run.send(0);
  zmq_pollitem_t first{run.socks[0], 0, ZMQ_POLLIN, 0};
  if (zmq_poll(&first, 1, static_cast<long>(o.connect_timeout * 1000)) <= 0)
    fail(2, "no reply from " + o.connect + " within " + std::to_string(static_cast<int>(o.connect_timeout)) +
                "s: is a zmqmodels node serving there?");
  Reply r0 = read_reply(run.socks[0]);
  if (!r0.ok) fail(1, o.connect + " answered " + r0.code + ": " + r0.message);
  run.sent.clear();
  run.outstanding = 0;

  double cpu0 = cpu_s();
  run.t0 = Clock::now();
  Clock::time_point end = run.t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
  for (int i = 0; i < o.inflight; ++i) run.send(static_cast<size_t>(i % o.sockets));
  std::vector<zmq_pollitem_t> items;
  for (void* s : run.socks) items.push_back({s, 0, ZMQ_POLLIN, 0});
  Clock::time_point give_up = end + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.drain));
  while (run.outstanding > 0) {
    Clock::time_point now = Clock::now();
    if (now >= give_up) break;
    if (zmq_poll(items.data(), static_cast<int>(items.size()), 100) < 0) break;
    for (size_t s = 0; s < items.size(); ++s) {
      if (!(items[s].revents & ZMQ_POLLIN)) continue;
      for (;;) {  // drain what is there: one poll per wake-up, not per reply
        int events = 0;
        size_t len = sizeof events;
        zmq_getsockopt(run.socks[s], ZMQ_EVENTS, &events, &len);
        if (!(events & ZMQ_POLLIN)) break;
        Reply r = read_reply(run.socks[s]);
        now = Clock::now();
        run.take(r, now);
        if (now < end) run.send(s);
      }
    }
  }
  double span = std::chrono::duration<double>(Clock::now() - run.t0).count();
  if (!run.rows.empty()) {
    double last = 0;
    for (auto& [at, lat] : run.rows) last = std::max(last, at + lat);
    span = last;
  }
  run.failures += run.outstanding;  // never answered
  if (run.outstanding) run.errors["no_reply"] += run.outstanding;
  std::vector<double> lat;
  double rows_sum = 0;
  for (size_t i = 0; i < run.rows.size(); ++i) {
    lat.push_back(run.rows[i].second);
    rows_sum += static_cast<double>(run.batches[i]);
  }
  std::map<int64_t, int64_t> by_batch;  // requests answered by a forward of that many rows
  for (int64_t b : run.batches) ++by_batch[b];
  std::string forwards = "{";  // forwards of each size: requests / rows
  for (auto& [b, n] : by_batch)
    forwards += (forwards.size() > 1 ? ", \"" : "\"") + std::to_string(b) + "\": " + std::to_string(n / std::max<int64_t>(b, 1));
  forwards += "}";
  std::string errors = "{";
  for (auto& [code, n] : run.errors) errors += (errors.size() > 1 ? ", \"" : "\"") + code + "\": " + std::to_string(n);
  errors += "}";
  double n = static_cast<double>(lat.size());
  std::printf("{\"requests\": %zu, \"seconds\": %.3f, \"req_s\": %.1f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
              "\"batch\": %.2f, \"failures\": %lld, \"errors\": %s, \"client_cpu_s\": %.3f, \"forwards\": %s}\n",
              lat.size(), span, span > 0 ? n / span : 0.0, pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3,
              n > 0 ? rows_sum / n : 0.0, static_cast<long long>(run.failures), errors.c_str(), cpu_s() - cpu0,
              forwards.c_str());
  if (!o.out.empty()) {
    FILE* f = std::fopen(o.out.c_str(), "w");
    if (f == nullptr) fail(1, "--out " + o.out + ": " + std::strerror(errno));
    std::fprintf(f, "{\"failures\": %lld, \"rows\": [", static_cast<long long>(run.failures));
    for (size_t i = 0; i < run.rows.size(); ++i)
      std::fprintf(f, "%s[%.6f, %.6f, %lld]", i ? ", " : "", run.rows[i].first, run.rows[i].second,
                   static_cast<long long>(run.batches[i]));
    std::fputs("]}\n", f);
    std::fclose(f);
  }
  for (void* s : run.socks) zmq_close(s);
  zmq_ctx_term(ctx);
  return 0;
}
