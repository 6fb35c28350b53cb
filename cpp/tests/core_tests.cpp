// Unit tests of the C++ node's library (zmqmodels_core): the follower's repair rules, the
// manifest checks, the tensor codec, the slot's ordering. Run by tests/test_cpp_node.py.
#include "follower.hpp"
#include "model.hpp"

#include <atomic>
#include <cstdio>
#include <functional>
#include <thread>

using namespace zm;

static int failures = 0;
#define EXPECT(cond)                                                    \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                        \
    }                                                                    \
  } while (0)

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

// The FETCH_CHUNKS indices the follower asked for since the last call.
std::vector<uint64_t> fetched(Follower& f) {
  std::vector<uint64_t> out;
  for (auto& frames : f.sends) {
    if (frames[0] != "FETCH_CHUNKS") continue;
    auto oh = msgpack::unpack(frames[1].data(), frames[1].size());
    for (auto i : Map(oh.get()).u64s("indices")) out.push_back(i);
  }
  f.sends.clear();
  return out;
}

void test_a_skipped_index_fetches_only_the_skipped_ones() {
  auto f = make_follower();
  auto r = make_release(1, 6, 100);
  f.on_manifest(r.m, r.raw, "", 0.0, false);
  f.on_chunk("m", 1, 0, r.chunks[0].data(), 100, 0.1, false);
  EXPECT(fetched(f).empty());
  f.on_chunk("m", 1, 3, r.chunks[3].data(), 100, 0.2, false);  // 1 and 2 were dropped
  EXPECT((fetched(f) == std::vector<uint64_t>{1, 2}));
}

void test_a_slow_broadcast_is_not_a_loss_and_the_beat_ends_it() {
  auto f = make_follower();
  auto r = make_release(1, 6, 100);
  f.on_manifest(r.m, r.raw, "", 0.0, false);
  double t = 0;
  for (int i = 0; i < 3; ++i) {  // a chunk every 0.4 s: slower than the idle timer, but steady
    t += 0.4;
    f.tick(t - 0.01);
    f.on_chunk("m", 1, static_cast<uint64_t>(i), r.chunks[i].data(), 100, t, false);
  }
  f.tick(t + 1.5);
  EXPECT(fetched(f).empty());
  f.on_beat("m", 1, r.m->archive_sha256, 0, t + 1.6);  // sent after the last chunk: the rest is lost
  EXPECT((fetched(f) == std::vector<uint64_t>{3, 4, 5}));
  for (int i = 3; i < 6; ++i) f.on_chunk("m", 1, static_cast<uint64_t>(i), r.chunks[i].data(), 100, t + 1.7, true);
  EXPECT(f.completed.size() == 1 && f.completed[0].digest == r.m->archive_sha256);
}

void test_a_manifest_over_the_limits_is_refused_once_and_a_corrupt_chunk_refetched() {
  auto f = make_follower();
  auto big = make_release(2, 2, 100, 8ull << 40);  // declares 8 TiB: refused before allocating
  f.on_manifest(big.m, big.raw, "", 0.0, false);
  f.on_manifest(big.m, big.raw, "", 0.1, true);
  int rejected = 0;
  for (auto& frames : f.sends) rejected += frames[1].find("rejected") != std::string::npos;
  EXPECT(rejected == 1);
  f.sends.clear();
  auto r = make_release(3, 3, 100);
  f.on_manifest(r.m, r.raw, "", 1.0, false);
  std::string bad(100, 'x');
  f.on_chunk("m", 3, 0, bad.data(), bad.size(), 1.1, false);
  EXPECT((fetched(f) == std::vector<uint64_t>{0}));
}

void test_staged_releases_wait_for_activation() {
  auto f = make_follower();
  f.held("m", 4);
  EXPECT(f.unstaged.empty());
  f.on_activate("m", 4, {"other"});
  EXPECT(f.unstaged.empty());
  f.on_activate("m", 4, {"n"});
  EXPECT(f.unstaged.size() == 1 && f.unstaged[0].second == 4);
  auto g = make_follower();
  g.held("m", 5);
  g.on_beat("m", 5, "", 5, 0.0);  // active fleet-wide
  EXPECT(g.unstaged.size() == 1);
}

void test_the_tensor_codec_round_trips() {
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
  EXPECT(at::equal(xs[0].toTensor(), at::ones({2}, at::kLong)));
  EXPECT(at::equal(xs[1].toGenericDict().at("a").toTensor(), d.at("a")));
  EXPECT(xs[2].toInt() == 7);
  bool refused = false;
  try {
    bufs.pop_back();
    decode_tree(oh.get(), bufs);
  } catch (const Error& e) {
    refused = e.code == "bad_request";
  }
  EXPECT(refused);
}

void test_the_slot_lets_older_requests_finish_before_a_newer_version_serves() {
  Slot slot;
  auto v1 = std::make_shared<Loaded>(), v2 = std::make_shared<Loaded>();
  slot.offer(v1);
  auto held = slot.begin();  // a request on v1, still running
  EXPECT(held == v1);
  std::atomic<bool> offered{false}, started{false};
  std::shared_ptr<const Loaded> retired, got;
  std::thread loader([&] {
    retired = slot.offer(v2);
    offered = true;
  });
  std::thread request([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    got = slot.begin();  // arrives after the offer: waits for the v1 request
    started = true;
    slot.end();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT(!started && !offered);  // nobody answers on v2 while an older request is running
  slot.end();
  loader.join();
  request.join();
  EXPECT(started && offered && got == v2 && retired == v1 && slot.newest() == v2);
}

void test_a_hung_old_request_does_not_hold_the_new_version_back_for_long() {
  Slot slot;
  auto v1 = std::make_shared<Loaded>(), v2 = std::make_shared<Loaded>();
  slot.offer(v1);
  auto hung = slot.begin();  // never ends
  std::thread loader([&] { slot.offer(v2, 0.1); });
  loader.join();
  auto t0 = now_s();
  auto got = slot.begin();
  double waited = now_s() - t0;
  EXPECT(got == v2 && waited > 1.5 && waited < 5.0);
  slot.end();
}

void test_strings_sent_are_utf8_and_strings_taken_must_be() {
  EXPECT(is_utf8("caf\xc3\xa9 \xe2\x80\xa6", 10));
  EXPECT(!is_utf8("pr\xa3" "be", 5));
  EXPECT(!is_utf8("\xc3", 1));          // cut short
  EXPECT(!is_utf8("\xed\xa0\x80", 3));  // a surrogate
  std::string dots = "ab\xe2\x80\xa6";  // "ab…"
  EXPECT(utf8_prefix(dots, 4) == "ab" && utf8_prefix(dots, 5) == dots);
  MapWriter w(1);
  w.kv("model", std::string("pr\xa3" "be"));
  auto oh = msgpack::unpack(w.bytes().data(), w.bytes().size());
  bool refused = false;
  try {
    Map(oh.get()).str("model");
  } catch (const Error& e) {
    refused = e.code == "bad_message";
  }
  EXPECT(refused);
}

}  // namespace

int main() {
  std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"skip", test_a_skipped_index_fetches_only_the_skipped_ones},
      {"slow", test_a_slow_broadcast_is_not_a_loss_and_the_beat_ends_it},
      {"refuse", test_a_manifest_over_the_limits_is_refused_once_and_a_corrupt_chunk_refetched},
      {"staged", test_staged_releases_wait_for_activation},
      {"codec", test_the_tensor_codec_round_trips},
      {"slot", test_the_slot_lets_older_requests_finish_before_a_newer_version_serves},
      {"hung", test_a_hung_old_request_does_not_hold_the_new_version_back_for_long},
      {"utf8", test_strings_sent_are_utf8_and_strings_taken_must_be},
  };
  for (auto& [name, fn] : tests) {
    int before = failures;
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: threw %s\n", name, e.what());
      ++failures;
    }
    std::printf("%s %s\n", failures == before ? "ok  " : "FAIL", name);
  }
  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
