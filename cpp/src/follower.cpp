#include "follower.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>

namespace zm {

namespace fs = std::filesystem;

const char* state_name(State s) {
  switch (s) {
    case State::Receiving: return "receiving";
    case State::Verified: return "verified";
    case State::Loading: return "loading";
    case State::Loaded: return "loaded";
    case State::Serving: return "serving";
    case State::Rejected: return "rejected";
    case State::Idle: return "idle";
    case State::Error: return "error";
    case State::Stopped: return "stopped";
  }
  return "error";
}

Follower::Follower(const std::vector<std::string>& models, Config config) : cfg_(std::move(config)) {
  for (const auto& n : models) {
    validate_name(n);
    models_[n].name = n;
  }
}

Follow& Follower::follow(const std::string& name) {
  auto it = models_.find(name);
  if (it == models_.end()) throw Error("bad_message", "not subscribed to '" + name + "'");
  return it->second;
}

Actions Follower::start(double now) {
  for (auto& [n, st] : models_) ask_manifest(st, 0, now);
  return take();
}

void Follower::known(const std::string& name, uint64_t seq, const std::string& label) {
  Follow& st = follow(name);
  st.done_seq = std::max(st.done_seq, seq);
  st.seq = seq;
  st.label = label;
  st.state = State::Serving;
}

Frames Follower::report(const Follow& st) const {
  Report r;
  r.node = cfg_.node_id, r.model = st.name, r.state = state_name(st.state), r.seq = st.seq, r.label = st.label;
  r.reason = utf8_prefix(st.reason, 500), r.host = cfg_.host, r.pid = cfg_.pid, r.device = cfg_.device;
  r.stages = st.stages, r.stages_seq = st.stages_seq, r.staged = st.staged, r.labels = cfg_.labels;
  r.requests = st.requests, r.errors = st.errors;
  r.how = st.how, r.how_reason = st.how_reason, r.format = st.format;
  return message(Kind::Report, r);
}

Actions Follower::report_all() {
  for (auto& [n, st] : models_) send(report(st));
  return take();
}

Actions Follower::stopping() {
  for (auto& [n, st] : models_) {
    State was = st.state;
    std::string why = st.reason;
    st.state = State::Stopped, st.reason.clear();
    send(report(st));
    st.state = was, st.reason = why;
  }
  return take();
}

void Follower::ask_manifest(Follow& st, uint64_t seq, double now, bool exact) {
  int64_t s = static_cast<int64_t>(seq);
  if ((exact ? st.asked_seq == s : st.asked_seq >= s) && now - st.asked_at < cfg_.fetch_timeout_s) return;
  st.asked_seq = static_cast<int64_t>(seq);
  st.asked_at = now;
  ++stats["fetch_manifest"];
  FetchManifest req;
  req.name = st.name, req.seq = seq;
  send(message(Kind::FetchManifest, req));
}

void Follower::refuse(Follow& st, const Manifest& m, const std::string& raw, const std::string& why) {
  ++stats["refused"];
  uint64_t digest = xxh3(raw.data(), raw.size());
  st.refused_release = {m.seq, m.archive_sha256};
  if (digest == st.refused) return;  // reported once per distinct manifest
  st.refused = digest;
  rejection(st, m.seq, m.label, why);
}

void Follower::rejection(Follow& st, uint64_t seq, const std::string& label, const std::string& reason) {
  Follow shown = Follow();
  shown.name = st.name;
  shown.state = State::Rejected;
  shown.seq = seq;
  shown.label = label;
  shown.reason = reason;
  shown.staged = st.staged;
  shown.requests = st.requests;
  shown.errors = st.errors;
  send(report(shown));
  send(report(st));  // then what is held again
}

Actions Follower::on_manifest(std::shared_ptr<Manifest> m, std::string raw, std::string signature, double now,
                              bool fetched) {
  Follow& st = follow(m->name);
  if (fetched) st.asked_seq = -1;
  bool wanted = m->seq == st.want && !st.as;  // the active release, older than what is held
  if (!wanted && (m->seq <= st.done_seq || st.rejected.count(m->seq) || (st.as && st.as->m->seq >= m->seq))) {
    ++stats["stale_manifest"];
    return take();
  }
  try {  // before anything is allocated for it
    check_manifest(*m, cfg_.limits);
    cfg_.trust.verify(*m, raw, signature);
  } catch (const Error& e) {
    if (e.code == "too_large" || e.code == "bad_signature" || e.code == "bad_release") {
      refuse(st, *m, raw, e.what());
      return take();
    }
    throw;
  }
  auto a = std::make_unique<Assembly>();
  a->m = m;
  a->raw = std::move(raw);
  a->signature = std::move(signature);
  a->buf = std::shared_ptr<uint8_t[]>(new uint8_t[std::max<uint64_t>(m->archive_bytes, 1)]);
  for (uint64_t i = 0; i < m->chunk_count; ++i) a->missing.insert(i);
  a->started = a->last_progress = now;
  a->broadcast_manifest = !fetched;
  if (st.retry_seq && st.retry_seq < m->seq) st.retry_at = 0, st.retry_seq = 0, st.retries = 0;  // superseded
  st.as = std::move(a);
  ++stats["manifests"];
  if (!m->staged) {
    st.state = State::Receiving, st.seq = m->seq, st.label = m->label, st.reason = "";
    send(report(st));
  }
  if (st.as->missing.empty()) complete(st, now);
  return take();
}

Actions Follower::on_chunk(const std::string& name, uint64_t seq, uint64_t index, const void* payload, size_t len,
                           double now, bool fetched) {
  Follow& st = follow(name);
  Assembly* a = st.as.get();
  if (!a || a->m->seq != seq) {
    ++stats["chunk_unexpected"];
    if (seq > st.done_seq && !st.rejected.count(seq) && (!a || seq > a->m->seq)) ask_manifest(st, seq, now);
    return take();
  }
  if (index >= a->m->chunk_count) throw Error("bad_message", "chunk " + std::to_string(index) + " out of range");
  if (!fetched) {
    if (index > a->next_bcast) {  // the in-order broadcast skipped chunks: they were dropped
      a->repairing = true;
      ++stats["broadcast_gaps"];
    }
    a->next_bcast = std::max(a->next_bcast, index + 1);
  }
  a->requested.erase(index);
  if (!a->missing.count(index)) {
    ++stats["chunk_duplicate"];
  } else {
    try {
      decompress_chunk(*a->m, index, payload, len, a->buf.get());
      a->missing.erase(index);
      a->last_progress = now;
      ++a->received;
      stats["bytes_received"] += len;
      ++stats[fetched ? "chunks_fetched" : "chunks_broadcast"];
      while (a->hashed < a->m->chunk_count && !a->missing.count(a->hashed)) {  // the in-order prefix
        auto [start, length] = a->m->span(a->hashed);
        a->sha->update(a->buf.get() + start, length);
        ++a->hashed;
      }
    } catch (const Error& e) {
      if (e.code != "integrity") throw;
      ++stats["chunk_corrupt"];
      a->corrupt_fetches += fetched;
      if (a->corrupt_fetches >= gen::CORRUPT_FETCHES_MAX) {  // the hub's own copy is bad: stop asking
        auto m = a->m;
        st.as.reset();
        st.rejected.insert(seq);
        rejection(st, m->seq, m->label,
                  std::string(e.what()) + ", from the hub " + std::to_string(gen::CORRUPT_FETCHES_MAX) +
                      " times: corrupt at its source");
        return take();
      }
      a->repairing = true;
    }
  }
  if (a->missing.empty()) { complete(st, now); return take(); }
  if (a->repairing) pump(st, now);
  return take();
}

void Follower::complete(Follow& st, double now) {
  std::unique_ptr<Assembly> a = std::move(st.as);
  st.done_seq = std::max(st.done_seq, a->m->seq);  // an older wanted seq leaves it
  if (st.want == a->m->seq) st.want = 0;
  Completed c;
  c.active = a->m->staged && a->m->seq <= st.active;
  c.manifest = a->m;
  c.raw = std::move(a->raw);
  c.signature = std::move(a->signature);
  c.archive = a->buf;
  c.digest = a->sha->hex();
  c.receive_s = now - a->started;
  stage(st.name, a->m->seq, "receive", c.receive_s);
  out_.push_back(Action{Action::Kind::Deliver, {}, std::move(c), "", 0});
}

Actions Follower::on_beat(const std::string& name, uint64_t seq, const std::string& sha256, uint64_t active, double now) {
  auto it = models_.find(name);
  if (it == models_.end()) return take();
  Follow& st = it->second;
  if (seq == st.refused_release.first && sha256 == st.refused_release.second) return take();  // refused: first
  if (active > st.active) {
    st.active = active;
    unstage(st);
  }
  uint64_t coming = st.as ? st.as->m->seq : 0;
  if (st.seq < st.active && st.active < st.done_seq && st.staged > st.active && !st.rejected.count(st.active) &&
      !coming) {  // serves older than the fleet, holds newer: take the active one
    st.want = st.active;
    size_t before = out_.size();
    ask_manifest(st, st.active, now, true);
    stats["fetch_active"] += out_.size() - before;
  }
  if (st.as && seq == st.as->m->seq && !st.as->stalled && !st.as->missing.empty()) {
    st.as->stalled = st.as->repairing = true;  // the sender beats after all its chunks: lost
    ++stats["repairs"];
    pump(st, now);
  }
  if (seq > st.done_seq && !st.rejected.count(seq) && coming < seq) ask_manifest(st, seq, now);
  return take();
}

Actions Follower::on_activate(const std::string& name, uint64_t seq, const std::vector<std::string>& nodes) {
  auto it = models_.find(name);
  if (it == models_.end()) return take();
  Follow& st = it->second;
  if ((!nodes.empty() && std::find(nodes.begin(), nodes.end(), cfg_.node_id) == nodes.end()) || seq <= st.active) return take();
  st.active = seq;
  ++stats["activations"];
  unstage(st);
  return take();
}

void Follower::unstage(Follow& st) {
  if (!st.staged || st.staged > st.active) return;
  out_.push_back(Action{Action::Kind::Unstage, {}, {}, st.name, st.staged});
  st.staged = 0;
}

Actions Follower::held(const std::string& name, uint64_t seq) {
  Follow& st = follow(name);
  if (seq <= st.seq && st.state == State::Serving) return take();
  st.staged = std::max(st.staged, seq);
  unstage(st);
  send(report(st));
  return take();
}

Actions Follower::on_error(const std::string& code, const std::string& name, uint64_t seq,
                           const std::vector<uint64_t>& indices) {
  ++stats["hub_error_" + code];
  auto it = models_.find(name);
  if (it == models_.end()) return take();
  Follow& st = it->second;
  st.asked_seq = -1;
  if (st.as && seq == st.as->m->seq) {
    if (code == "not_found") {
      ++stats["abandoned"];
      st.as.reset();
    } else {
      for (auto i : indices) st.as->requested.erase(i);
    }
  }
  return take();
}

bool Follower::stalls(const Assembly& a, double now) const {
  if (!a.broadcast_manifest) return now - a.last_progress > cfg_.repair_idle_s;
  double mean = a.received ? (a.last_progress - a.started) / static_cast<double>(a.received) : 0.0;
  return now - a.last_progress > gen::STALL_FACTOR * std::max(cfg_.repair_idle_s, mean);
}

Actions Follower::tick(double now) {
  for (auto& [n, st] : models_) {
    if (st.retry_at > 0 && now >= st.retry_at) {
      st.retry_at = 0;
      ++stats["store_retries"];
      out_.push_back(Action{Action::Kind::Rewrite, {}, {}, st.name, st.retry_seq});
    }
    if (Assembly* a = st.as.get()) {
      if (!a->stalled && stalls(*a, now)) {
        a->stalled = a->repairing = true;
        ++stats["repairs"];
      }
      if (a->repairing) pump(st, now);
    }
  }
  if (hub_seen > 0 && now - std::max(hub_seen, reasked_) > cfg_.hub_ttl_s) {
    reasked_ = now;
    ++stats["hub_silent"];
    for (auto& [n, st] : models_) ask_manifest(st, 0, now);
  }
  return take();
}

void Follower::pump(Follow& st, double now) {
  Assembly* a = st.as.get();
  if (!a) return;
  for (auto it = a->requested.begin(); it != a->requested.end();)
    it = now - it->second > cfg_.fetch_timeout_s ? a->requested.erase(it) : std::next(it);
  int64_t room = static_cast<int64_t>(cfg_.limits.fetch_credit) - static_cast<int64_t>(a->requested.size());
  uint64_t below = a->stalled ? a->m->chunk_count : a->next_bcast;
  std::vector<uint64_t> want;
  for (auto i : a->missing) {
    if (room <= 0 || i >= below) break;
    if (a->requested.count(i)) continue;
    want.push_back(i);
    a->requested[i] = now;
    --room;
  }
  if (want.empty()) return;
  stats["fetch_chunks"] += want.size();
  FetchChunks req;
  req.name = st.name, req.seq = a->m->seq, req.indices = std::move(want);
  send(message(Kind::FetchChunks, req));
}

Actions Follower::set_state(const std::string& name, State state, uint64_t seq, const std::string& label,
                            const std::string& reason) {
  Follow& st = follow(name);
  st.state = state, st.seq = seq, st.label = label, st.reason = reason;
  send(report(st));
  return take();
}

Actions Follower::reject(const std::string& name, uint64_t seq, const std::string& label, const std::string& reason) {
  Follow& st = follow(name);
  st.rejected.insert(seq);
  rejection(st, seq, label, reason);
  return take();
}

Actions Follower::store_failed(const std::string& name, uint64_t seq, const std::string& label, const std::string& why,
                               double now) {
  Follow& st = follow(name);
  if (st.as && st.as->m->seq > seq) return take();  // a newer release is on its way: it supersedes this one
  double delay = std::min(60.0, static_cast<double>(1u << std::min(st.retries, 6)));
  ++st.retries;
  st.retry_at = now + delay;
  st.retry_seq = seq;
  std::ostringstream r;
  r << "cache write failed: " << why << "; kept in memory, writing again in " << static_cast<int>(delay) << "s";
  st.state = State::Error, st.seq = seq, st.label = label, st.reason = r.str();
  send(report(st));
  return take();
}

void Follower::stage(const std::string& name, uint64_t seq, const std::string& key, double seconds) {
  Follow& st = follow(name);
  if (seq > st.stages_seq) st.stages.clear(), st.stages_seq = seq, st.how.clear(), st.how_reason.clear(), st.format.clear();
  if (seq == st.stages_seq) st.stages[key] = std::round(seconds * 1e4) / 1e4;
}

void Follower::count(const std::string& name, uint64_t requests, uint64_t errors) {
  Follow& st = follow(name);
  st.requests = requests, st.errors = errors;
}

// -- cache -------------------------------------------------------------------------------------
std::string read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw Error("store", "cannot read " + p.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The file's size and sha256 against the manifest, read in 8 MiB blocks (never whole).
static bool file_matches(const fs::path& path, const Manifest& m) {
  std::error_code ec;
  if (fs::file_size(path, ec) != m.archive_bytes || ec) return false;
  std::ifstream f(path, std::ios::binary);
  std::vector<char> block(8 << 20);
  Sha256 h;
  while (f) {
    f.read(block.data(), static_cast<std::streamsize>(block.size()));
    h.update(block.data(), static_cast<size_t>(f.gcount()));
  }
  return h.hex() == m.archive_sha256;
}

static void atomic_write(const fs::path& path, const void* data, size_t len) {
  fs::path tmp = path.parent_path() / (".tmp-" + path.filename().string() + "-" + std::to_string(getpid()));
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw Error("store", "cannot write " + tmp.string() + ": " + std::strerror(errno));
  const char* p = static_cast<const char*>(data);
  size_t left = len;
  while (left) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw Error("store", "cannot write " + path.string() + ": " + std::strerror(err));
    }
    p += n, left -= static_cast<size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw Error("store", "cannot write " + path.string() + ": " + std::strerror(err));
  }
}

Cache::~Cache() {
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

void Cache::lock() {
  std::error_code ec;
  fs::create_directories(root_, ec);
  if (ec) throw Error("store", "cannot create cache " + root_.string() + ": " + ec.message());
  fs::path p = root_ / ".lock";
  int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw Error("store", "cannot open " + p.string() + ": " + std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    char buf[128] = {0};
    ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
    ::close(fd);
    std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "another process";
    throw Error("store", "cache " + root_.string() + " is in use by " + holder + ": give each node its own --cache");
  }
  std::string me = "pid " + std::to_string(::getpid());
  // the lock is what counts; the pid only names the holder in the other process's message
  if (::ftruncate(fd, 0) == 0) {
    ssize_t written = ::pwrite(fd, me.data(), me.size(), 0);
    (void)written;
  }
  lock_fd_ = fd;
}

fs::path Cache::path(const std::string& name, uint64_t seq) const {
  char file[32];
  std::snprintf(file, sizeof file, "%012llu.pt", static_cast<unsigned long long>(seq));
  return root_ / name / file;
}

std::vector<uint64_t> Cache::seqs(const std::string& name) const {
  std::vector<uint64_t> out;
  std::error_code ec;
  static const std::regex re("^[0-9]+$");
  for (const auto& e : fs::directory_iterator(root_ / name, ec)) {
    if (e.path().extension() == ".manifest" && std::regex_match(e.path().stem().string(), re))
      out.push_back(std::stoull(e.path().stem().string()));
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool Cache::is_active(const Manifest& m) const {
  return !m.staged || fs::exists(fs::path(path(m.name, m.seq)).replace_extension(".active"));
}

void Cache::put(const Completed& c, size_t keep) {
  const Manifest& m = *c.manifest;
  std::error_code ec;
  fs::create_directories(root_ / m.name, ec);
  if (ec) throw Error("store", "cannot write cache " + (root_ / m.name).string() + ": " + ec.message());
  fs::path p = path(m.name, m.seq);
  atomic_write(p, c.archive.get(), m.archive_bytes);
  fs::path sig = fs::path(p).replace_extension(".sig");
  if (!c.signature.empty()) atomic_write(sig, c.signature.data(), c.signature.size());
  else fs::remove(sig, ec);
  atomic_write(fs::path(p).replace_extension(".manifest"), c.raw.data(), c.raw.size());
  auto all = seqs(m.name);
  uint64_t serving = 0;  // never push out the newest release that may be served
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    try {
      auto raw = read_all(fs::path(path(m.name, *it)).replace_extension(".manifest"));
      if (is_active(*decode_manifest(raw.data(), raw.size(), Limits(), false))) {
        serving = *it;
        break;
      }
    } catch (const Error&) {
    }
  }
  if (all.size() > keep)
    for (size_t i = 0; i + keep < all.size(); ++i)
      if (all[i] != serving) discard(m.name, all[i]);
}

void Cache::activate(const std::string& name, uint64_t seq) {
  fs::path p = fs::path(path(name, seq)).replace_extension(".active");
  atomic_write(p, "", 0);
}

void Cache::discard(const std::string& name, uint64_t seq) {
  std::error_code ec;
  fs::path p = path(name, seq);
  for (const char* ext : {".manifest", ".sig", ".active", ".stamp"}) fs::remove(fs::path(p).replace_extension(ext), ec);
  fs::remove(p, ec);
}

std::optional<std::pair<std::shared_ptr<Manifest>, std::string>> Cache::latest(const std::string& name,
                                                                               const Trust& trust,
                                                                               const Limits& limits, bool staged) {
  auto all = seqs(name);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    fs::path p = path(name, *it);
    try {
      std::string raw = read_all(fs::path(p).replace_extension(".manifest"));
      auto m = decode_manifest(raw.data(), raw.size(), limits, true);
      if (!staged && !is_active(*m)) continue;
      fs::path sigp = fs::path(p).replace_extension(".sig");
      std::string sig = fs::exists(sigp) ? read_all(sigp) : std::string();
      trust.verify(*m, raw, sig);
      if (!file_matches(p, *m)) throw Error("integrity", "cached " + p.string() + " does not match its manifest");
      return std::make_pair(m, p.string());
    } catch (const Error& e) {
      std::fprintf(stderr, "cache: discarding %s seq %llu: %s\n", name.c_str(), static_cast<unsigned long long>(*it),
                   e.what());
      discard(name, *it);
    }
  }
  return std::nullopt;
}

Cache::Startup Cache::startup(const std::string& name, const Trust& trust, const Limits& limits) {
  Startup out;
  out.serve = latest(name, trust, limits, true);  // the newest, staged or not
  if (out.serve && !is_active(*out.serve->first)) {  // staged, not activated: hold it
    out.held = out.serve->first->seq;
    out.serve = latest(name, trust, limits, false);
  }
  return out;
}

std::string pub_endpoint(const std::string& addr) {
  static const std::regex tcp(R"(^tcp://(.+):(\d+)$)");
  std::smatch m;
  if (std::regex_match(addr, m, tcp)) return "tcp://" + m[1].str() + ":" + std::to_string(std::stoi(m[2].str()) + 1);
  if (addr.rfind("ipc://", 0) == 0 || addr.rfind("inproc://", 0) == 0) return addr + ".pub";
  throw Error("bad_request", "cannot use hub address '" + addr + "': use tcp://HOST:PORT or ipc://PATH");
}

}  // namespace zm
