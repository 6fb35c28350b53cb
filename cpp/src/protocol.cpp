#include "protocol.hpp"

#include <blosc2.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <xxhash.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <regex>
#include <sstream>

namespace zm {

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

bool is_utf8(const char* p, size_t n) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n;) {
    unsigned char c = u[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (!len || i + len > n || (len == 2 && c < 0xc2)) return false;
    for (size_t k = 1; k < len; ++k)
      if ((u[i + k] & 0xc0) != 0x80) return false;
    if (len == 3 && ((c == 0xe0 && u[i + 1] < 0xa0) || (c == 0xed && u[i + 1] >= 0xa0))) return false;
    if (len == 4 && ((c == 0xf0 && u[i + 1] < 0x90) || c > 0xf4 || (c == 0xf4 && u[i + 1] >= 0x90))) return false;
    i += len;
  }
  return true;
}

std::string utf8_prefix(const std::string& s, size_t max_bytes) {
  if (s.size() <= max_bytes) return s;
  size_t end = max_bytes;
  while (end > 0 && (static_cast<unsigned char>(s[end]) & 0xc0) == 0x80) --end;  // not inside a character
  return s.substr(0, end);
}

// -- Map ---------------------------------------------------------------------------------------
Map::Map(const msgpack::object& o, const char* what) : obj_(&o), what_(what) {
  if (o.type != msgpack::type::MAP) throw Error("bad_message", what_ + " is not a map");
}

const msgpack::object* Map::get(const char* key) const {
  const auto& m = obj_->via.map;
  size_t klen = std::strlen(key);
  for (uint32_t i = 0; i < m.size; ++i) {
    const auto& k = m.ptr[i].key;
    if (k.type == msgpack::type::STR && k.via.str.size == klen && std::memcmp(k.via.str.ptr, key, klen) == 0)
      return &m.ptr[i].val;
  }
  return nullptr;
}

static Error bad_type(const std::string& what, const char* key, const char* want) {
  return Error("bad_message", what + ": " + key + " must be " + want);
}

std::string Map::str(const char* key, const std::string& dflt) const {
  auto* o = get(key);
  if (!o) return dflt;
  if (o->type != msgpack::type::STR || !is_utf8(o->via.str.ptr, o->via.str.size))
    throw bad_type(what_, key, "a UTF-8 string");
  return std::string(o->via.str.ptr, o->via.str.size);
}

uint64_t Map::u64(const char* key, uint64_t dflt) const {
  auto* o = get(key);
  if (!o) return dflt;
  if (o->type != msgpack::type::POSITIVE_INTEGER) throw bad_type(what_, key, "an integer >= 0");
  return o->via.u64;
}

int64_t Map::i64(const char* key, int64_t dflt) const {
  auto* o = get(key);
  if (!o) return dflt;
  if (o->type == msgpack::type::POSITIVE_INTEGER) {
    if (o->via.u64 > static_cast<uint64_t>(INT64_MAX)) throw bad_type(what_, key, "an int64");
    return static_cast<int64_t>(o->via.u64);
  }
  if (o->type == msgpack::type::NEGATIVE_INTEGER) return o->via.i64;
  throw bad_type(what_, key, "an integer");
}

double Map::f64(const char* key, double dflt) const {
  auto* o = get(key);
  if (!o) return dflt;
  switch (o->type) {
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64: return o->via.f64;
    case msgpack::type::POSITIVE_INTEGER: return static_cast<double>(o->via.u64);
    case msgpack::type::NEGATIVE_INTEGER: return static_cast<double>(o->via.i64);
    default: throw bad_type(what_, key, "a number");
  }
}

bool Map::boolean(const char* key, bool dflt) const {
  auto* o = get(key);
  if (!o) return dflt;
  if (o->type != msgpack::type::BOOLEAN) throw bad_type(what_, key, "a bool");
  return o->via.boolean;
}

std::vector<std::string> Map::strs(const char* key) const {
  std::vector<std::string> out;
  auto* o = get(key);
  if (!o) return out;
  if (o->type != msgpack::type::ARRAY) throw bad_type(what_, key, "a list of strings");
  for (uint32_t i = 0; i < o->via.array.size; ++i) {
    const auto& e = o->via.array.ptr[i];
    if (e.type != msgpack::type::STR || !is_utf8(e.via.str.ptr, e.via.str.size))
      throw bad_type(what_, key, "a list of UTF-8 strings");
    out.emplace_back(e.via.str.ptr, e.via.str.size);
  }
  return out;
}

std::vector<uint64_t> Map::u64s(const char* key) const {
  std::vector<uint64_t> out;
  auto* o = get(key);
  if (!o) return out;
  if (o->type != msgpack::type::ARRAY) throw bad_type(what_, key, "a list of integers");
  out.reserve(o->via.array.size);
  for (uint32_t i = 0; i < o->via.array.size; ++i) {
    const auto& e = o->via.array.ptr[i];
    if (e.type != msgpack::type::POSITIVE_INTEGER) throw bad_type(what_, key, "a list of integers >= 0");
    out.push_back(e.via.u64);
  }
  return out;
}

msgpack::object_handle unpack_header(const void* data, size_t len, const char* kind) {
  if (len > (1u << 20)) throw Error("too_large", std::string(kind) + " header of " + std::to_string(len) + " bytes");
  try {
    auto oh = msgpack::unpack(static_cast<const char*>(data), len);
    Map m(oh.get(), kind);
    if (m.i64("v", -1) != V)
      throw Error("bad_message", std::string("bad ") + kind + " header: protocol version " +
                                     std::to_string(m.i64("v", -1)) + ", expected " + std::to_string(V));
    return oh;
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error("bad_message", std::string("bad ") + kind + " header: " + e.what());
  }
}

// -- manifest ----------------------------------------------------------------------------------
std::pair<uint64_t, uint64_t> Manifest::span(uint64_t index) const {
  uint64_t start = index * chunk_bytes;
  return {start, std::min(chunk_bytes, archive_bytes - start)};
}

void validate_name(const std::string& name) {
  static const std::regex re("^[A-Za-z0-9_\\-][A-Za-z0-9._\\-]{0,127}$");
  if (!std::regex_match(name, re))
    throw Error("bad_release", "invalid model name '" + name + "': use 1-128 of A-Z a-z 0-9 . _ -");
}

static const std::set<std::string> kCodecs = {"none", "lz4", "lz4hc", "zstd", "blosclz", "zlib"};
static const std::set<std::string> kFilters = {"none", "shuffle", "bitshuffle"};

void check_manifest(const Manifest& m, const Limits& limits) {
  validate_name(m.name);
  if (m.v != V) throw Error("bad_release", "protocol version " + std::to_string(m.v) + " is not 1");
  if (m.archive_bytes > limits.max_archive_bytes)
    throw Error("too_large", "archive of " + std::to_string(m.archive_bytes) + " bytes exceeds " +
                                 std::to_string(limits.max_archive_bytes));
  if (m.chunk_bytes == 0 || m.chunk_bytes > limits.max_chunk_bytes || m.chunk_count > limits.max_chunks)
    throw Error("too_large", "chunking " + std::to_string(m.chunk_count) + " x " + std::to_string(m.chunk_bytes) +
                                 " exceeds the limits");
  if (m.chunk_count != (m.archive_bytes + m.chunk_bytes - 1) / m.chunk_bytes)
    throw Error("bad_release", "chunk_count does not match archive_bytes / chunk_bytes");
  if (m.chunk_sizes.size() != m.chunk_count || m.chunk_xxh3.size() != m.chunk_count)
    throw Error("bad_release", "chunk_sizes / chunk_xxh3 do not have chunk_count entries");
  uint64_t sum = 0, bound = m.chunk_bytes + 64 * 1024;
  for (auto s : m.chunk_sizes) {
    if (s > bound) throw Error("bad_release", "chunk sizes are out of range or do not add up");
    sum += s;
  }
  if (sum != m.compressed_bytes) throw Error("bad_release", "chunk sizes are out of range or do not add up");
  if (!kCodecs.count(m.codec.name) || !kFilters.count(m.codec.filter))
    throw Error("bad_release", "unknown codec " + m.codec.name + "/" + m.codec.filter);
  if (m.archive_sha256.size() != 64) throw Error("bad_release", "archive_sha256 must be 64 hex digits");
  if (std::none_of(std::begin(gen::RELEASE_FORMATS), std::end(gen::RELEASE_FORMATS),
                   [&](const char* f) { return m.format == f; }))
    throw Error("bad_release", "unknown release format '" + m.format + "': one of torchscript, pt2, torchscript+pt2");
  if ((m.format.find("pt2") != std::string::npos) != !m.devices.empty() || m.devices.size() > gen::MAX_DEVICES)
    throw Error("bad_release", "devices must name the device kinds of a pt2 package, and only then");
  for (const auto& t : m.tensors)
    if (t.start + t.nbytes > m.archive_bytes || t.start + t.nbytes < t.start)
      throw Error("bad_release", "a tensor descriptor points outside the archive");
  if (!m.signer.empty() && m.signer.size() != 64) throw Error("bad_release", "signer must be 64 hex digits");
}

std::shared_ptr<Manifest> decode_manifest(const void* data, size_t len, const Limits& limits, bool check) {
  if (len > limits.max_manifest_bytes)
    throw Error("too_large", "manifest of " + std::to_string(len) + " bytes exceeds " +
                                 std::to_string(limits.max_manifest_bytes));
  auto m = std::make_shared<Manifest>();
  try {
    m->handle = msgpack::unpack(static_cast<const char*>(data), len);
    Map r(m->handle.get(), "manifest");
    m->v = r.i64("v", 0);
    m->name = r.str("name");
    m->label = r.str("label");
    m->seq = r.u64("seq");
    m->created_at = r.f64("created_at");
    m->archive_sha256 = r.str("archive_sha256");
    m->archive_bytes = r.u64("archive_bytes");
    m->compressed_bytes = r.u64("compressed_bytes");
    m->chunk_bytes = r.u64("chunk_bytes");
    m->chunk_count = r.u64("chunk_count");
    m->chunk_sizes = r.u64s("chunk_sizes");
    m->chunk_xxh3 = r.u64s("chunk_xxh3");
    m->torch_version = r.str("torch_version");
    m->compile_method = r.str("compile_method");
    m->signer = r.str("signer");
    m->staged = r.boolean("staged");
    m->batch = r.u64("batch");
    if (m->batch > 65536 || r.u64("batch_dim") != 0) throw Error("bad_manifest", "batch must be 0..65536 along dim 0");
    if (auto* c = r.get("codec")) {
      Map cm(*c, "codec");
      m->codec.name = cm.str("name", "none");
      m->codec.filter = cm.str("filter", "none");
      m->codec.clevel = cm.i64("clevel", 0);
      m->codec.typesize = cm.i64("typesize", 0);
    }
    if (auto* in = r.get("inputs"); in && in->type == msgpack::type::ARRAY) {
      for (uint32_t i = 0; i < in->via.array.size; ++i) {
        Map e(in->via.array.ptr[i], "input");
        InputSig s;
        if (e.get("dtype")) {
          s.tensor = true;
          s.dtype = e.str("dtype");
          s.rank = e.i64("rank");
          if (auto* sh = e.get("shape"); sh && sh->type == msgpack::type::ARRAY)
            for (uint32_t j = 0; j < sh->via.array.size; ++j) {
              const auto& d = sh->via.array.ptr[j];
              s.shape.push_back(d.type == msgpack::type::NEGATIVE_INTEGER ? d.via.i64 : static_cast<int64_t>(d.via.u64));
            }
        }
        m->inputs.push_back(std::move(s));
      }
    }
    m->inputs_spec = r.get("inputs");
    m->outputs = r.get("outputs");
    if (r.get("format")) m->format = r.str("format");
    m->devices = r.strs("devices");
    if (auto* ts = r.get("tensors"); ts && ts->type == msgpack::type::ARRAY) {
      for (uint32_t i = 0; i < ts->via.array.size; ++i) {
        Map e(ts->via.array.ptr[i], "tensor");
        TensorDesc t;
        t.name = e.str("name"), t.dtype = e.str("dtype");
        for (auto d : e.u64s("shape")) t.shape.push_back(static_cast<int64_t>(d));
        t.start = e.u64("start"), t.nbytes = e.u64("nbytes"), t.xxh3 = e.u64("xxh3");
        m->tensors.push_back(std::move(t));
      }
    }
    auto* ex = r.get("examples");
    auto* want = r.get("expected");
    m->examples = ex && ex->type == msgpack::type::MAP ? ex : nullptr;
    m->expected = want && want->type == msgpack::type::MAP ? want : nullptr;
  } catch (const Error& e) {
    throw Error("bad_release", std::string("bad manifest: ") + e.what());
  } catch (const std::exception& e) {
    throw Error("bad_release", std::string("bad manifest: ") + e.what());
  }
  if (check) check_manifest(*m, limits);
  return m;
}

// -- digests, signatures -----------------------------------------------------------------------
Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) { EVP_DigestInit_ex(static_cast<EVP_MD_CTX*>(ctx_), EVP_sha256(), nullptr); }
Sha256::~Sha256() { EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_)); }
void Sha256::update(const void* data, size_t len) { EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(ctx_), data, len); }
std::string Sha256::hex() {
  unsigned char md[32];
  unsigned int n = 0;
  EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(ctx_), md, &n);
  static const char* digits = "0123456789abcdef";
  std::string out(64, '0');
  for (int i = 0; i < 32; ++i) {
    out[2 * i] = digits[md[i] >> 4];
    out[2 * i + 1] = digits[md[i] & 15];
  }
  return out;
}
std::string sha256_hex(const void* data, size_t len) {
  Sha256 h;
  h.update(data, len);
  return h.hex();
}
uint64_t xxh3(const void* data, size_t len) { return XXH3_64bits(data, len); }

static bool is_hex64(const std::string& s) {
  return s.size() == 64 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

static std::vector<unsigned char> unhex(const std::string& s) {
  std::vector<unsigned char> out(s.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<unsigned char>(std::stoi(s.substr(2 * i, 2), nullptr, 16));
  return out;
}

void Trust::verify(const Manifest& m, const std::string& raw, const std::string& signature) const {
  std::string what = m.name + " seq " + std::to_string(m.seq);
  if (signature.empty() && m.signer.empty()) {
    if (required())
      throw Error("bad_signature", what + " is unsigned; this node loads only releases signed by " +
                                       std::to_string(keys.size()) + " trusted key(s)");
    return;
  }
  if (required() && !keys.count(m.signer))
    throw Error("bad_signature", what + " is signed by " + m.signer.substr(0, 16) + "…, which this node does not trust");
  bool ok = false;
  if (is_hex64(m.signer) && signature.size() == 64) {
    auto key = unhex(m.signer);
    EVP_PKEY* pkey = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, key.data(), key.size());
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    std::string msg = std::string("zmqmodels/manifest/v1", 21) + std::string(1, '\0') + raw;
    if (pkey && ctx && EVP_DigestVerifyInit(ctx, nullptr, nullptr, nullptr, pkey) == 1)
      ok = EVP_DigestVerify(ctx, reinterpret_cast<const unsigned char*>(signature.data()), signature.size(),
                            reinterpret_cast<const unsigned char*>(msg.data()), msg.size()) == 1;
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(pkey);
  }
  if (!ok) throw Error("bad_signature", what + ": the signature does not verify for key " + m.signer.substr(0, 16) + "…");
}

static std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("bad_request", "cannot read " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

static std::string key_from_file(const std::string& path) {
  std::string data = read_file(path);
  std::string trimmed = data;
  trimmed.erase(trimmed.find_last_not_of(" \n\r\t") + 1);
  trimmed.erase(0, trimmed.find_first_not_of(" \n\r\t"));
  if (is_hex64(trimmed)) return trimmed;
  BIO* bio = BIO_new_mem_buf(data.data(), static_cast<int>(data.size()));
  EVP_PKEY* pkey = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  unsigned char raw[32];
  size_t n = sizeof raw;
  bool ok = pkey && EVP_PKEY_get_raw_public_key(pkey, raw, &n) == 1 && n == 32;
  EVP_PKEY_free(pkey);
  if (!ok) throw Error("bad_request", path + " is not an Ed25519 public key (PEM or 64 hex digits)");
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : raw) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

std::string Trust::load_key(const std::string& arg) {
  if (is_hex64(arg)) return arg;
  return key_from_file(arg);
}

// -- chunks ------------------------------------------------------------------------------------
static std::once_flag blosc_once;

void decompress_chunk(const Manifest& m, uint64_t index, const void* payload, size_t len, uint8_t* archive) {
  std::string where = "chunk " + std::to_string(index) + " of " + m.name + " seq " + std::to_string(m.seq);
  if (index >= m.chunk_count) throw Error("bad_message", "chunk index " + std::to_string(index) + " out of range");
  if (len != m.chunk_sizes[index] || xxh3(payload, len) != m.chunk_xxh3[index])
    throw Error("integrity", where + ": size or digest mismatch");
  auto [start, length] = m.span(index);
  uint8_t* dst = archive + start;
  if (m.codec.name == "none") {
    if (len != length) throw Error("integrity", where + ": raw chunk of " + std::to_string(len) + " bytes");
    std::memcpy(dst, payload, len);
    return;
  }
  std::call_once(blosc_once, [] { blosc2_init(); });
  if (len < BLOSC_MIN_HEADER_LENGTH) throw Error("integrity", where + ": not a blosc2 chunk");
  int32_t nbytes = 0, cbytes = 0, blocksize = 0;
  if (blosc2_cbuffer_sizes(payload, &nbytes, &cbytes, &blocksize) < 0 || cbytes != static_cast<int32_t>(len))
    throw Error("integrity", where + ": not a blosc2 chunk");
  if (static_cast<uint64_t>(nbytes) != length)  // before decompressing: no decompression bombs
    throw Error("integrity", where + " decompresses to " + std::to_string(nbytes) + " bytes, expected " +
                                 std::to_string(length));
  blosc2_dparams dparams = BLOSC2_DPARAMS_DEFAULTS;
  dparams.nthreads = 1;
  blosc2_context* dctx = blosc2_create_dctx(dparams);
  int got = blosc2_decompress_ctx(dctx, payload, static_cast<int32_t>(len), dst, static_cast<int32_t>(length));
  blosc2_free_ctx(dctx);
  if (got != static_cast<int>(length)) throw Error("integrity", where + ": blosc2 failed (" + std::to_string(got) + ")");
}

// -- tensors -----------------------------------------------------------------------------------
static const std::vector<std::pair<std::string, at::ScalarType>> kDtypes = {
    {"float64", at::kDouble}, {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16},
    {"int64", at::kLong},     {"int32", at::kInt},     {"int16", at::kShort}, {"int8", at::kChar},
    {"uint8", at::kByte},     {"bool", at::kBool},     {"complex64", at::kComplexFloat},
    {"complex128", at::kComplexDouble}};

std::string dtype_name(at::ScalarType t) {
  for (auto& [n, s] : kDtypes)
    if (s == t) return n;
  return c10::toString(t);
}

at::ScalarType dtype_of(const std::string& name) {
  for (auto& [n, s] : kDtypes)
    if (n == name) return s;
  throw Error("bad_request", "unknown dtype '" + name + "'");
}

namespace {
struct Decoder {
  const std::vector<std::pair<const void*, size_t>>& bufs;
  std::vector<bool> used;
  int depth = 0;

  c10::IValue node(const msgpack::object& o) {
    if (++depth > 64) throw Error("bad_request", "tensor tree nested too deep");
    Map m(o, "tensor spec");
    std::string t = m.str("t");
    c10::IValue out;
    if (t == "tensor") {
      at::ScalarType dt = dtype_of(m.str("dtype"));
      std::vector<int64_t> shape;
      auto* sh = m.get("shape");
      if (!sh || sh->type != msgpack::type::ARRAY) throw Error("bad_request", "tensor spec without a shape");
      uint64_t count = 1;
      for (uint32_t i = 0; i < sh->via.array.size; ++i) {
        const auto& d = sh->via.array.ptr[i];
        if (d.type != msgpack::type::POSITIVE_INTEGER || d.via.u64 > (1ull << 40))
          throw Error("bad_request", "bad tensor shape");
        shape.push_back(static_cast<int64_t>(d.via.u64));
        count *= d.via.u64;
        if (count > (1ull << 40)) throw Error("bad_request", "bad tensor shape");
      }
      uint64_t f = m.u64("f", UINT64_MAX);
      if (f >= bufs.size()) throw Error("bad_request", "tensor buffer index out of range");
      if (used[f]) throw Error("bad_request", "tensor buffer " + std::to_string(f) + " referenced twice");
      used[f] = true;
      size_t need = count * c10::elementSize(dt);
      if (bufs[f].second != need)
        throw Error("bad_request", "tensor buffer " + std::to_string(f) + " has " + std::to_string(bufs[f].second) +
                                       " bytes, its spec needs " + std::to_string(need));
      at::Tensor x = at::empty(shape, at::TensorOptions().dtype(dt));
      if (need) std::memcpy(x.data_ptr(), bufs[f].first, need);
      out = x;
    } else if (t == "tuple" || t == "list") {
      auto* items = m.get("items");
      if (!items || items->type != msgpack::type::ARRAY) throw Error("bad_request", t + " spec without items");
      std::vector<c10::IValue> xs;
      bool all_tensors = true;
      for (uint32_t i = 0; i < items->via.array.size; ++i) {
        xs.push_back(node(items->via.array.ptr[i]));
        all_tensors = all_tensors && xs.back().isTensor();
      }
      if (t == "tuple") {
        out = c10::ivalue::Tuple::create(std::move(xs));
      } else if (all_tensors) {
        c10::List<at::Tensor> l;
        for (auto& x : xs) l.push_back(x.toTensor());
        out = l;
      } else {
        c10::impl::GenericList l(c10::AnyType::get());
        for (auto& x : xs) l.push_back(x);
        out = l;
      }
    } else if (t == "dict") {
      auto keys = m.strs("keys");
      auto* items = m.get("items");
      if (!items || items->type != msgpack::type::ARRAY || items->via.array.size != keys.size())
        throw Error("bad_request", "dict spec with mismatched keys and items");
      std::vector<c10::IValue> xs;
      bool all_tensors = true;
      for (uint32_t i = 0; i < items->via.array.size; ++i) {
        xs.push_back(node(items->via.array.ptr[i]));
        all_tensors = all_tensors && xs.back().isTensor();
      }
      c10::TypePtr value_type = all_tensors ? c10::TypePtr(c10::TensorType::get()) : c10::TypePtr(c10::AnyType::get());
      c10::impl::GenericDict d(c10::StringType::get(), value_type);
      for (size_t i = 0; i < keys.size(); ++i) d.insert(keys[i], xs[i]);
      out = d;
    } else if (t == "bool") {
      out = m.boolean("v");
    } else if (t == "int") {
      out = m.i64("v");
    } else if (t == "float") {
      out = m.f64("v");
    } else if (t == "str") {
      out = m.str("v");
    } else if (t == "none") {
      out = c10::IValue();
    } else {
      throw Error("bad_request", "unknown tensor spec node '" + t + "'");
    }
    --depth;
    return out;
  }
};
}  // namespace

c10::IValue decode_tree(const msgpack::object& spec, const std::vector<std::pair<const void*, size_t>>& bufs) {
  Decoder d{bufs, std::vector<bool>(bufs.size(), false)};
  c10::IValue v = d.node(spec);
  for (size_t i = 0; i < d.used.size(); ++i)
    if (!d.used[i]) throw Error("bad_request", "tensor buffer " + std::to_string(i) + " is not referenced");
  return v;
}

c10::IValue decode_pack(const msgpack::object& pack) {
  Map m(pack, "tensor pack");
  auto* spec = m.get("spec");
  auto* buffers = m.get("buffers");
  if (!spec || !buffers || buffers->type != msgpack::type::ARRAY) throw Error("bad_release", "bad tensor pack");
  std::vector<std::pair<const void*, size_t>> bufs;
  for (uint32_t i = 0; i < buffers->via.array.size; ++i) {
    const auto& b = buffers->via.array.ptr[i];
    if (b.type != msgpack::type::BIN) throw Error("bad_release", "tensor pack buffer is not bin");
    bufs.emplace_back(b.via.bin.ptr, b.via.bin.size);
  }
  return decode_tree(*spec, bufs);
}

void encode_tree(const c10::IValue& v, msgpack::packer<msgpack::sbuffer>& pk, std::vector<at::Tensor>& bufs) {
  auto key = [&](const char* k) { pk.pack(std::string(k)); };
  if (v.isTensor()) {
    at::Tensor t = v.toTensor().detach().to(at::kCPU).contiguous();
    pk.pack_map(4);
    key("t"), pk.pack(std::string("tensor"));
    key("dtype"), pk.pack(dtype_name(t.scalar_type()));
    key("shape"), pk.pack(t.sizes().vec());
    key("f"), pk.pack(static_cast<uint64_t>(bufs.size()));
    bufs.push_back(t);
  } else if (v.isTuple() || v.isList()) {
    std::vector<c10::IValue> items;
    if (v.isTuple()) {
      for (auto& x : v.toTupleRef().elements()) items.push_back(x);
    } else {
      for (const auto& x : v.toListRef()) items.push_back(x);
    }
    pk.pack_map(2);
    key("t"), pk.pack(std::string(v.isTuple() ? "tuple" : "list"));
    key("items"), pk.pack_array(static_cast<uint32_t>(items.size()));
    for (auto& x : items) encode_tree(x, pk, bufs);
  } else if (v.isGenericDict()) {
    auto d = v.toGenericDict();
    std::vector<std::string> keys;
    for (const auto& e : d) {
      if (!e.key().isString()) throw Error("model_error", "the model returned a dict with non-string keys");
      keys.push_back(e.key().toStringRef());
    }
    pk.pack_map(3);
    key("t"), pk.pack(std::string("dict"));
    key("keys"), pk.pack(keys);
    key("items"), pk.pack_array(static_cast<uint32_t>(keys.size()));
    for (const auto& e : d) encode_tree(e.value(), pk, bufs);
  } else if (v.isBool()) {
    pk.pack_map(2), key("t"), pk.pack(std::string("bool")), key("v"), pk.pack(v.toBool());
  } else if (v.isInt()) {
    pk.pack_map(2), key("t"), pk.pack(std::string("int")), key("v"), pk.pack(v.toInt());
  } else if (v.isDouble()) {
    pk.pack_map(2), key("t"), pk.pack(std::string("float")), key("v"), pk.pack(v.toDouble());
  } else if (v.isString()) {
    pk.pack_map(2), key("t"), pk.pack(std::string("str")), key("v"), pk.pack(v.toStringRef());
  } else if (v.isNone()) {
    pk.pack_map(1), key("t"), pk.pack(std::string("none"));
  } else {
    throw Error("model_error", std::string("the model returned a ") + v.tagKind() + ", which the tensor codec cannot carry");
  }
}

}  // namespace zm
