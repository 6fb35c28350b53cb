// The follow path (the follower thread): the hub's broadcasts and fetch replies into the
// Follower, and the loader's results back into it; what the Follower completed, activated or
// must write again becomes the loader's jobs.
#include "node.hpp"

namespace zm {

namespace {

std::string str(const zmq::message_t& m) { return std::string(static_cast<const char*>(m.data()), m.size()); }

}  // namespace

void Follows::on_broadcast(std::vector<zmq::message_t>& msg, double now) {
  if (msg.size() < 2) throw Error("bad_message", "broadcast of " + std::to_string(msg.size()) + " frame(s)");
  std::string topic = str(msg[0]);
  if (topic.size() == 1 && topic[0] == '\0') return;  // the hub's own beat: heard
  if (topic.empty() || topic.back() != '\0') throw Error("bad_message", "topic without its NUL");
  std::string name = topic.substr(0, topic.size() - 1);
  if (!f_.follows(name)) throw Error("bad_message", "broadcast on an unsubscribed topic");
  switch (kind_of(str(msg[1]), msg.size() - 1)) {
    case Kind::Manifest: {
      auto m = decode_manifest(msg[2].data(), msg[2].size(), s_.limits, false);
      if (m->name != name) throw Error("bad_message", "manifest for '" + m->name + "' on topic '" + name + "'");
      carry(f_.on_manifest(m, str(msg[2]), msg.size() == 4 ? str(msg[3]) : "", now, false));
      break;
    }
    case Kind::Chunk: {
      auto h = decode<ChunkHeader>(Kind::Chunk, msg[2].data(), msg[2].size());
      if (h.name != name) throw Error("bad_message", "chunk for another topic");
      carry(f_.on_chunk(name, h.seq, h.index, msg[3].data(), msg[3].size(), now, false));
      break;
    }
    case Kind::Heartbeat: {
      auto h = decode<Heartbeat>(Kind::Heartbeat, msg[2].data(), msg[2].size());
      if (h.name == name) carry(f_.on_beat(name, h.seq, h.sha256, h.active, now));
      break;
    }
    case Kind::Activate: {
      auto h = decode<Activate>(Kind::Activate, msg[2].data(), msg[2].size());
      if (h.name != name) throw Error("bad_message", "activation for another topic");
      carry(f_.on_activate(name, h.seq, h.nodes));
      break;
    }
    default:
      throw Error("bad_message", "unexpected broadcast " + utf8_prefix(str(msg[1]), 32));
  }
}

void Follows::on_reply(std::vector<zmq::message_t>& msg, double now) {
  if (msg.empty()) throw Error("bad_message", "empty reply");
  switch (kind_of(str(msg[0]), msg.size())) {
    case Kind::Manifest: {
      auto m = decode_manifest(msg[1].data(), msg[1].size(), s_.limits, false);
      carry(f_.on_manifest(m, str(msg[1]), msg.size() == 3 ? str(msg[2]) : "", now, true));
      break;
    }
    case Kind::Chunk: {
      auto h = decode<ChunkHeader>(Kind::Chunk, msg[1].data(), msg[1].size());
      carry(f_.on_chunk(h.name, h.seq, h.index, msg[2].data(), msg[2].size(), now, true));
      break;
    }
    case Kind::Error: {
      auto h = decode<ErrorReply>(Kind::Error, msg[1].data(), msg[1].size());
      if (h.code != "not_found") log("hub error %s: %s", h.code.c_str(), h.message.c_str());
      carry(f_.on_error(h.code, h.name, h.seq, h.indices));
      break;
    }
    default:
      throw Error("bad_message", "unexpected reply " + utf8_prefix(str(msg[0]), 32));
  }
}

void Follows::on_results(std::deque<Result>& done, double now) {
  for (auto& r : done) {
    if (r.cache_write_s > 0) f_.stage(r.name, r.seq, "cache_write", r.cache_write_s);
    switch (r.kind) {
      case Result::Loaded:
        s_.counts.at(r.name).requests = 0, s_.counts.at(r.name).errors = 0;
        f_.stage(r.name, r.seq, "load", r.load_s);
        f_.stage(r.name, r.seq, "check", r.check_s);
        if (Follow& st = f_.follow(r.name); st.stages_seq == r.seq) {  // the C++ node loads every release whole
          st.how = "load", st.format = r.format;
          st.how_reason = "the C++ node loads every release whole (no weights-only apply)";
        }
        carry(f_.set_state(r.name, State::Serving, r.seq, r.label));
        log("%s seq %llu serving (load %.3fs, check %.3fs)", r.name.c_str(), static_cast<unsigned long long>(r.seq),
            r.load_s, r.check_s);
        break;
      case Result::Rejected: {
        log("%s seq %llu rejected: %s", r.name.c_str(), static_cast<unsigned long long>(r.seq), r.reason.c_str());
        auto cur = s_.slots.at(r.name).newest();
        Follow& st = f_.follow(r.name);  // what is held again, before the rejection reports it
        st.state = cur ? State::Serving : State::Idle, st.seq = cur ? cur->manifest->seq : 0;
        st.label = cur ? cur->manifest->label : "", st.reason = "";
        carry(f_.reject(r.name, r.seq, r.label, r.reason));
        break;
      }
      case Result::Held:
        log("%s seq %llu staged (served once activated)", r.name.c_str(), static_cast<unsigned long long>(r.seq));
        carry(f_.held(r.name, r.seq));
        break;
      case Result::StoreFailed:
        log("%s seq %llu: cache write failed: %s", r.name.c_str(), static_cast<unsigned long long>(r.seq),
            r.reason.c_str());
        carry(f_.store_failed(r.name, r.seq, r.label, r.reason, now));
        unstored[r.name] = std::move(r.kept);
        break;
    }
  }
  done.clear();
}

void Follows::carry(Actions actions) {
  for (auto& a : actions) {
    switch (a.kind) {
      case Action::Kind::Send: sends.push_back(std::move(a.frames)); break;
      case Action::Kind::Deliver: completed_.push_back(std::move(a.done)); break;
      case Action::Kind::Unstage: unstaged_.emplace_back(a.name, a.seq); break;
      case Action::Kind::Rewrite: rewrites_.emplace_back(a.name, a.seq); break;
    }
  }
}

std::vector<Job> Follows::jobs() {
  std::vector<Job> jobs;
  std::vector<Completed> completed = std::move(completed_);
  completed_.clear();
  for (auto& c : completed) {
    if (!c.manifest->staged) carry(f_.set_state(c.manifest->name, State::Loading, c.manifest->seq, c.manifest->label));
    if (auto it = unstored.find(c.manifest->name); it != unstored.end() && it->second.manifest->seq < c.manifest->seq)
      unstored.erase(it);  // superseded
    Job j;
    j.c = std::move(c);
    jobs.push_back(std::move(j));
  }
  auto rewrites = std::move(rewrites_);
  rewrites_.clear();
  for (auto& [name, seq] : rewrites) {
    auto it = unstored.find(name);
    if (it == unstored.end() || it->second.manifest->seq != seq) continue;
    Job j;
    j.c = std::move(it->second);  // written again; the state stays Error until that succeeds
    unstored.erase(it);
    jobs.push_back(std::move(j));
  }
  auto unstaged = std::move(unstaged_);
  unstaged_.clear();
  for (auto& [name, seq] : unstaged) {
    Job j;
    j.activate = true, j.name = name, j.seq = seq;
    jobs.push_back(std::move(j));
  }
  return jobs;
}

}  // namespace zm
