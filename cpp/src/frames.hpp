// The framing table of docs/protocol.md (the C++ twin of zmqmodels/protocol/framing.py's
// FRAMING): which frames each message kind this node sends or takes has; and the typed
// headers, read and written through msgpack-c's struct adaptors (unknown keys are ignored,
// missing ones keep their defaults, a wrong type or a string that is not UTF-8 is
// bad_message). No other file names a message kind.
#pragma once

#include "protocol.hpp"

#include <cstddef>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace zm {

enum class Kind {
  Manifest, Chunk, Heartbeat, Activate, FetchManifest, FetchChunks, Report, Error, Infer, Ok, Models, ModelsReply
};

constexpr size_t kAny = std::numeric_limits<size_t>::max();

struct Framing {
  Kind kind;
  const char* name;  // the first frame
  bool has_header;   // a msgpack map follows it
  size_t min_payload, max_payload;  // frames after the header (kAny: any number)
};

const Framing& framing(Kind k);
const char* kind_name(Kind k);
// The kind of a message from its first frame and its frame count, checked against the table
// (``frames`` counts every frame, the kind's included); throws Error("bad_message").
Kind kind_of(const std::string& first, size_t frames);

// -- typed headers ---------------------------------------------------------------------------
struct ChunkHeader {
  std::string name;
  uint64_t seq = 0, index = 0;
  int v = V;
  MSGPACK_DEFINE_MAP(name, seq, index, v);
};

struct Heartbeat {
  std::string hub, name;
  uint64_t seq = 0;
  std::string sha256, label;
  uint64_t active = 0;
  std::vector<std::string> path;
  int v = V;
  MSGPACK_DEFINE_MAP(hub, name, seq, sha256, label, active, path, v);
};

struct Activate {
  std::string name;
  uint64_t seq = 0;
  std::vector<std::string> nodes, labels;
  int v = V;
  MSGPACK_DEFINE_MAP(name, seq, nodes, labels, v);
};

struct FetchManifest {
  std::string name;
  uint64_t seq = 0;
  int v = V;
  MSGPACK_DEFINE_MAP(name, seq, v);
};

struct FetchChunks {
  std::string name;
  uint64_t seq = 0;
  std::vector<uint64_t> indices;
  int v = V;
  MSGPACK_DEFINE_MAP(name, seq, indices, v);
};

struct ErrorReply {
  std::string code, message, name;
  uint64_t seq = 0;
  bool retryable = false;
  int v = V;
  std::string id;
  std::vector<uint64_t> indices;
  MSGPACK_DEFINE_MAP(code, message, name, seq, retryable, v, id, indices);
};

struct Report {
  std::string node, model, state;
  uint64_t seq = 0;
  std::string label, reason, host;
  int64_t pid = 0;
  std::string device;
  int v = V;
  std::map<std::string, double> stages;
  uint64_t stages_seq = 0;
  std::vector<std::string> via;
  uint64_t staged = 0;
  std::vector<std::string> labels;
  uint64_t requests = 0, errors = 0;
  std::string how, how_reason, format;  // how release stages_seq was taken in, and the part served
  MSGPACK_DEFINE_MAP(node, model, state, seq, label, reason, host, pid, device, v, stages, stages_seq, via, staged,
                     labels, requests, errors, how, how_reason, format);
};

// INFER's header; `inputs` (the tensor-tree spec) points into the handle it was decoded from.
// [MODELS, header] on the inference socket: what the node serves now (answered at once).
struct ModelsRequest {
  int64_t v = V;
  std::string id;
  MSGPACK_DEFINE_MAP(v, id);
};

struct InferRequest {
  std::string model, id;
  msgpack::object inputs;
  uint64_t version = 0;  // the pinned seq (0: the newest served)
  int v = V;
  double timeout_ms = 0;
  MSGPACK_DEFINE_MAP(model, id, inputs, version, v, timeout_ms);
};

struct InferReply {
  std::string id, model, label;
  uint64_t seq = 0;
  std::string worker;
  msgpack::object outputs;
  double queue_ms = 0, infer_ms = 0;
  int v = V;
  int64_t batch = 1;  // rows in the forward that answered it
  MSGPACK_DEFINE_MAP(id, model, label, seq, worker, outputs, queue_ms, infer_ms, v, batch);
};

// Decode the header frame of `kind` into T: the protocol version checked, every string
// UTF-8. `keep` receives the handle when T points into it (InferRequest::inputs).
void check_strings(const msgpack::object& o);
template <class T>
T decode(Kind kind, const void* data, size_t len, msgpack::object_handle* keep = nullptr) {
  auto oh = unpack_header(data, len, kind_name(kind));
  check_strings(oh.get());
  T out;
  try {
    oh.get().convert(out);
  } catch (const msgpack::type_error& e) {
    throw Error("bad_message", std::string("bad ") + kind_name(kind) + " header: a field has the wrong type");
  }
  if (out.v != V) throw Error("bad_message", "protocol version " + std::to_string(out.v) + ", expected " + std::to_string(V));
  if (keep) *keep = std::move(oh);
  return out;
}

template <class T>
std::string encode(const T& header) {
  msgpack::sbuffer buf;
  msgpack::pack(buf, header);
  return std::string(buf.data(), buf.size());
}

// [kind, header] as strings, for the follower's `sends`.
template <class T>
std::vector<std::string> message(Kind kind, const T& header) {
  return {kind_name(kind), encode(header)};
}

}  // namespace zm
