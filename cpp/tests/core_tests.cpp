// Unit tests of the C++ node's library (zmqmodels_core), with doctest: the follower's repair
// rules, the manifest checks, the framing table and typed headers, the tensor codec, the
// slot's ordering, and the node's request, load and follow paths without sockets or threads
// of their own. Run by tests/test_cpp_node.py.
#include "node.hpp"

// c10 (LibTorch) defines glog-style CHECK macros; the tests use doctest's
#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <stdlib.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <thread>

using namespace zm;

namespace {

struct Release {
  std::string raw;
  std::vector<std::string> chunks;
  std::shared_ptr<Manifest> m;
};

// A release of `n` raw chunks of `size` bytes (codec none), as a hub would send it.
Release make_release(uint64_t seq, int n, size_t size, uint64_t archive_bytes = 0) {
  Release r;
  std::string archive;
  for (int i = 0; i < n; ++i) {
    r.chunks.emplace_back(size, static_cast<char>('a' + i));
    archive += r.chunks.back();
  }
  std::vector<uint64_t> sizes, digests;
  for (auto& c : r.chunks) sizes.push_back(c.size()), digests.push_back(xxh3(c.data(), c.size()));
  MapWriter w(12);
  w.kv("v", V).kv("name", std::string("m")).kv("label", std::string("l")).kv("seq", seq);
  w.kv("archive_sha256", sha256_hex(archive.data(), archive.size()));
  w.kv("archive_bytes", archive_bytes ? archive_bytes : static_cast<uint64_t>(archive.size()));
  w.kv("compressed_bytes", static_cast<uint64_t>(archive.size())).kv("chunk_bytes", static_cast<uint64_t>(size));
  w.kv("chunk_count", static_cast<uint64_t>(n)).kv("chunk_sizes", sizes).kv("chunk_xxh3", digests);
  w.key("codec").packer().pack_map(2);
  w.packer().pack(std::string("name")), w.packer().pack(std::string("none"));
  w.packer().pack(std::string("filter")), w.packer().pack(std::string("none"));
  r.raw = w.bytes();
  r.m = decode_manifest(r.raw.data(), r.raw.size(), Limits(), false);
  return r;
}

Follower make_follower() {
  Config c;
  c.node_id = "n", c.host = "h", c.device = "cpu";
  return Follower({"m"}, c);
}

// What a follower's events asked for, kept by kind as a host would carry them out.
struct Kept {
  std::vector<Frames> sends;
  std::vector<Completed> completed;
  std::vector<std::pair<std::string, uint64_t>> unstaged, rewrites;
  void operator()(Actions actions) {
    for (auto& a : actions) {
      switch (a.kind) {
        case Action::Kind::Send: sends.push_back(std::move(a.frames)); break;
        case Action::Kind::Deliver: completed.push_back(std::move(a.done)); break;
        case Action::Kind::Unstage: unstaged.emplace_back(a.name, a.seq); break;
        case Action::Kind::Rewrite: rewrites.emplace_back(a.name, a.seq); break;
      }
    }
  }
};

// The FETCH_CHUNKS indices the follower asked for since the last call.
std::vector<uint64_t> fetched(Kept& f) {
  std::vector<uint64_t> out;
  for (auto& frames : f.sends) {
    if (frames[0] != kind_name(Kind::FetchChunks)) continue;
    for (auto i : decode<FetchChunks>(Kind::FetchChunks, frames[1].data(), frames[1].size()).indices) out.push_back(i);
  }
  f.sends.clear();
  return out;
}

TEST_CASE("a skipped index fetches only the skipped ones") {
  auto f = make_follower();
  Kept k;
  auto r = make_release(1, 6, 100);
  k(f.on_manifest(r.m, r.raw, "", 0.0, false));
  k(f.on_chunk("m", 1, 0, r.chunks[0].data(), 100, 0.1, false));
  CHECK(fetched(k).empty());
  k(f.on_chunk("m", 1, 3, r.chunks[3].data(), 100, 0.2, false));  // 1 and 2 were dropped
  CHECK((fetched(k) == std::vector<uint64_t>{1, 2}));
}

TEST_CASE("a slow broadcast is not a loss and the beat ends it") {
  auto f = make_follower();
  Kept k;
  auto r = make_release(1, 6, 100);
  k(f.on_manifest(r.m, r.raw, "", 0.0, false));
  double t = 0;
  for (int i = 0; i < 3; ++i) {  // a chunk every 0.4 s: slower than the idle timer, but steady
    t += 0.4;
    k(f.tick(t - 0.01));
    k(f.on_chunk("m", 1, static_cast<uint64_t>(i), r.chunks[i].data(), 100, t, false));
  }
  k(f.tick(t + 1.5));
  CHECK(fetched(k).empty());
  k(f.on_beat("m", 1, r.m->archive_sha256, 0, t + 1.6));  // sent after the last chunk: the rest is lost
  CHECK((fetched(k) == std::vector<uint64_t>{3, 4, 5}));
  for (int i = 3; i < 6; ++i) k(f.on_chunk("m", 1, static_cast<uint64_t>(i), r.chunks[i].data(), 100, t + 1.7, true));
  CHECK((k.completed.size() == 1 && k.completed[0].digest == r.m->archive_sha256));
}

TEST_CASE("a manifest over the limits is refused once and a corrupt chunk fetched again") {
  auto f = make_follower();
  Kept k;
  auto big = make_release(2, 2, 100, 8ull << 40);  // declares 8 TiB: refused before allocating
  k(f.on_manifest(big.m, big.raw, "", 0.0, false));
  k(f.on_manifest(big.m, big.raw, "", 0.1, true));
  int rejected = 0;
  for (auto& frames : k.sends) rejected += frames[1].find("rejected") != std::string::npos;
  CHECK(rejected == 1);
  k.sends.clear();
  auto r = make_release(3, 3, 100);
  k(f.on_manifest(r.m, r.raw, "", 1.0, false));
  std::string bad(100, 'x');
  k(f.on_chunk("m", 3, 0, bad.data(), bad.size(), 1.1, false));
  CHECK((fetched(k) == std::vector<uint64_t>{0}));
}

TEST_CASE("staged releases wait for activation") {
  auto f = make_follower();
  Kept k;
  k(f.held("m", 4));
  CHECK(k.unstaged.empty());
  k(f.on_activate("m", 4, {"other"}));
  CHECK(k.unstaged.empty());
  k(f.on_activate("m", 4, {"n"}));
  CHECK((k.unstaged.size() == 1 && k.unstaged[0].second == 4));
  auto g = make_follower();
  Kept kg;
  kg(g.held("m", 5));
  kg(g.on_beat("m", 5, "", 5, 0.0));  // active fleet-wide
  CHECK(kg.unstaged.size() == 1);
}

TEST_CASE("the tensor codec round-trips") {
  c10::Dict<std::string, at::Tensor> d;
  d.insert("a", at::arange(6, at::kFloat).reshape({2, 3}));
  c10::IValue tree = c10::ivalue::Tuple::create({at::ones({2}, at::kLong), c10::IValue(d), c10::IValue(7)});
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(buf);
  std::vector<at::Tensor> tensors;
  encode_tree(tree, pk, tensors);
  auto oh = msgpack::unpack(buf.data(), buf.size());
  std::vector<std::pair<const void*, size_t>> bufs;
  for (auto& t : tensors) bufs.emplace_back(t.data_ptr(), t.numel() * t.element_size());
  auto back = decode_tree(oh.get(), bufs);
  auto& xs = back.toTupleRef().elements();
  CHECK(at::equal(xs[0].toTensor(), at::ones({2}, at::kLong)));
  CHECK(at::equal(xs[1].toGenericDict().at("a").toTensor(), d.at("a")));
  CHECK(xs[2].toInt() == 7);
  bool refused = false;
  try {
    bufs.pop_back();
    decode_tree(oh.get(), bufs);
  } catch (const Error& e) {
    refused = e.code == "bad_request";
  }
  CHECK(refused);
}

TEST_CASE("the slot lets older requests finish before a newer version serves") {
  Slot slot;
  auto v1 = std::make_shared<Loaded>(), v2 = std::make_shared<Loaded>();
  slot.offer(v1);
  auto held = std::make_unique<Lease>(slot.begin());  // a request on v1, still running
  CHECK(held->get() == v1.get());
  std::atomic<bool> offered{false}, started{false};
  std::shared_ptr<const Loaded> retired;
  const Loaded* got = nullptr;
  std::thread loader([&] {
    retired = slot.offer(v2);
    offered = true;
  });
  std::thread request([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    Lease l = slot.begin();  // arrives after the offer: waits for the v1 request
    got = l.get();
    started = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  CHECK((!started && !offered));  // nobody answers on v2 while an older request is running
  held.reset();
  loader.join();
  request.join();
  CHECK((started && offered && got == v2.get() && retired == v1 && slot.newest() == v2));
}

TEST_CASE("a hung old request does not hold the new version back for long") {
  Slot slot;
  auto v1 = std::make_shared<Loaded>(), v2 = std::make_shared<Loaded>();
  slot.offer(v1);
  Lease hung = slot.begin();  // never ends (until the test does)
  std::thread loader([&] { slot.offer(v2, 0.1); });
  loader.join();
  auto t0 = now_s();
  Lease got = slot.begin();
  double waited = now_s() - t0;
  CHECK((got.get() == v2.get() && waited > 1.5 && waited < 5.0));
}

TEST_CASE("strings sent are UTF-8 and strings taken must be") {
  CHECK(is_utf8("caf\xc3\xa9 \xe2\x80\xa6", 10));
  CHECK(!is_utf8("pr\xa3" "be", 5));
  CHECK(!is_utf8("\xc3", 1));          // cut short
  CHECK(!is_utf8("\xed\xa0\x80", 3));  // a surrogate
  std::string dots = "ab\xe2\x80\xa6";  // "ab…"
  CHECK((utf8_prefix(dots, 4) == "ab" && utf8_prefix(dots, 5) == dots));
  MapWriter w(1);
  w.kv("model", std::string("pr\xa3" "be"));
  auto oh = msgpack::unpack(w.bytes().data(), w.bytes().size());
  bool refused = false;
  try {
    Map(oh.get()).str("model");
  } catch (const Error& e) {
    refused = e.code == "bad_message";
  }
  CHECK(refused);
}


// -- the framing table and typed headers -----------------------------------------------------
TEST_CASE("the framing table names each kind once and checks arity") {
  std::set<std::string> names;
  for (auto k : {Kind::Manifest, Kind::Chunk, Kind::Heartbeat, Kind::Activate, Kind::FetchManifest, Kind::FetchChunks,
                 Kind::Report, Kind::Error, Kind::Infer, Kind::Ok})
    CHECK(names.insert(kind_name(k)).second);
  CHECK(kind_of("CHUNK", 3) == Kind::Chunk);
  CHECK(kind_of("MANIFEST", 2) == Kind::Manifest);
  CHECK(kind_of("MANIFEST", 3) == Kind::Manifest);
  CHECK_THROWS_AS(kind_of("CHUNK", 2), Error);      // no payload
  CHECK_THROWS_AS(kind_of("HEARTBEAT", 3), Error);  // one frame too many
  CHECK_THROWS_AS(kind_of("PUBLISH", 3), Error);    // not a kind this node takes
}

TEST_CASE("typed headers ignore unknown keys, keep defaults, and refuse wrong types and non-UTF-8") {
  MapWriter w(4);
  w.kv("name", std::string("m")).kv("seq", 3).kv("future_field", std::string("x")).kv("v", V);
  auto h = decode<ChunkHeader>(Kind::Chunk, w.bytes().data(), w.bytes().size());
  CHECK((h.name == "m" && h.seq == 3 && h.index == 0));
  MapWriter bad(2);
  bad.kv("seq", std::string("three")).kv("v", V);
  CHECK_THROWS_WITH_AS(decode<ChunkHeader>(Kind::Chunk, bad.bytes().data(), bad.bytes().size()),
                       doctest::Contains("wrong type"), Error);
  MapWriter ver(1);
  ver.kv("v", V + 1);
  CHECK_THROWS_WITH_AS(decode<Heartbeat>(Kind::Heartbeat, ver.bytes().data(), ver.bytes().size()),
                       doctest::Contains("protocol version"), Error);
  MapWriter latin(2);
  latin.kv("code", std::string("pr\xa3" "be")).kv("v", V);
  CHECK_THROWS_WITH_AS(decode<ErrorReply>(Kind::Error, latin.bytes().data(), latin.bytes().size()),
                       doctest::Contains("UTF-8"), Error);
}

TEST_CASE("a report is one typed header with the state's name") {
  auto f = make_follower();
  Kept k;
  k(f.report_all());
  REQUIRE(k.sends.size() == 1);
  CHECK(k.sends[0][0] == kind_name(Kind::Report));
  auto r = decode<Report>(Kind::Report, k.sends[0][1].data(), k.sends[0][1].size());
  CHECK((r.node == "n" && r.model == "m" && r.state == state_name(State::Idle) && r.v == V));
  auto oh = msgpack::unpack(k.sends[0][1].data(), k.sends[0][1].size());
  CHECK(oh.get().via.map.size == 20);
}

// -- the slot: leases, and retiring a version without polling ----------------------------------
TEST_CASE("the loader retires the old version once its last lease ends, woken, not polling") {
  Slot slot;
  auto v1 = std::make_shared<Loaded>(), v2 = std::make_shared<Loaded>();
  slot.offer(v1);
  std::weak_ptr<const Loaded> gone = v1;
  v1.reset();
  auto old = slot.offer(v2);  // nobody runs on v1: promoted at once
  CHECK(old.get() == gone.lock().get());
  auto lease = std::make_unique<Lease>(slot.begin());  // a request on v2
  CHECK(slot.leases(v2.get()) == 1);
  CHECK(slot.retire(std::move(old), 5.0));
  CHECK(gone.expired());  // freed on the loader's thread, here
  auto v3 = std::make_shared<Loaded>();
  std::thread loader([&] { old = slot.offer(v3, 0.05); });
  loader.join();  // v3 waits for the lease on v2
  CHECK(old == nullptr);
  CHECK(slot.retire(v2, 0.05) == false);  // still leased
  std::thread ending([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    lease.reset();
  });
  auto t0 = now_s();
  CHECK(slot.retire(v2, 5.0));  // woken by the lease's end
  CHECK(now_s() - t0 < 1.0);
  ending.join();
  CHECK(slot.newest() == v3);
}

// -- the node's paths, reached without its sockets and threads ---------------------------------
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/zmqm-cpp-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

Args args_for(const std::string& cache) {
  Args a;
  a.models = {"m"}, a.bind = "inproc://unused", a.cache = cache, a.node_id = "cpp-test";
  return a;
}

// A release of a TorchScript module defined here (`forward` from `code`), cached as a node
// would cache it; returns its manifest.
std::shared_ptr<Manifest> cached_release(NodeState& s, uint64_t seq, const std::string& code) {
  torch::jit::Module mod("M");
  mod.define(code);
  std::ostringstream bytes;
  mod.save(bytes);
  std::string archive = bytes.str();
  MapWriter w(12);
  w.kv("v", V).kv("name", std::string("m")).kv("label", std::string("v") + std::to_string(seq)).kv("seq", seq);
  w.kv("archive_sha256", sha256_hex(archive.data(), archive.size()));
  w.kv("archive_bytes", static_cast<uint64_t>(archive.size())).kv("compressed_bytes", static_cast<uint64_t>(archive.size()));
  w.kv("chunk_bytes", static_cast<uint64_t>(archive.size())).kv("chunk_count", static_cast<uint64_t>(1));
  w.kv("chunk_sizes", std::vector<uint64_t>{archive.size()}).kv("chunk_xxh3", std::vector<uint64_t>{xxh3(archive.data(), archive.size())});
  w.key("codec").packer().pack_map(2);
  w.packer().pack(std::string("name")), w.packer().pack(std::string("none"));
  w.packer().pack(std::string("filter")), w.packer().pack(std::string("none"));
  Completed c;
  c.raw = w.bytes();
  c.manifest = decode_manifest(c.raw.data(), c.raw.size(), Limits(), true);
  c.archive = std::shared_ptr<uint8_t[]>(new uint8_t[archive.size()]);
  std::memcpy(c.archive.get(), archive.data(), archive.size());
  c.digest = c.manifest->archive_sha256;
  s.cache.put(c);
  return c.manifest;
}

Request infer_request(Requests& req, const std::string& model, at::Tensor x, uint64_t pin = 0) {
  msgpack::sbuffer spec;
  msgpack::packer<msgpack::sbuffer> pk(spec);
  std::vector<at::Tensor> tensors;
  encode_tree(c10::ivalue::Tuple::create({x}), pk, tensors);
  auto inputs = msgpack::unpack(spec.data(), spec.size());
  InferRequest h;
  h.model = model, h.id = "7", h.inputs = inputs.get(), h.version = pin;
  std::vector<zmq::message_t> frames;
  frames.emplace_back(std::string("INFER"));
  frames.emplace_back(encode(h));
  for (auto& t : tensors) frames.emplace_back(t.data_ptr(), t.numel() * t.element_size());
  return req.admit("client", frames, now_s());
}

std::pair<std::string, msgpack::object_handle> reply_of(std::vector<zmq::message_t>& frames) {
  std::string kind(static_cast<const char*>(frames[0].data()), frames[0].size());
  return {kind, msgpack::unpack(static_cast<const char*>(frames[1].data()), frames[1].size())};
}

TEST_CASE("the load path loads, checks and swaps a cached release; the request path serves it") {
  TempDir dir;
  NodeState s(args_for(dir.path));
  std::vector<Result> posted;
  Loads loads(s, [&](Result r) { posted.push_back(std::move(r)); });
  Requests requests(s);
  auto r0 = infer_request(requests, "m", at::ones({2}));
  auto [kind0, h0] = reply_of(*std::make_unique<std::vector<zmq::message_t>>(requests.infer(r0, "w0")));
  CHECK(kind0 == "ERROR");
  CHECK(Map(h0.get()).str("code") == "not_ready");

  auto m1 = cached_release(s, 1, "def forward(self, x):\n  return x * 2\n");
  Result r{Result::Rejected, "m", m1->label, "", 1};
  loads.load(m1, s.cache.path("m", 1).string(), nullptr, r);
  REQUIRE(posted.size() == 1);
  CHECK(posted[0].kind == Result::Loaded);

  auto req = infer_request(requests, "m", at::arange(3, at::kFloat));
  auto frames = requests.infer(req, "w0");
  auto [kind, h] = reply_of(frames);
  REQUIRE(kind == "OK");
  auto reply = h.get().as<InferReply>();
  CHECK((reply.seq == 1 && reply.id == "7" && reply.worker == "w0"));
  auto out = decode_tree(reply.outputs, {{frames[2].data(), frames[2].size()}});
  CHECK(at::equal(out.toTensor(), at::arange(3, at::kFloat) * 2));

  auto pinned = infer_request(requests, "m", at::ones({1}), 9);
  auto pf = requests.infer(pinned, "w0");
  CHECK(Map(reply_of(pf).second.get()).str("code") == "version_unavailable");
  auto unknown = infer_request(requests, "nope", at::ones({1}));
  auto uf = requests.infer(unknown, "w0");
  CHECK(Map(reply_of(uf).second.get()).str("code") == "unknown_model");
  CHECK((s.counts.at("m").requests == 3 && s.counts.at("m").errors == 0));

  auto m2 = cached_release(s, 2, "def forward(self, x):\n  return x.reshape([7, 3]) + 1\n");
  Result r2{Result::Rejected, "m", m2->label, "", 2};
  loads.load(m2, s.cache.path("m", 2).string(), nullptr, r2);
  auto big = infer_request(requests, "m", at::full({2}, 100.0));
  auto bf = requests.infer(big, "w0");
  CHECK(Map(reply_of(bf).second.get()).str("code") == "model_error");
  CHECK(s.counts.at("m").errors == 1);

  Result back{Result::Rejected, "m", m1->label, "", 1};
  loads.load(m1, s.cache.path("m", 1).string(), nullptr, back);  // never steps back
  CHECK(posted.back().kind == Result::Rejected);
  CHECK(posted.back().reason.find("superseded by seq 2") != std::string::npos);
}

TEST_CASE("the request path refuses oversize and malformed requests before any model runs") {
  TempDir dir;
  auto a = args_for(dir.path);
  NodeState s(a);
  s.limits.max_request_tensors = 1;
  Requests requests(s);
  std::vector<zmq::message_t> frames;
  frames.emplace_back(std::string("INFER"));
  frames.emplace_back(std::string("\xc1"));  // not msgpack
  CHECK_THROWS_WITH_AS(requests.admit("c", frames, 0.0), doctest::Contains("bad INFER header"), Error);
  msgpack::sbuffer spec;
  msgpack::packer<msgpack::sbuffer> pk(spec);
  std::vector<at::Tensor> tensors;
  encode_tree(c10::ivalue::Tuple::create({at::ones({1}), at::ones({1})}), pk, tensors);
  auto inputs = msgpack::unpack(spec.data(), spec.size());
  InferRequest h;
  h.model = "m", h.id = "1", h.inputs = inputs.get();
  std::vector<zmq::message_t> two;
  two.emplace_back(std::string("INFER"));
  two.emplace_back(encode(h));
  for (auto& t : tensors) two.emplace_back(t.data_ptr(), t.numel() * t.element_size());
  try {
    requests.admit("c", two, 0.0);
    FAIL("a request over the tensor limit was admitted");
  } catch (const Error& e) {
    CHECK(e.code == "too_large");
  }
  // batch keys: only for a model this node serves (a client's names grow no per-model state)
  s.limits.max_request_tensors = 8;
  for (const char* model : {"m", "not-served"}) {
    h.model = model;
    std::vector<zmq::message_t> again;
    again.emplace_back(std::string("INFER"));
    again.emplace_back(encode(h));
    for (auto& t : tensors) again.emplace_back(t.data_ptr(), t.numel() * t.element_size());
    Request r = requests.admit("c", again, 0.0);
    CHECK(r.key.empty() == (std::string(model) != "m"));
  }
}

TEST_CASE("the follow path routes broadcasts by the framing table") {
  TempDir dir;
  NodeState s(args_for(dir.path));
  Follower f({"m"}, s.follow_config);
  Follows follows(s, f);
  auto frames = [](std::vector<std::string> parts) {
    std::vector<zmq::message_t> out;
    for (auto& p : parts) out.emplace_back(p);
    return out;
  };
  Heartbeat beat;
  beat.hub = "hub", beat.name = "m", beat.seq = 5, beat.sha256 = std::string(64, 'a');
  auto msg = frames({std::string("m") + '\0', "HEARTBEAT", encode(beat)});
  follows.on_broadcast(msg, 1.0);
  REQUIRE(follows.sends.size() == 1);  // a newer seq than held: its manifest is asked for
  auto ask = decode<FetchManifest>(Kind::FetchManifest, follows.sends[0][1].data(), follows.sends[0][1].size());
  CHECK((follows.sends[0][0] == kind_name(Kind::FetchManifest) && ask.seq == 5));
  auto short_chunk = frames({std::string("m") + '\0', "CHUNK", encode(ChunkHeader{"m", 5, 0, V})});
  CHECK_THROWS_WITH_AS(follows.on_broadcast(short_chunk, 1.1), doctest::Contains("CHUNK of 2 frame(s)"), Error);
  auto other = frames({std::string("x") + '\0', "HEARTBEAT", encode(beat)});
  CHECK_THROWS_AS(follows.on_broadcast(other, 1.2), Error);
  ErrorReply err;
  err.code = "not_found", err.name = "m", err.seq = 5;
  auto reply = frames({"ERROR", encode(err)});
  follows.on_reply(reply, 1.3);
  CHECK(f.stats["hub_error_not_found"] == 1);
}

}  // namespace

TEST_CASE("batching: keys, the evidence for a wait, and splitting outputs (zmqmodels/core/batching.py)") {
  auto spec = [](const std::string& dtype, std::vector<int64_t> a, std::vector<int64_t> b) {
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    pk.pack_map(2);
    pk.pack(std::string("t")), pk.pack(std::string("tuple"));
    pk.pack(std::string("items"));
    size_t n = b.empty() ? 1 : 2;
    pk.pack_array(static_cast<uint32_t>(n));
    for (size_t i = 0; i < n; ++i) {
      pk.pack_map(4);
      pk.pack(std::string("t")), pk.pack(std::string("tensor"));
      pk.pack(std::string("dtype")), pk.pack(dtype);
      pk.pack(std::string("shape")), pk.pack(i == 0 ? a : b);
      pk.pack(std::string("f")), pk.pack(static_cast<int64_t>(i));
    }
    return msgpack::unpack(buf.data(), buf.size());
  };
  int64_t rows = 0;
  auto k1 = batch_key(spec("float32", {3, 4}, {}).get(), rows);
  CHECK(rows == 3);
  CHECK(k1 == batch_key(spec("float32", {1, 4}, {}).get(), rows));
  CHECK(k1 != batch_key(spec("float32", {1, 5}, {}).get(), rows));
  CHECK(k1 != batch_key(spec("float64", {1, 4}, {}).get(), rows));
  CHECK(batch_key(spec("float32", {2, 4}, {3, 4}).get(), rows).empty());  // leading dims differ
  CHECK(batch_key(spec("float32", {}, {}).get(), rows).empty());          // 0-d
  CHECK(batch_key(spec("float32", {0, 4}, {}).get(), rows).empty());

  Evidence e(0.001);
  CHECK(e.hold_until("m", 1, 1, 32, 0.0, 0.0) < 0);  // nothing seen: go
  for (int i = 0; i < 10; ++i) e.arrived("m", i * 0.0001);
  e.dispatched("m", 8, 0.001);
  CHECK(e.hold_until("m", 2, 2, 32, 0.0011, 0.0012) == doctest::Approx(0.0021));  // 8 last time: wait
  CHECK(e.hold_until("m", 8, 8, 32, 0.0011, 0.0012) < 0);   // as many as last time
  CHECK(e.hold_until("m", 2, 32, 32, 0.0011, 0.0012) < 0);  // full
  CHECK(e.hold_until("m", 2, 2, 32, 0.0011, 0.0022) < 0);   // the delay is over
  e.dispatched("m", 1, 0.003);
  CHECK(e.hold_until("m", 1, 1, 32, 0.0031, 0.0031) < 0);   // one at a time: never held

  auto out = c10::ivalue::Tuple::create({at::arange(12).reshape({6, 2}), at::arange(6)});
  auto parts = split_outputs(out, {1, 2, 3});
  REQUIRE(parts.size() == 3);
  CHECK(at::equal(parts[1].toTupleRef().elements()[0].toTensor(), at::arange(2, 6).reshape({2, 2})));
  CHECK(at::equal(parts[2].toTupleRef().elements()[1].toTensor(), at::arange(3, 6)));
  CHECK_THROWS(split_outputs(at::arange(5), {1, 2, 3}));
  auto joined = join_inputs({{at::ones({1, 2})}, {at::zeros({2, 2})}});
  CHECK(joined[0].toTensor().size(0) == 3);
}

// -- the conformance vectors (tests/vectors/follow.json), as tests/unit/test_vectors.py runs them
#include <nlohmann/json.hpp>

namespace {

using json = nlohmann::json;

std::string unhex(const std::string& h) {
  std::string out(h.size() / 2, '\0');
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<char>(std::stoi(h.substr(2 * i, 2), nullptr, 16));
  return out;
}

// What the follower did since the last call, as the vectors write it: sends in order, then
// deliveries, then unstaged releases.
json drain(Actions actions) {
  Kept f;
  f(std::move(actions));
  json out = json::array();
  for (auto& frames : f.sends) {
    if (frames[0] == kind_name(Kind::FetchManifest)) {
      auto h = decode<FetchManifest>(Kind::FetchManifest, frames[1].data(), frames[1].size());
      out.push_back({{"send", "fetch_manifest"}, {"seq", h.seq}});
    } else if (frames[0] == kind_name(Kind::FetchChunks)) {
      auto h = decode<FetchChunks>(Kind::FetchChunks, frames[1].data(), frames[1].size());
      out.push_back({{"send", "fetch_chunks"}, {"seq", h.seq}, {"indices", h.indices}});
    } else if (frames[0] == kind_name(Kind::Report)) {
      auto h = decode<Report>(Kind::Report, frames[1].data(), frames[1].size());
      out.push_back({{"send", "report"}, {"state", h.state}, {"seq", h.seq}, {"staged", h.staged}});
    } else {
      out.push_back({{"send", frames[0]}});
    }
  }
  for (auto& c : f.completed) {
    CHECK(c.digest == c.manifest->archive_sha256);
    out.push_back({{"deliver", c.manifest->seq}, {"active", c.active}});
  }
  for (auto& [name, seq] : f.unstaged) out.push_back({{"unstage", seq}});
  return out;
}

}  // namespace

TEST_CASE("the C++ follower follows the conformance vectors") {
  std::ifstream in(ZM_VECTORS);
  REQUIRE(in.good());
  json doc = json::parse(in);
  const json& rels = doc["releases"];
  for (const auto& c : doc["cases"]) {
    SUBCASE(c["name"].get<std::string>().c_str()) {
      Config cfg;
      cfg.node_id = "n1", cfg.host = "h", cfg.device = "cpu";
      if (c.contains("limits") && c["limits"].contains("max_archive_bytes"))
        cfg.limits.max_archive_bytes = c["limits"]["max_archive_bytes"].get<uint64_t>();
      Follower f({"m"}, cfg);
      int i = 0;
      for (const auto& ev : c["events"]) {
        double t = ev["t"].get<double>();
        std::string what = ev["do"];
        Actions acts;
        const json* r = ev.contains("release") ? &rels[ev["release"].get<std::string>()] : nullptr;
        std::string raw = r ? unhex((*r)["manifest"].get<std::string>()) : "";
        if (what == "start") {
          acts = f.start(t);
        } else if (what == "manifest") {
          auto m = decode_manifest(raw.data(), raw.size(), cfg.limits, false);
          acts = f.on_manifest(m, raw, "", t, ev.value("fetched", false));
        } else if (what == "chunk") {
          uint64_t index = ev["index"];
          std::string payload = unhex((*r)["chunks"][index].get<std::string>());
          if (ev.value("corrupt", false)) payload[0] = static_cast<char>(payload[0] ^ 0xFF);
          acts = f.on_chunk("m", (*r)["seq"].get<uint64_t>(), index, payload.data(), payload.size(), t, ev.value("fetched", false));
        } else if (what == "beat") {
          std::string sha = ev.contains("names") ? rels[ev["names"].get<std::string>()]["sha256"].get<std::string>() : "";
          acts = f.on_beat("m", ev["seq"], sha, ev.value("active", uint64_t{0}), t);
        } else if (what == "activate") {
          acts = f.on_activate("m", ev["seq"], ev.value("nodes", std::vector<std::string>{}));
        } else if (what == "tick") {
          acts = f.tick(t);
        } else if (what == "held") {
          acts = f.held("m", (*r)["seq"].get<uint64_t>());
        } else if (what == "served") {
          acts = f.set_state("m", State::Serving, ev["seq"], ev.value("label", std::string()));
        } else {
          FAIL("unknown event " << what);
        }
        json got = drain(std::move(acts));
        INFO("event " << i << " (" << what << "): got " << got.dump() << ", want " << ev["expect"].dump());
        CHECK(got == ev["expect"]);
        ++i;
      }
    }
  }
}

TEST_CASE("the C++ batching evidence follows the conformance vectors") {
  std::ifstream in(ZM_BATCHING_VECTORS);
  REQUIRE(in.good());
  nlohmann::json doc = nlohmann::json::parse(in);
  for (const auto& c : doc["cases"]) {
    SUBCASE(c["name"].get<std::string>().c_str()) {
      Evidence e(c["delay_s"].get<double>());
      int i = 0;
      for (const auto& ev : c["events"]) {
        if (ev.contains("arrived")) {
          e.arrived("m", ev["arrived"].get<double>());
        } else if (ev.contains("dispatched")) {
          e.dispatched("m", ev["dispatched"].get<size_t>(), ev["t"].get<double>());
        } else if (ev.contains("served")) {
          e.served("m", ev["served"].get<double>());
        } else {
          const auto& a = ev["ask"];
          double free_since = a.contains("free_since") ? a["free_since"].get<double>() : -1e300;
          double got = e.hold_until("m", a["count"].get<size_t>(), a["rows"].get<int64_t>(), a["cap"].get<int64_t>(),
                                    a["oldest"].get<double>(), a["now"].get<double>(), free_since);
          INFO("event " << i << ": got " << got << ", want " << ev["expect"].dump());
          if (ev["expect"].is_null())
            CHECK(got < 0);
          else
            CHECK(got == doctest::Approx(ev["expect"].get<double>()));
        }
        ++i;
      }
    }
  }
}

TEST_CASE("the C++ node chooses the part of a release as the conformance vectors say") {
  std::ifstream in(ZM_FORMAT_VECTORS);
  REQUIRE(in.good());
  nlohmann::json doc = nlohmann::json::parse(in);
  for (const auto& c : doc["cases"]) {
    SUBCASE(c["name"].get<std::string>().c_str()) {
      Manifest m;
      m.name = "m", m.seq = 1, m.format = c["format"].get<std::string>();
      m.devices = c["devices"].get<std::vector<std::string>>();
      c10::Device device(c["device"].get<std::string>());
      if (c["serves"].is_null()) {
        try {
          serve_format(m, device);
          FAIL("served a release the vectors refuse");
        } catch (const Error& e) {
          CHECK(std::string(e.what()).find("compiled for " + m.devices[0]) != std::string::npos);
        }
      } else {
        CHECK(serve_format(m, device) == c["serves"].get<std::string>());
      }
    }
  }
}
