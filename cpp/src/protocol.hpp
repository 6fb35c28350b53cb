// The wire protocol of docs/protocol.md: msgpack headers, the manifest and its checks,
// digests and signatures, chunk decompression, the tensor codec. Shared by the node binary
// and its tests; nothing here owns a socket or a thread.
#pragma once

#include <torch/script.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <msgpack.hpp>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "generated.hpp"

namespace zm {

constexpr int V = gen::PROTOCOL_VERSION;

// An error with the protocol's code (bad_request, bad_input, bad_release, integrity, ...).
struct Error : std::runtime_error {
  std::string code;
  Error(std::string c, const std::string& message) : std::runtime_error(message), code(std::move(c)) {}
};

struct Limits {  // zmqmodels.defaults.Limits' defaults (generated.hpp)
  uint64_t max_archive_bytes = gen::MAX_ARCHIVE_BYTES;
  uint64_t max_chunks = gen::MAX_CHUNKS;
  uint64_t max_chunk_bytes = gen::MAX_CHUNK_BYTES;
  uint64_t max_manifest_bytes = gen::MAX_MANIFEST_BYTES;
  uint64_t max_request_bytes = gen::MAX_REQUEST_BYTES;
  uint64_t max_request_tensors = gen::MAX_REQUEST_TENSORS;
  uint64_t fetch_credit = gen::FETCH_CREDIT;
  uint64_t max_frame_bytes() const { return std::max(max_chunk_bytes + (64 << 10), max_manifest_bytes); }
};

double now_s();  // monotonic seconds

// msgpack str is UTF-8 (Python peers refuse anything else): check what peers send, and cut
// what we send at a character boundary.
bool is_utf8(const char* p, size_t n);
std::string utf8_prefix(const std::string& s, size_t max_bytes);

// -- reading msgpack maps --------------------------------------------------------------------
// A decoded msgpack map: unknown keys are ignored, a key of the wrong type is bad_message.
class Map {
 public:
  explicit Map(const msgpack::object& o, const char* what = "header");
  const msgpack::object* get(const char* key) const;
  std::string str(const char* key, const std::string& dflt = "") const;
  uint64_t u64(const char* key, uint64_t dflt = 0) const;
  int64_t i64(const char* key, int64_t dflt = 0) const;
  double f64(const char* key, double dflt = 0) const;
  bool boolean(const char* key, bool dflt = false) const;
  std::vector<std::string> strs(const char* key) const;
  std::vector<uint64_t> u64s(const char* key) const;

 private:
  const msgpack::object* obj_;
  std::string what_;
};

msgpack::object_handle unpack_header(const void* data, size_t len, const char* kind);

// -- writing headers ---------------------------------------------------------------------------
// Packs a map of (key, value) pairs; values are packed with msgpack's adaptors.
class MapWriter {
 public:
  explicit MapWriter(size_t n) : pk_(buf_) { pk_.pack_map(static_cast<uint32_t>(n)); }
  template <class T>
  MapWriter& kv(const char* key, const T& value) {
    pk_.pack(std::string(key));
    pk_.pack(value);
    return *this;
  }
  msgpack::packer<msgpack::sbuffer>& packer() { return pk_; }
  MapWriter& key(const char* k) {
    pk_.pack(std::string(k));
    return *this;
  }
  std::string bytes() const { return std::string(buf_.data(), buf_.size()); }

 private:
  msgpack::sbuffer buf_;
  msgpack::packer<msgpack::sbuffer> pk_;
};

// -- the manifest ------------------------------------------------------------------------------
struct Codec {
  std::string name = "none", filter = "none";
  int64_t clevel = 0, typesize = 0;
};

struct InputSig {
  bool tensor = false;
  std::string dtype;
  int64_t rank = 0;
  std::vector<int64_t> shape;  // -1: varies
};

// One weight of the archive: its bytes are archive[start, start + nbytes) (contiguous).
struct TensorDesc {
  std::string name, dtype;
  std::vector<int64_t> shape;
  uint64_t start = 0, nbytes = 0, xxh3 = 0;
};

struct Manifest {
  int64_t v = 0;
  std::string name, label, archive_sha256, signer, torch_version, compile_method;
  uint64_t seq = 0, archive_bytes = 0, compressed_bytes = 0, chunk_bytes = 0, chunk_count = 0;
  double created_at = 0;
  Codec codec;
  std::vector<uint64_t> chunk_sizes, chunk_xxh3;
  std::vector<InputSig> inputs;
  bool staged = false;
  uint64_t batch = 0;  // the largest batch the publisher proved batch-invariant (0: unbatched)
  // "torchscript", "pt2" or "torchscript+pt2" (docs/protocol.md §Formats); the device kinds
  // the pt2 package was compiled for; the weights (a pt2 package's constants bind to them)
  std::string format = "torchscript";
  std::vector<std::string> devices;
  std::vector<TensorDesc> tensors;
  msgpack::object_handle handle;  // owns the examples / expected objects
  const msgpack::object* examples = nullptr;
  const msgpack::object* expected = nullptr;
  const msgpack::object* inputs_spec = nullptr;  // the manifest's `inputs` and `outputs`, as sent
  const msgpack::object* outputs = nullptr;

  std::pair<uint64_t, uint64_t> span(uint64_t index) const;  // (offset, length) in the archive
};

// Decode a manifest frame; with `check`, its sizes against each other and the limits.
std::shared_ptr<Manifest> decode_manifest(const void* data, size_t len, const Limits& limits, bool check);
void check_manifest(const Manifest& m, const Limits& limits);
void validate_name(const std::string& name);

// -- digests, signatures, chunks ---------------------------------------------------------------
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t len);
  std::string hex();

 private:
  void* ctx_;
};
std::string sha256_hex(const void* data, size_t len);
uint64_t xxh3(const void* data, size_t len);

// Trusted Ed25519 keys (raw public keys as 64 hex digits). Empty: any signature present must
// still verify, and unsigned releases are taken.
struct Trust {
  std::set<std::string> keys;
  bool required() const { return !keys.empty(); }
  // Raises Error("bad_signature") unless the node may load the release.
  void verify(const Manifest& m, const std::string& raw, const std::string& signature) const;
  // A key given as 64 hex digits, a file holding them, or a PEM public key file.
  static std::string load_key(const std::string& arg);
};

// Verify chunk `index` (size, XXH3) and decompress it into its slice of `archive`.
void decompress_chunk(const Manifest& m, uint64_t index, const void* payload, size_t len, uint8_t* archive);

// -- tensors -----------------------------------------------------------------------------------
// A tensor tree spec (msgpack) and its buffers -> an IValue (tensors own copies of the bytes).
c10::IValue decode_tree(const msgpack::object& spec, const std::vector<std::pair<const void*, size_t>>& bufs);
// An IValue -> (spec packed into `pk`, buffers); tensors are made contiguous CPU first.
void encode_tree(const c10::IValue& v, msgpack::packer<msgpack::sbuffer>& pk, std::vector<at::Tensor>& bufs);
std::string dtype_name(at::ScalarType t);
at::ScalarType dtype_of(const std::string& name);

// A TensorPack {spec, buffers: [bin]} as found in a manifest.
c10::IValue decode_pack(const msgpack::object& pack);

}  // namespace zm
