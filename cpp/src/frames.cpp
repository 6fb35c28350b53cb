#include "frames.hpp"

namespace zm {

namespace {

const Framing kFraming[] = {
    {Kind::Manifest, "MANIFEST", false, 1, 2},   {Kind::Chunk, "CHUNK", true, 1, 1},
    {Kind::Heartbeat, "HEARTBEAT", true, 0, 0},  {Kind::Activate, "ACTIVATE", true, 0, 0},
    {Kind::FetchManifest, "FETCH_MANIFEST", true, 0, 0}, {Kind::FetchChunks, "FETCH_CHUNKS", true, 0, 0},
    {Kind::Report, "REPORT", true, 0, 0},        {Kind::Error, "ERROR", true, 0, 0},
    {Kind::Infer, "INFER", true, 0, kAny},       {Kind::Ok, "OK", true, 0, kAny},
    {Kind::Models, "MODELS", true, 0, 0},        {Kind::ModelsReply, "MODELS_REPLY", true, 0, 0},
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
