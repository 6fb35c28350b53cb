// A loaded release: load an archive with LibTorch, check it on the manifest's examples,
// warm it up, answer inference with the same codes and messages as the Python node.
#pragma once

#include "protocol.hpp"

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>

namespace zm {

struct Loaded {
  std::shared_ptr<Manifest> manifest;
  torch::jit::Module module;
  c10::Device device = at::kCPU;
  double load_s = 0, check_s = 0;
};

// Load from a file path (`path` non-empty) or from memory (`data`, `len`), then check the
// examples against `expected` (the Python node's tolerances) and warm up. Raises Error with
// code "check" and a one-line reason.
std::shared_ptr<const Loaded> load_release(const std::shared_ptr<Manifest>& m, const std::string& path,
                                           const void* data, size_t len, const c10::Device& device,
                                           int warmup = 2);

// Compare one output tree with its expected tree; throws Error("check", ...).
void compare_outputs(const c10::IValue& want, const c10::IValue& got, const std::string& path, bool gpu);

// bad_input unless `args` matches the manifest's input signature (count, dtype, rank, and the
// dimensions the examples fixed; never the leading one).
void check_inputs(const Manifest& m, const std::vector<c10::IValue>& args);

// One line for a model's exception: its `...Error: message` line and where in the model code.
std::string model_error_line(const std::string& what);

// The served version of one model. A new version is offered by the loader and becomes
// current as soon as no request is running on the old one (requests that arrive meanwhile
// wait for that, at most one request's time, and 2 s if an old request hangs): so no reply is older than one already sent,
// with any number of serving threads (docs/protocol.md §Serving order). Requests hold a
// reference; the loader frees the old version once the last one ends.
class Slot {
 public:
  // A request starts: the version to run it on (null: none loaded). Pair with end().
  std::shared_ptr<const Loaded> begin();
  void end();
  // The loader: offer the next version; returns the one it replaces (null: none) once that
  // is no longer current, waiting at most `timeout_s`.
  std::shared_ptr<const Loaded> offer(std::shared_ptr<const Loaded> next, double timeout_s = 30.0);
  std::shared_ptr<const Loaded> newest() const;  // the offered or current version

 private:
  void promote();  // under mu_, with running_ == 0
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<const Loaded> cur_, next_, retired_;
  int running_ = 0;
};

// `zmqmodels-node --list PATH`: an archive's parameters, one per line.
void list_parameters(const std::string& path, std::ostream& out);

}  // namespace zm
