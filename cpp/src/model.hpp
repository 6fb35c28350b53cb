// A loaded release: load an archive with LibTorch, check it on the manifest's examples,
// warm it up, answer inference with the same codes and messages as the Python node.
#pragma once

#include "protocol.hpp"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace zm {

struct Loaded {
  std::shared_ptr<Manifest> manifest;
  torch::jit::Module module;  // the TorchScript part (unless format is "pt2")
  c10::Device device = at::kCPU;
  double load_s = 0, check_s = 0;
  int64_t batch = 1;       // the most rows joined in one forward (the manifest's claim, checked here)
  std::string batch_note;  // why it joins fewer than the manifest claims
  std::string format = "torchscript";  // the part served: "torchscript" or "pt2"
  // the AOTInductor package (format "pt2"), its constants bound to `constants` (user managed:
  // views of `mapping`, the archive mapped copy-on-write, on the CPU; copies on a GPU)
  std::shared_ptr<torch::inductor::AOTIModelPackageLoader> pt2;
  std::vector<at::Tensor> constants;
  std::shared_ptr<void> mapping;

  // The model on positional arguments (a pt2 package's outputs: one tensor, or a tuple of them).
  c10::IValue forward(std::vector<c10::IValue> args) const;
};

// Load from a file path (`path` non-empty) or from memory (`data`, `len`), then check the
// examples against `expected` (the Python node's tolerances) and warm up. Raises Error with
// code "check" and a one-line reason.
std::shared_ptr<const Loaded> load_release(const std::shared_ptr<Manifest>& m, const std::string& path,
                                           const void* data, size_t len, const c10::Device& device,
                                           int warmup = 2);

// Which part of release `m` a node on `device` serves: "pt2" (its package was compiled for this
// device kind) or "torchscript"; Error("check", why) if neither (model/pt2.py serve_format;
// tests/vectors/formats.json holds the cases both run).
std::string serve_format(const Manifest& m, const c10::Device& device);

// Compare one output tree with its expected tree; throws Error("check", ...).
void compare_outputs(const c10::IValue& want, const c10::IValue& got, const std::string& path, bool gpu);
void check_batched(Loaded& out, const std::vector<c10::IValue>& examples, const std::vector<c10::IValue>& expected,
                   bool gpu);

// bad_input unless `args` matches the manifest's input signature (count, dtype, rank, and the
// dimensions the examples fixed; never the leading one).
void check_inputs(const Manifest& m, const std::vector<c10::IValue>& args);

// One line for a model's exception: its `...Error: message` line and where in the model code.
std::string model_error_line(const std::string& what);

class Slot;

// A request's hold on the version it runs on: the version stays alive, and counted, until the
// lease ends (its reference is dropped before the count, so a retired version's last lease
// leaves the loader the only owner).
class Lease {
 public:
  Lease() = default;
  Lease(Slot* slot, std::shared_ptr<const Loaded> p) : slot_(slot), p_(std::move(p)) {}
  Lease(Lease&& o) noexcept : slot_(o.slot_), p_(std::move(o.p_)) { o.slot_ = nullptr; }
  Lease& operator=(Lease&&) = delete;
  Lease(const Lease&) = delete;
  ~Lease();
  explicit operator bool() const { return p_ != nullptr; }
  const Loaded* operator->() const { return p_.get(); }
  const Loaded& operator*() const { return *p_; }
  const Loaded* get() const { return p_.get(); }

 private:
  Slot* slot_ = nullptr;
  std::shared_ptr<const Loaded> p_;
};

// The served version of one model. A new version is offered by the loader and becomes
// current as soon as no request is running on the old one (requests that arrive meanwhile
// wait for that, at most one request's time, and 2 s if an old request hangs): so no reply
// is older than one already sent, with any number of serving threads (docs/protocol.md
// §Serving order). Every wait is on one condition variable, never a poll.
class Slot {
 public:
  // A request starts: the version to run it on (empty: none loaded).
  Lease begin();
  // The loader: offer the next version; returns the one it replaces (null: none) once that
  // is no longer current, waiting at most `timeout_s`.
  std::shared_ptr<const Loaded> offer(std::shared_ptr<const Loaded> next, double timeout_s = 30.0);
  // The loader: wait until no request holds `old` (at most `timeout_s`), then drop it here,
  // on the loader's thread, not on a serving thread. Returns false on the timeout.
  bool retire(std::shared_ptr<const Loaded> old, double timeout_s = 30.0);
  std::shared_ptr<const Loaded> newest() const;  // the offered or current version
  int leases(const Loaded* v) const;             // requests running on `v`

 private:
  friend class Lease;
  void release(std::shared_ptr<const Loaded>& p);
  void promote();  // under mu_, with no lease on cur_
  int count(const Loaded* v) const;  // under mu_
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<const Loaded> cur_, next_, retired_;
  std::map<const Loaded*, int> leases_;
};

// `zmqmodels-node --list PATH`: an archive's parameters, one per line.
void list_parameters(const std::string& path, std::ostream& out);

}  // namespace zm
