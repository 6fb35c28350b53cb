// Dynamic batching: which queued requests may share one forward, whether to wait for more,
// and joining inputs / splitting outputs. Mirrors zmqmodels/core/batching.py (batch_key,
// Evidence) and zmqmodels/model/batching.py (join_inputs, split_outputs, check_batched).
#pragma once

#include "protocol.hpp"

#include <torch/script.h>

#include <map>
#include <string>
#include <vector>

namespace zm {

// The key of a request's inputs (a tuple of tensors sharing their leading dimension): dtype
// and shape after the leading dimension of each, and that dimension in `rows`. "" when the
// request is never joined (a scalar, a nested tree, mismatched leading dimensions, 0-d).
std::string batch_key(const msgpack::object& spec, int64_t& rows);

// Per model: how requests arrived, how many the newest batch carried and how long a forward
// takes. A short batch is held only while recent batches were larger and arrivals come faster
// than the wait left, until `delay_s` after its oldest request arrived or, if later, a share of
// one forward (FILL_FRACTION of the recent forward time, FILL_MAX_S at most) after the serving
// thread became free (`free_since`).
class Evidence {
 public:
  explicit Evidence(double delay_s) : delay_s_(delay_s) {}
  void arrived(const std::string& model, double now);
  void dispatched(const std::string& model, size_t count, double now);
  void served(const std::string& model, double seconds);  // a forward took this long
  // When a batch of `count` requests and `rows` rows (`cap` at most), oldest arrived at
  // `oldest`, should go if it waits; a negative value: go now.
  double hold_until(const std::string& model, size_t count, int64_t rows, int64_t cap, double oldest,
                    double now, double free_since = -1e300) const;

 private:
  struct Seen {
    double last_arrival = -1, gap = -1, last_batch = -1e300, service = 0;
    size_t last_count = 0;
  };
  double delay_s_;
  std::map<std::string, Seen> seen_;
};

// Each positional input of `args` (one vector per request) concatenated along dim 0.
std::vector<c10::IValue> join_inputs(const std::vector<std::vector<c10::IValue>>& args);
// One output per request, `rows[i]` rows each; Error("split") if an output does not follow.
std::vector<c10::IValue> split_outputs(const c10::IValue& out, const std::vector<int64_t>& rows);

}  // namespace zm
