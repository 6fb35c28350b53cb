// The load path (the loader thread): verify a completed release's digest, cache it, load it,
// check it on its examples and swap it in; or load a held staged release once activated.
#include "node.hpp"

namespace zm {

namespace fs = std::filesystem;

void Loads::run(Job& j) { j.activate ? activate(j) : deliver(j); }

void Loads::deliver(Job& j) {
  auto m = j.c.manifest;
  Result r{Result::Rejected, m->name, m->label, "", m->seq};
  if (j.c.digest != m->archive_sha256) {
    r.reason = "archive sha256 mismatch";
    return post_(r);
  }
  double t0 = now_s();
  try {
    s_.cache.put(j.c);
  } catch (const Error& e) {
    r.kind = Result::StoreFailed, r.reason = e.what();
    r.kept = std::move(j.c);
    return post_(r);
  }
  r.cache_write_s = now_s() - t0;
  if (m->staged && !j.c.active) {  // held until the hub activates it here
    r.kind = Result::Held;
    return post_(r);
  }
  if (m->staged) s_.cache.activate(m->name, m->seq);  // fetched as the active one
  load(m, s_.args.load_from == "memory" ? "" : s_.cache.path(m->name, m->seq).string(), j.c.archive.get(), r);
}

void Loads::activate(Job& j) {
  Result r{Result::Rejected, j.name, "", "", j.seq};
  fs::path p = s_.cache.path(j.name, j.seq);
  std::shared_ptr<Manifest> m;
  try {
    std::string raw = read_all(fs::path(p).replace_extension(".manifest"));
    m = decode_manifest(raw.data(), raw.size(), s_.limits, true);
    s_.cache.activate(j.name, j.seq);
  } catch (const Error& e) {
    r.reason = std::string("activated, but its cache entry is gone: ") + e.what();
    return post_(r);
  }
  r.label = m->label;
  log("%s seq %llu activated", j.name.c_str(), static_cast<unsigned long long>(j.seq));
  std::string bytes;
  if (s_.args.load_from == "memory") bytes = read_all(p);
  load(m, s_.args.load_from == "memory" ? "" : p.string(), reinterpret_cast<const uint8_t*>(bytes.data()), r);
}

void Loads::load(const std::shared_ptr<Manifest>& m, const std::string& path, const uint8_t* data, Result& r) {
  Slot& slot = s_.slots.at(m->name);
  try {
    auto loaded = load_release(m, path, data, m->archive_bytes, s_.device);
    if (!loaded->batch_note.empty())
      log("%s seq %llu unbatched: %s", m->name.c_str(), static_cast<unsigned long long>(m->seq),
          loaded->batch_note.c_str());
    if (auto cur = slot.newest(); cur && cur->manifest->seq > m->seq) {  // never step back
      r.kind = Result::Rejected, r.reason = "superseded by seq " + std::to_string(cur->manifest->seq);
      return post_(r);
    }
    auto old = slot.offer(loaded);  // in-flight requests finish on the old one
    r.kind = Result::Loaded, r.load_s = loaded->load_s, r.check_s = loaded->check_s, r.format = loaded->format;
    post_(r);
    // free the old version here, once its last request ends (the slot's condition variable
    // says when), not on a serving thread
    if (!slot.retire(std::move(old), 30.0)) log("%s: a request still holds the old version after 30s", m->name.c_str());
    return;
  } catch (const Error& e) {
    r.kind = Result::Rejected, r.reason = e.what();
    s_.cache.discard(m->name, m->seq);
  }
  post_(r);
}

}  // namespace zm
