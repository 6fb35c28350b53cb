// A loaded release: load an archive with LibTorch, check it on the manifest's examples,
// warm it up, answer inference with the same codes and messages as the Python node.
#pragma once

#include "protocol.hpp"

#include <atomic>
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

// The served version of one model: swapped atomically; requests hold a reference, so the
// old version is freed when the last request on it ends.
class Slot {
 public:
  std::shared_ptr<const Loaded> current() const { return std::atomic_load(&cur_); }
  std::shared_ptr<const Loaded> swap(std::shared_ptr<const Loaded> next) { return std::atomic_exchange(&cur_, next); }

 private:
  std::shared_ptr<const Loaded> cur_;
};

// `zmqmodels-node --list PATH`: an archive's parameters, one per line.
void list_parameters(const std::string& path, std::ostream& out);

}  // namespace zm
