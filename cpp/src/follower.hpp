// Following a hub (docs/protocol.md §Node behaviour): the C++ twin of the Python cores
// zmqmodels/core/intake.py (the intake and repair rules: stale drop, limits, trust, gap,
// end-of-broadcast beat, stall, corrupt-fetch counting, re-ask, credit) and
// zmqmodels/core/assembly.py (the node's follow state: staged hold, reports, cache-write
// retries, the active fetch behind a held staged release), fed events and the clock, each
// returning its Actions (what to send, deliver, unstage, write again: the host carries them
// out, as the Python shells carry the core's); and the node's cache directory (the Python node's layout, so either node can
// take over the other's). Unlike the Python node it takes no deltas: it reuses no span of an
// archive it holds (chunk_raw_xxh3) and drops PATCH broadcasts, fetching those chunks whole, so
// every release costs its whole size. The cases both follow are tests/vectors/follow.json (run
// by cpp/tests/core_tests.cpp and tests/unit/test_vectors.py); timers, thresholds, limits and
// codes come from generated.hpp.
#pragma once

#include "frames.hpp"
#include "protocol.hpp"

#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace zm {

using Frames = std::vector<std::string>;

struct Completed {
  std::shared_ptr<Manifest> manifest;
  std::string raw, signature;
  std::shared_ptr<uint8_t[]> archive;
  std::string digest;  // sha256 of the assembled archive (to check against the manifest)
  double receive_s = 0;
  bool active = false;  // staged and already activated here (fetched as the active one): serve, not hold
};

// One release being received into its archive buffer.
struct Assembly {
  std::shared_ptr<Manifest> m;
  std::string raw, signature;
  std::shared_ptr<uint8_t[]> buf;
  std::set<uint64_t> missing;
  std::map<uint64_t, double> requested;
  double started = 0, last_progress = 0;
  bool repairing = false, stalled = false, broadcast_manifest = true;
  uint64_t received = 0, next_bcast = 0, hashed = 0;
  int corrupt_fetches = 0;
  std::unique_ptr<Sha256> sha = std::make_unique<Sha256>();
};

// What a node reports for one model (zmqmodels.protocol.ModelState; "lost" is the hub's).
enum class State { Receiving, Verified, Loading, Loaded, Serving, Rejected, Idle, Error, Stopped };
const char* state_name(State s);

struct Follow {
  std::string name;
  uint64_t done_seq = 0;
  std::set<uint64_t> rejected;
  uint64_t refused = 0;                            // XXH3 of the last refused manifest
  std::pair<uint64_t, std::string> refused_release;  // (seq, sha256) of that manifest
  std::unique_ptr<Assembly> as;
  int64_t asked_seq = -1;
  double asked_at = 0, retry_at = 0;
  uint64_t retry_seq = 0;
  int retries = 0;
  // what is reported
  State state = State::Idle;
  std::string label, reason;
  uint64_t seq = 0, staged = 0, active = 0, requests = 0, errors = 0;
  uint64_t want = 0;  // an older seq to fetch all the same: the active one, behind a held staged one
  std::map<std::string, double> stages;
  uint64_t stages_seq = 0;
  std::string how, how_reason, format;  // how release stages_seq was taken in; the part served
};

// What the follower asks of its host, as the Python core's actions (zmqmodels/core/assembly.py:
// Send, Deliver, Unstage, RetryStore): each event returns them; the host carries them out.
struct Action {
  enum class Kind { Send, Deliver, Unstage, Rewrite } kind = Kind::Send;
  Frames frames;      // Send: to the hub (DEALER)
  Completed done;     // Deliver: assembled; verify, cache, load (or hold, when staged)
  std::string name;   // Unstage: a held staged release now activated; Rewrite: a failed cache
  uint64_t seq = 0;   // write to try again
};
using Actions = std::vector<Action>;

struct Config {
  std::string node_id, host, device;
  int64_t pid = 0;
  std::vector<std::string> labels;
  Limits limits;
  Trust trust;
  double repair_idle_s = gen::REPAIR_IDLE_S, hub_ttl_s = gen::HUB_TTL_S, fetch_timeout_s = gen::FETCH_TIMEOUT_S;
};

class Follower {
 public:
  Follower(const std::vector<std::string>& models, Config config);

  // -- events: each returns what the host is to do --
  [[nodiscard]] Actions start(double now);
  void heard(double now) { hub_seen = now; }
  [[nodiscard]] Actions on_manifest(std::shared_ptr<Manifest> m, std::string raw, std::string signature, double now,
                                    bool fetched);
  [[nodiscard]] Actions on_chunk(const std::string& name, uint64_t seq, uint64_t index, const void* payload,
                                 size_t len, double now, bool fetched);
  [[nodiscard]] Actions on_beat(const std::string& name, uint64_t seq, const std::string& sha256, uint64_t active,
                                double now);
  [[nodiscard]] Actions on_activate(const std::string& name, uint64_t seq, const std::vector<std::string>& nodes);
  [[nodiscard]] Actions on_error(const std::string& code, const std::string& name, uint64_t seq,
                                 const std::vector<uint64_t>& indices);
  [[nodiscard]] Actions tick(double now);

  // -- what became of a release --
  [[nodiscard]] Actions set_state(const std::string& name, State state, uint64_t seq, const std::string& label,
                                  const std::string& reason = "");
  [[nodiscard]] Actions reject(const std::string& name, uint64_t seq, const std::string& label,
                               const std::string& reason);
  [[nodiscard]] Actions held(const std::string& name, uint64_t seq);  // a staged release is cached: hold it
  // A cache write failed: the host keeps the verified release and writes it again when
  // `rewrites` names it (back-off 1 s doubling to 60 s); it is not fetched again, and the
  // state stays Error with `why` until a write succeeds (as zmqmodels/core/assembly.py).
  [[nodiscard]] Actions store_failed(const std::string& name, uint64_t seq, const std::string& label,
                                     const std::string& why, double now);
  void stage(const std::string& name, uint64_t seq, const std::string& key, double seconds);
  void count(const std::string& name, uint64_t requests, uint64_t errors);
  void known(const std::string& name, uint64_t seq, const std::string& label);  // served from the cache
  [[nodiscard]] Actions report_all();
  // the last reports of a node that stops cleanly: "stopped", with what it served
  [[nodiscard]] Actions stopping();
  Follow& follow(const std::string& name);
  bool follows(const std::string& name) const { return models_.count(name) > 0; }

  std::map<std::string, uint64_t> stats;
  double hub_seen = 0;

 private:
  Actions take() { return std::exchange(out_, {}); }
  void send(Frames f) { out_.push_back(Action{Action::Kind::Send, std::move(f), {}, "", 0}); }
  Frames report(const Follow& st) const;
  void ask_manifest(Follow& st, uint64_t seq, double now, bool exact = false);
  void pump(Follow& st, double now);
  void complete(Follow& st, double now);
  void refuse(Follow& st, const Manifest& m, const std::string& raw, const std::string& why);
  void rejection(Follow& st, uint64_t seq, const std::string& label, const std::string& reason);
  void unstage(Follow& st);
  bool stalls(const Assembly& a, double now) const;

  std::map<std::string, Follow> models_;
  Config cfg_;
  Actions out_;  // what the event being handled asks for (taken when it returns)
  double reasked_ = 0;
};

// The node's cache: DIR/<name>/<seq:012d>.pt, .sig, .manifest (and .active for an activated
// staged release), written atomically in that order.
class Cache {
 public:
  explicit Cache(std::filesystem::path root) : root_(std::move(root)) {}
  ~Cache();
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;
  // Hold the directory for this process: flock(DIR/.lock), as the Python node does, so either
  // refuses the other. Throws Error("store", "cache DIR is in use by pid N: ...").
  void lock();
  std::filesystem::path path(const std::string& name, uint64_t seq) const;
  void put(const Completed& c, size_t keep = 2);  // throws Error("store") on a failed write
  void activate(const std::string& name, uint64_t seq);
  void discard(const std::string& name, uint64_t seq);
  std::vector<uint64_t> seqs(const std::string& name) const;
  // The newest entry of `name` that may be served (staged ones only once activated, unless
  // `staged`), whose signature `trust` accepts and whose archive matches its sha256.
  std::optional<std::pair<std::shared_ptr<Manifest>, std::string>> latest(const std::string& name, const Trust& trust,
                                                                           const Limits& limits, bool staged = false);
  bool is_active(const Manifest& m) const;
  // What a node starting on this cache serves of `name` and the seq it holds staged (0: none):
  // the newest verified entry; if it is staged and not activated, it is held and the newest
  // activated one below it is served (zmqmodels.release.cache.Cache.startup, the same rule).
  struct Startup {
    std::optional<std::pair<std::shared_ptr<Manifest>, std::string>> serve;
    uint64_t held = 0;
  };
  Startup startup(const std::string& name, const Trust& trust, const Limits& limits);

 private:
  std::filesystem::path root_;
  int lock_fd_ = -1;
};

std::string read_all(const std::filesystem::path& p);
std::string pub_endpoint(const std::string& addr);

}  // namespace zm
