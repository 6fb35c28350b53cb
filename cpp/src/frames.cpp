#include "frames.hpp"

namespace zm {

namespace {

// The kinds this node speaks, their arity from the Python framing table (generated.hpp).
Framing row(Kind kind, const char* name) {
  const gen::FrameArity* a = gen::frame_arity(name);
  if (a == nullptr) throw Error("internal", std::string("no framing for ") + name);
  return {kind, name, a->has_header, static_cast<size_t>(a->min_payload),
          a->max_payload == UINT64_MAX ? kAny : static_cast<size_t>(a->max_payload)};
}

const Framing kFraming[] = {
    row(Kind::Manifest, "MANIFEST"),   row(Kind::Chunk, "CHUNK"),    row(Kind::Heartbeat, "HEARTBEAT"),
    row(Kind::Activate, "ACTIVATE"),   row(Kind::FetchManifest, "FETCH_MANIFEST"),
    row(Kind::FetchChunks, "FETCH_CHUNKS"), row(Kind::Report, "REPORT"), row(Kind::Error, "ERROR"),
    row(Kind::Infer, "INFER"),         row(Kind::Ok, "OK"),          row(Kind::Models, "MODELS"),
    row(Kind::ModelsReply, "MODELS_REPLY"),
};

}  // namespace

const Framing& framing(Kind k) {
  for (const auto& f : kFraming)
    if (f.kind == k) return f;
  throw Error("internal", "no framing for a kind");
}

const char* kind_name(Kind k) { return framing(k).name; }

Kind kind_of(const std::string& first, size_t frames) {
  for (const auto& f : kFraming) {
    if (first != f.name) continue;
    size_t header = f.has_header ? 1 : 0;
    size_t payload = frames >= 1 + header ? frames - 1 - header : 0;
    if (frames < 1 + header || payload < f.min_payload || (f.max_payload != kAny && payload > f.max_payload))
      throw Error("bad_message", std::string(f.name) + " of " + std::to_string(frames) + " frame(s)");
    return f.kind;
  }
  throw Error("bad_message", "unexpected message " + utf8_prefix(first, 32));
}

void check_strings(const msgpack::object& o) {
  switch (o.type) {
    case msgpack::type::STR:
      if (!is_utf8(o.via.str.ptr, o.via.str.size)) throw Error("bad_message", "a string that is not UTF-8");
      break;
    case msgpack::type::ARRAY:
      for (uint32_t i = 0; i < o.via.array.size; ++i) check_strings(o.via.array.ptr[i]);
      break;
    case msgpack::type::MAP:
      for (uint32_t i = 0; i < o.via.map.size; ++i) {
        check_strings(o.via.map.ptr[i].key);
        check_strings(o.via.map.ptr[i].val);
      }
      break;
    default:
      break;
  }
}

}  // namespace zm
