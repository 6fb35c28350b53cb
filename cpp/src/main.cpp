// zmqmodels-node: follow a hub, verify releases, swap them in-process with no stall (LibTorch
// loads on a background thread while serving threads keep answering), serve REQ/REP inference
// with the Python node's codec, codes and messages. See README §C++ node.
#include "node.hpp"

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

const char* const kUsage =
    "usage: zmqmodels-node --model NAME [--model ...] --bind ADDR [--hub ADDR] [--device cpu|cuda[:N]]\n"
    "                      [--cache DIR] [--node-id ID] [--trust PUBKEY|FILE|DIR ...] [--threads N]\n"
    "                      [--label L ...] [--load-from file|memory]\n"
    "                      [--max-batch ROWS] [--batch-delay MICROSECONDS] [--no-batch NAME ...]\n"
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
    } else if (k == "--max-batch") {
      std::string v = val();
      if (!std::regex_match(v, std::regex("^[1-9][0-9]{0,4}$"))) bad_argument("--max-batch " + v + ": a number from 1 to 99999");
      a.max_batch = std::stoll(v);
    } else if (k == "--batch-delay") {
      std::string v = val();
      if (!std::regex_match(v, std::regex("^[0-9]{1,7}(\\.[0-9]+)?$")))
        bad_argument("--batch-delay " + v + ": microseconds, 0 or more");
      a.batch_delay_s = std::stod(v) / 1e6;
    } else if (k == "--no-batch") a.unbatched.push_back(val());
    else if (k == "--load-from") a.load_from = val();
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
    return node.run(g_stop);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "zmqmodels-node: %s\n", e.what());
    return 1;
  }
}
