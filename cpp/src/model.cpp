#include "model.hpp"

#include "batching.hpp"

#include <ATen/Parallel.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/cuda.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <regex>
#include <sstream>

namespace zm {

namespace {

double now_perf() { return now_s(); }

// A read-only, seekable stream buffer over bytes in memory (what torch::jit::load reads from).
class MemoryBuf : public std::streambuf {
 public:
  MemoryBuf(const char* p, size_t n) {
    char* b = const_cast<char*>(p);  // never written: only the get area is set
    setg(b, b, b + n);
  }

 protected:
  pos_type seekoff(off_type off, std::ios_base::seekdir dir, std::ios_base::openmode) override {
    char* base = dir == std::ios_base::beg ? eback() : dir == std::ios_base::cur ? gptr() : egptr();
    char* to = base + off;
    if (to < eback() || to > egptr()) return pos_type(off_type(-1));
    setg(eback(), to, egptr());
    return pos_type(to - eback());
  }
  pos_type seekpos(pos_type pos, std::ios_base::openmode mode) override {
    return seekoff(off_type(pos), std::ios_base::beg, mode);
  }
};

c10::IValue to_device(const c10::IValue& v, const c10::Device& d) {
  if (v.isTensor()) return v.toTensor().to(d);
  if (v.isTuple()) {
    std::vector<c10::IValue> xs;
    for (auto& x : v.toTupleRef().elements()) xs.push_back(to_device(x, d));
    return c10::ivalue::Tuple::create(std::move(xs));
  }
  if (v.isTensorList()) {
    c10::List<at::Tensor> l;
    for (const at::Tensor& t : v.toTensorList()) l.push_back(t.to(d));
    return l;
  }
  if (v.isList()) {
    auto src = v.toList();
    c10::impl::GenericList l(src.elementType());
    for (const auto& x : src) l.push_back(to_device(x, d));
    return l;
  }
  if (v.isGenericDict()) {
    auto src = v.toGenericDict();
    c10::impl::GenericDict out(src.keyType(), src.valueType());
    for (const auto& e : src) out.insert(e.key(), to_device(e.value(), d));
    return out;
  }
  return v;
}

void check_finite(const c10::IValue& v, const std::string& path) {
  if (v.isTensor()) {
    auto t = v.toTensor();
    if ((t.is_floating_point() || t.is_complex()) && !at::isfinite(t).all().item<bool>())
      throw Error("check", path + ": NaN or Inf in the output");
  } else if (v.isTuple()) {
    auto& xs = v.toTupleRef().elements();
    for (size_t i = 0; i < xs.size(); ++i) check_finite(xs[i], path + "[" + std::to_string(i) + "]");
  } else if (v.isList()) {
    size_t i = 0;
    for (const auto& x : v.toListRef()) check_finite(x, path + "[" + std::to_string(i++) + "]");
  } else if (v.isGenericDict()) {
    for (const auto& e : v.toGenericDict()) check_finite(e.value(), path + "['" + e.key().toStringRef() + "']");
  }
}

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << dtype_name(t.scalar_type()) << "[";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << "]";
  return s.str();
}

std::vector<c10::IValue> items(const c10::IValue& v) {
  std::vector<c10::IValue> out;
  if (v.isTuple()) {
    for (auto& x : v.toTupleRef().elements()) out.push_back(x);
  } else if (v.isList()) {
    for (const auto& x : v.toListRef()) out.push_back(x);
  }
  return out;
}

std::string kind(const c10::IValue& v) { return v.tagKind(); }

}  // namespace

void compare_outputs(const c10::IValue& want, const c10::IValue& got, const std::string& path, bool gpu) {
  if (want.isTensor()) {
    if (!got.isTensor()) throw Error("check", path + ": expected a tensor, got " + kind(got));
    at::Tensor a = want.toTensor().cpu(), b = got.toTensor().cpu();
    if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes())
      throw Error("check", path + ": expected " + shape_str(a) + ", got " + shape_str(b));
    if (a.numel() == 0) return;
    if (!(a.is_floating_point() || a.is_complex())) {
      if (!at::equal(a, b)) throw Error("check", path + ": integer outputs differ");
      return;
    }
    std::string name = dtype_name(a.scalar_type());
    double rt = 1e-5, at = 1e-6;
    if (name == "float64") rt = 1e-7, at = 1e-9;
    else if (name == "float16") rt = 1e-3, at = 1e-3;
    else if (name == "bfloat16") rt = 1.6e-2, at = 1e-2;
    if (gpu) rt = at = 1e-3;
    if (!at::equal(at::isnan(a), at::isnan(b))) throw Error("check", path + ": NaN in different positions");
    auto wide = a.is_complex() ? at::kComplexDouble : at::kDouble;
    at::Tensor a64 = a.to(wide), b64 = b.to(wide);
    at::Tensor inf = at::isinf(a64) | at::isinf(b64);
    if (!at::equal(a64.index({inf}), b64.index({inf})))
      throw Error("check", path + ": Inf in different positions or signs");
    at::Tensor finite = ~(at::isnan(a64) | inf);
    at::Tensor d = (a64 - b64).abs().index({finite});
    double diff = d.numel() ? d.max().item<double>() : 0.0;
    if (std::isnan(diff) || !at::allclose(a64.index({finite}), b64.index({finite}), rt, at)) {
      std::ostringstream s;
      s << path << ": max abs diff " << std::setprecision(3) << diff << " exceeds rtol=" << rt << ", atol=" << at;
      throw Error("check", s.str());
    }
    return;
  }
  if (want.isTuple() || want.isList()) {
    auto w = items(want), g = items(got);
    if (!(got.isTuple() || got.isList()) || w.size() != g.size())
      throw Error("check", path + ": expected a sequence of " + std::to_string(w.size()) + ", got " + kind(got));
    for (size_t i = 0; i < w.size(); ++i) compare_outputs(w[i], g[i], path + "[" + std::to_string(i) + "]", gpu);
    return;
  }
  if (want.isGenericDict()) {
    if (!got.isGenericDict()) throw Error("check", path + ": expected a dict, got " + kind(got));
    auto w = want.toGenericDict(), g = got.toGenericDict();
    if (w.size() != g.size()) throw Error("check", path + ": dict keys differ");
    for (const auto& e : w) {
      auto it = g.find(e.key());
      if (it == g.end()) throw Error("check", path + ": dict keys differ");
      compare_outputs(e.value(), it->value(), path + "['" + e.key().toStringRef() + "']", gpu);
    }
    return;
  }
  if (want != got) throw Error("check", path + ": expected " + kind(want) + " value differs");
}

// The manifest's batch claim on this device: the examples' rows joined (16 at most), each row
// compared with its example's expected output (zmqmodels/model/batching.py check_batched).
void check_batched(Loaded& out, const std::vector<c10::IValue>& examples, const std::vector<c10::IValue>& expected,
                   bool gpu) {
  try {
    std::vector<std::vector<c10::IValue>> samples;
    std::vector<c10::IValue> wants;
    for (size_t i = 0; i < examples.size() && i < expected.size(); ++i) {
      auto args = items(examples[i]);
      int64_t n = args.at(0).toTensor().size(0);
      auto rows = split_outputs(expected[i], std::vector<int64_t>(n, 1));
      for (int64_t j = 0; j < n; ++j) {
        std::vector<c10::IValue> row;
        for (auto& a : args) row.emplace_back(a.toTensor().narrow(0, j, 1));
        samples.push_back(std::move(row));
        wants.push_back(rows[j]);
      }
    }
    int64_t size = std::min<int64_t>(static_cast<int64_t>(out.manifest->batch), 16);
    std::vector<std::vector<c10::IValue>> joined;
    std::vector<size_t> order;
    for (int64_t r = 0; r < size; ++r) {
      order.push_back(static_cast<size_t>(r) % samples.size());
      joined.push_back(samples[order.back()]);
    }
    auto in = to_device(c10::ivalue::Tuple::create(join_inputs(joined)), out.device);
    auto got = to_device(out.forward(items(in)), at::kCPU);
    auto parts = split_outputs(got, std::vector<int64_t>(size, 1));
    for (int64_t r = 0; r < size; ++r)
      compare_outputs(wants[order[r]], parts[r], "row " + std::to_string(r) + " of " + std::to_string(size), gpu);
    out.batch = static_cast<int64_t>(out.manifest->batch);
  } catch (const std::exception& e) {
    out.batch = 1;
    out.batch_note = "the batch claim did not hold on " + out.device.str() + ": " + utf8_prefix(e.what(), 300);
  }
}

c10::IValue Loaded::forward(std::vector<c10::IValue> args) const {
  if (!pt2) return const_cast<torch::jit::Module&>(module).forward(std::move(args));
  std::vector<at::Tensor> in;
  in.reserve(args.size());
  for (auto& a : args) {
    if (!a.isTensor()) throw Error("bad_input", "a pt2 package takes tensors only");
    in.push_back(a.toTensor());
  }
  auto outs = pt2->run(in);
  if (outs.size() == 1) return outs[0];
  return c10::ivalue::Tuple::create(std::vector<c10::IValue>(outs.begin(), outs.end()));
}

namespace {

std::string device_kind(const c10::Device& d) { return d.is_cpu() ? "cpu" : c10::DeviceTypeName(d.type(), true); }

// A private file holding `n` bytes (the loader takes a package by path); removed by the caller.
std::string temp_file(const void* p, size_t n) {
  char name[] = "/tmp/zmqmodels-pt2-XXXXXX";
  int fd = mkstemp(name);
  if (fd < 0) throw Error("check", "cannot write the pt2 package to a temporary file");
  std::string path = std::string(name) + ".pt2";
  close(fd);
  std::rename(name, path.c_str());
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
  if (!f) throw Error("check", "cannot write the pt2 package to " + path);
  return path;
}

// The archive's bytes: `path` mapped copy-on-write (kept alive by `keep`), else `data` (the
// caller's buffer, alive only while loading: what binds to it is copied).
const uint8_t* archive_bytes(const std::string& path, const void* data, size_t len, std::shared_ptr<void>& keep) {
  if (path.empty()) return static_cast<const uint8_t*>(data);
  int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("check", "cannot open " + path);
  void* p = len ? mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0) : nullptr;
  close(fd);
  if (p == MAP_FAILED) throw Error("check", "cannot map " + path);
  keep = std::shared_ptr<void>(p, [len](void* q) { if (q) munmap(q, len); });
  return static_cast<const uint8_t*>(p);
}

// Load the pt2 part of `m` and bind its constants to the archive's weights.
void load_pt2(Loaded& out, const Manifest& m, const std::string& path, const void* data, size_t len) {
  const uint8_t* base = archive_bytes(path, data, len, out.mapping);
  std::string package = path, temp;
  if (m.format != "pt2") {  // torchscript+pt2: the package is the TorchScript archive's extra file
    MemoryBuf buf(reinterpret_cast<const char*>(base), len);
    std::istream in(&buf);
    caffe2::serialize::PyTorchStreamReader reader(&in);
    if (!reader.hasRecord(gen::DUAL_ENTRY))
      throw Error("check", m.name + ": says " + m.format + " but holds no " + gen::DUAL_ENTRY);
    auto [ptr, n] = reader.getRecord(gen::DUAL_ENTRY);
    package = temp = temp_file(ptr.get(), n);
  } else if (path.empty()) {
    package = temp = temp_file(base, len);
  }
  try {
    int64_t index = out.device.is_cpu() ? -1 : out.device.index() < 0 ? 0 : out.device.index();
    out.pt2 = std::make_shared<torch::inductor::AOTIModelPackageLoader>(package, "model", false, 1, index);
  } catch (const std::exception& e) {
    if (!temp.empty()) std::remove(temp.c_str());
    std::string what = e.what();
    throw Error("check", "the pt2 package does not load: " + what.substr(0, what.find('\n')));
  }
  if (!temp.empty()) std::remove(temp.c_str());
  std::unordered_map<std::string, at::Tensor> bound;
  for (const auto& t : m.tensors) {
    if (t.start + t.nbytes > len || xxh3(base + t.start, t.nbytes) != t.xxh3)
      throw Error("check", m.name + ": the bytes of " + t.name + " do not match the manifest's descriptor");
    auto view = at::from_blob(const_cast<uint8_t*>(base + t.start), t.shape, at::TensorOptions().dtype(dtype_of(t.dtype)));
    bound[t.name] = !out.device.is_cpu() ? view.to(out.device) : out.mapping ? view : view.clone();
  }
  std::unordered_map<std::string, at::Tensor> wanted;
  for (const auto& fqn : out.pt2->get_constant_fqns()) {
    auto it = bound.find(fqn);
    if (it == bound.end()) throw Error("check", "the pt2 package needs a constant the release does not hold: " + fqn);
    wanted[fqn] = it->second;
    out.constants.push_back(it->second);
  }
  try {
    out.pt2->load_constants(wanted, false, true, true);
  } catch (const std::exception& e) {
    std::string what = e.what();
    throw Error("check", "the pt2 package refused its constants: " + what.substr(0, what.find('\n')));
  }
}

}  // namespace

std::string serve_format(const Manifest& m, const c10::Device& device) {
  bool here = std::find(m.devices.begin(), m.devices.end(), device_kind(device)) != m.devices.end();
  if (m.format.find("pt2") != std::string::npos && here) return "pt2";
  if (m.format.find("torchscript") != std::string::npos) return "torchscript";
  std::string kinds;
  for (const auto& d : m.devices) kinds += (kinds.empty() ? "" : ", ") + d;
  throw Error("check", m.name + " seq " + std::to_string(m.seq) + ": its pt2 package was compiled for " +
                           (kinds.empty() ? "no device" : kinds) + ", this node runs " + device.str() +
                           ", and the release carries no TorchScript (publish it with --format torchscript,pt2, "
                           "or compile the package on this kind of device)");
}

std::shared_ptr<const Loaded> load_release(const std::shared_ptr<Manifest>& m, const std::string& path,
                                           const void* data, size_t len, const c10::Device& device, int warmup) {
  auto out = std::make_shared<Loaded>();
  out->manifest = m;
  out->device = device;
  out->format = serve_format(*m, device);
  double t0 = now_perf();
  try {
    if (out->format == "pt2") {
      load_pt2(*out, *m, path, data, len);
    } else if (!path.empty()) {
      out->module = torch::jit::load(path, device);
    } else {
      MemoryBuf buf(static_cast<const char*>(data), len);  // read in place: no copy of the archive
      std::istream in(&buf);
      out->module = torch::jit::load(in, device);
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    std::string what = e.what();
    throw Error("check", "torch.jit.load failed: " + what.substr(0, what.find('\n')));
  }
  if (!out->pt2) out->module.eval();
  double t1 = now_perf();
  bool gpu = !device.is_cpu();
  c10::InferenceMode guard;
  std::vector<c10::IValue> examples, expected;
  if (m->examples) examples = items(decode_pack(*m->examples));
  if (m->expected) expected = items(decode_pack(*m->expected));
  for (size_t i = 0; i < examples.size() && i < expected.size(); ++i) {
    std::string where = "example " + std::to_string(i) + " out";
    c10::IValue got;
    try {
      got = out->forward(items(to_device(examples[i], device)));
    } catch (const std::exception& e) {
      std::string what = e.what();
      throw Error("check", "example " + std::to_string(i) + ": model raised: " + utf8_prefix(what, 300));
    }
    got = to_device(got, at::kCPU);
    check_finite(got, where);
    compare_outputs(expected[i], got, where, gpu);
  }
  if (m->batch > 1 && !examples.empty()) check_batched(*out, examples, expected, gpu);
  for (int w = 0; w < (examples.empty() ? 0 : warmup); ++w) out->forward(items(to_device(examples[0], device)));
  if (gpu) torch::cuda::synchronize(device.index() < 0 ? 0 : device.index());
  out->load_s = t1 - t0;
  out->check_s = now_perf() - t1;
  return out;
}

void check_inputs(const Manifest& m, const std::vector<c10::IValue>& args) {
  if (m.inputs.empty()) return;
  if (args.size() != m.inputs.size())
    throw Error("bad_input", m.name + " takes " + std::to_string(m.inputs.size()) + " input(s), got " +
                                 std::to_string(args.size()));
  for (size_t i = 0; i < args.size(); ++i) {
    const InputSig& s = m.inputs[i];
    if (!s.tensor) continue;
    std::string pre = "input " + std::to_string(i) + ": ";
    if (!args[i].isTensor()) throw Error("bad_input", pre + "expected a " + s.dtype + " tensor");
    at::Tensor t = args[i].toTensor();
    std::ostringstream got, want;
    got << dtype_name(t.scalar_type()) << " [";
    for (int64_t d = 0; d < t.dim(); ++d) got << (d ? ", " : "") << t.size(d);
    got << "]";
    bool bad = dtype_name(t.scalar_type()) != s.dtype || t.dim() != s.rank;
    if (!s.shape.empty()) {
      want << s.dtype << " [";
      for (size_t d = 0; d < s.shape.size(); ++d) {
        int64_t dim = d == 0 ? -1 : s.shape[d];  // the leading (batch) dimension is never fixed
        want << (d ? ", " : "") << (dim < 0 ? std::string("*") : std::to_string(dim));
        if (!bad && dim >= 0 && static_cast<int64_t>(d) < t.dim() && t.size(static_cast<int64_t>(d)) != dim) bad = true;
      }
      want << "]";
    } else {
      want << s.dtype << " of rank " << s.rank;
    }
    if (bad) throw Error("bad_input", pre + "expected " + want.str() + ", got " + got.str());
  }
}

std::string model_error_line(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string ln; std::getline(in, ln);) {
    auto b = ln.find_first_not_of(" \t\r"), e = ln.find_last_not_of(" \t\r");
    if (b != std::string::npos) lines.push_back(ln.substr(b, e - b + 1));
  }
  if (lines.empty()) return "RuntimeError";
  static const std::regex err_re(R"(^[\w.]*(Error|Exception)\b.*:)");
  static const std::regex where_re(R"xx(^File "([^"]+)", line (\d+), in (\w+))xx");
  std::string message;
  for (auto it = lines.rbegin(); it != lines.rend(); ++it)
    if (std::regex_search(*it, err_re)) {
      message = *it;
      break;
    }
  if (message.empty()) message = text.find("Traceback of TorchScript") != std::string::npos ? lines.back() : lines.front();
  if (message.rfind("builtins.", 0) == 0) message = message.substr(9);
  for (auto& ln : lines) {
    std::smatch m;
    if (std::regex_search(ln, m, where_re)) {
      message += " (at " + m[1].str() + ":" + m[2].str() + " in " + m[3].str() + ")";
      break;
    }
  }
  return utf8_prefix(message, 1000);
}

Lease::~Lease() {
  if (slot_ && p_) slot_->release(p_);
}

int Slot::count(const Loaded* v) const {
  auto it = leases_.find(v);
  return it == leases_.end() ? 0 : it->second;
}

int Slot::leases(const Loaded* v) const {
  std::lock_guard<std::mutex> lk(mu_);
  return count(v);
}

Lease Slot::begin() {
  std::unique_lock<std::mutex> lk(mu_);
  // older requests finish first; one that hangs does not hold every other request for long
  cv_.wait_for(lk, std::chrono::seconds(2), [this] { return !next_ || count(cur_.get()) == 0; });
  if (next_) promote();
  if (!cur_) return Lease();
  ++leases_[cur_.get()];
  return Lease(this, cur_);
}

void Slot::release(std::shared_ptr<const Loaded>& p) {
  std::lock_guard<std::mutex> lk(mu_);
  const Loaded* v = p.get();
  p.reset();  // before the count: at zero, nobody but the loader holds a retired version
  auto it = leases_.find(v);
  if (it != leases_.end() && --it->second == 0) leases_.erase(it);
  if (next_ && count(cur_.get()) == 0) promote();
  cv_.notify_all();
}

void Slot::promote() {
  retired_ = std::move(cur_);
  cur_ = std::move(next_);
  next_.reset();
  cv_.notify_all();
}

std::shared_ptr<const Loaded> Slot::offer(std::shared_ptr<const Loaded> next, double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  next_ = std::move(next);
  if (count(cur_.get()) == 0) promote();
  cv_.notify_all();
  cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), [this] { return !next_; });
  return std::move(retired_);
}

bool Slot::retire(std::shared_ptr<const Loaded> old, double timeout_s) {
  if (!old) return true;
  std::unique_lock<std::mutex> lk(mu_);
  return cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), [&] { return count(old.get()) == 0; });
}  // `old` goes here, outside the lock (parameters end after the body)

std::shared_ptr<const Loaded> Slot::newest() const {
  std::lock_guard<std::mutex> lk(mu_);
  return next_ ? next_ : cur_;
}

void list_parameters(const std::string& path, std::ostream& out) {
  torch::jit::Module module = torch::jit::load(path, at::kCPU);
  size_t n = 0, bytes = 0;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) {
    out << p.name << "\t" << dtype_name(p.value.scalar_type()) << "\t[";
    for (int64_t d = 0; d < p.value.dim(); ++d) out << (d ? ", " : "") << p.value.size(d);
    out << "]\n";
    ++n;
    bytes += p.value.numel() * p.value.element_size();
  }
  out << n << " parameter(s), " << bytes << " bytes\n";
}

}  // namespace zm
