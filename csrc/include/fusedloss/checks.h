#pragma once
// Argument checks shared by the C++ backends. The Python layer validates user input with friendlier
// messages first; these guard the ops when they are called directly through torch.ops.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace fusedloss {

// target (N,) and weight (C,) of logits with N rows of C classes (any layout).
inline void check_ce_target_weight(const at::Tensor& logits, int64_t N, int64_t C, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N,
              "fusedloss: target must have shape (N,) = (", N, ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "fusedloss: target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.is_contiguous(), "fusedloss: target must be contiguous");
  TORCH_CHECK(target.device() == logits.device(), "fusedloss: target is on ", target.device(),
              " but logits are on ", logits.device());
  if (weight.has_value()) {
    const auto& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == C, "fusedloss: weight must have shape (C,) = (",
                C, ",), got ", w.sizes());
    TORCH_CHECK(w.is_contiguous(), "fusedloss: weight must be contiguous");
    TORCH_CHECK(w.device() == logits.device(), "fusedloss: weight is on ", w.device(),
                " but logits are on ", logits.device());
    const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(w.scalar_type() == acc, "fusedloss: weight must be ", acc, " for ", logits.scalar_type(),
                " logits, got ", w.scalar_type());
  }
}

inline void check_ce_args(const at::Tensor& logits, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() == 2, "fusedloss: logits must be 2-D (N, C), got ", logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "fusedloss: logits must have unit stride along the class dimension");
  check_ce_target_weight(logits, logits.size(0), logits.size(1), target, weight);
}

// The ops that write their result over the logits (cross_entropy_fwd_grad_) need them contiguous:
// the gradient's layout is the contiguous one, and a strided or expanded view (rows sharing
// memory) cannot hold it.
inline void check_in_place_logits(const at::Tensor& logits) {
  // No sizes in the message: on an H100 (torch 2.11) a strided logits crashed the CUDA op instead
  // of raising, and streaming sizes was the one difference from the checks that raise fine there.
  TORCH_CHECK(logits.is_contiguous(), "fusedloss: cross_entropy_fwd_grad_ writes the gradient over logits in place, ",
              "so logits must be contiguous (not a transposed, sliced or expanded view)");
}

inline void check_gap_args(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           int64_t p) {
  check_ce_args(input, target, weight);  // the same layout contract as cross-entropy
  TORCH_CHECK(p == 1 || p == 2, "fusedloss: p must be 1 or 2, got ", p);
}

inline void check_row_grad(const at::Tensor& g, const at::Tensor& logits, const char* name) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(g.dim() == 1 && g.size(0) == logits.size(0), "fusedloss: ", name, " must have shape (N,)");
  TORCH_CHECK(g.scalar_type() == acc, "fusedloss: ", name, " must be ", acc, ", got ", g.scalar_type());
  TORCH_CHECK(g.device() == logits.device(), "fusedloss: ", name, " is on the wrong device");
}

// stats: (N, 2) = (max, log_s), or (N, 4) with the extras (logprob, entropy) after them; the entropy
// gradient needs the latter.
inline void check_row_stats(const at::Tensor& stats, const at::Tensor& logits, bool need_entropy = false) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == logits.size(0) &&
                  (stats.size(1) == 4 || (stats.size(1) == 2 && !need_entropy)) && stats.is_contiguous(),
              "fusedloss: stats must be the forward's contiguous (N, 2) output, (N, 4) with extras (which the "
              "entropy's gradient needs)");
  TORCH_CHECK(stats.scalar_type() == acc, "fusedloss: stats must be ", acc, ", got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == logits.device(), "fusedloss: stats is on the wrong device");
}

// InfoNCE's lse ops: query (N, D) and key (M, D) contiguous, one floating dtype, one device; scale a
// 0-dim tensor in the accumulation dtype (or float64) on that device.
inline at::ScalarType check_info_nce_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale) {
  TORCH_CHECK(query.dim() == 2, "fusedloss: query must be 2-D (N, D), got ", query.dim(), "-D");
  TORCH_CHECK(key.dim() == 2, "fusedloss: key must be 2-D (M, D), got ", key.dim(), "-D");
  TORCH_CHECK(query.size(1) == key.size(1), "fusedloss: query and key must have the same feature size, got ",
              query.size(1), " and ", key.size(1));
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "fusedloss: query must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(key.scalar_type() == dt, "fusedloss: key must have query's dtype ", dt, ", got ", key.scalar_type());
  TORCH_CHECK(query.is_contiguous() && key.is_contiguous(), "fusedloss: query and key must be contiguous");
  TORCH_CHECK(key.device() == query.device(), "fusedloss: key is on ", key.device(), " but query is on ",
              query.device());
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.dim() == 0, "fusedloss: scale must be a 0-dim tensor, got shape ", scale.sizes());
  // float64 is accepted for every input: the backward returns d scale in scale's dtype (see (3') in
  // info_nce_math.h); the kernels compute with scale in acc.
  TORCH_CHECK(scale.scalar_type() == acc || scale.scalar_type() == at::kDouble, "fusedloss: scale must be ", acc,
              " or float64 for ", dt, " inputs, got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == query.device(), "fusedloss: scale is on ", scale.device(), " but query is on ",
              query.device());
  return acc;
}

// A per-row (n,) vector of the accumulation dtype: the backward's grad_rows / grad_cols (any stride)
// and the forward's lse_rows / lse_cols.
inline void check_info_nce_vector(const at::Tensor& v, int64_t n, at::ScalarType acc, const at::Tensor& query,
                                  const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "fusedloss: ", name, " must have shape (", n, ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc, "fusedloss: ", name, " must be ", acc, ", got ", v.scalar_type());
  TORCH_CHECK(v.device() == query.device(), "fusedloss: ", name, " is on ", v.device(), " but query is on ",
              query.device());
}

// The positives: labels (N,) int64 on query's device, any stride, each in [0, M) (read here on CPU
// only: elsewhere an out-of-range label gives a NaN pos and no host sync); None means labels_i = i.
// With key_groups (M,) int64, labels are the queries' group ids (any values) and are required.
inline void check_info_nce_labels(const std::optional<at::Tensor>& labels, const at::Tensor& query,
                                  const at::Tensor& key, const std::optional<at::Tensor>& key_groups) {
  const int64_t n = query.size(0), m = key.size(0);
  if (key_groups.has_value()) {
    const auto& kg = *key_groups;
    TORCH_CHECK(labels.has_value(), "fusedloss: key_groups needs labels (the queries' group ids)");
    TORCH_CHECK(kg.dim() == 1 && kg.size(0) == m, "fusedloss: key_groups must have shape (", m, ",), got ", kg.sizes());
    TORCH_CHECK(kg.scalar_type() == at::kLong, "fusedloss: key_groups must be int64, got ", kg.scalar_type());
    TORCH_CHECK(kg.device() == query.device(), "fusedloss: key_groups is on ", kg.device(), " but query is on ",
                query.device());
  }
  if (!labels.has_value()) {
    TORCH_CHECK(m >= n, "fusedloss: without labels (labels_i = i) there must be at least as many keys as queries, "
                "got N=", n, " and M=", m);
    return;
  }
  const auto& l = *labels;
  TORCH_CHECK(l.dim() == 1 && l.size(0) == n, "fusedloss: labels must have shape (", n, ",), got ", l.sizes());
  TORCH_CHECK(l.scalar_type() == at::kLong, "fusedloss: labels must be int64, got ", l.scalar_type());
  TORCH_CHECK(l.device() == query.device(), "fusedloss: labels is on ", l.device(), " but query is on ",
              query.device());
  if (l.device().is_cpu() && !key_groups.has_value()) {
    const int64_t* p = l.const_data_ptr<int64_t>();
    const int64_t stride = l.stride(0);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_INDEX(p[i * stride] >= 0 && p[i * stride] < m, "fusedloss: labels must be in [0, M) = [0, ", m,
                        "), got ", p[i * stride], " at position ", i);
    }
  }
}

inline void check_info_nce_bwd_args(const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_cols,
                                    const std::optional<at::Tensor>& grad_pos, const at::Tensor& query,
                                    const at::Tensor& key, const at::Tensor& scale, const at::Tensor& lse_rows,
                                    const std::optional<at::Tensor>& lse_cols, const at::Tensor& pos,
                                    const at::Tensor& npos, const std::optional<at::Tensor>& labels,
                                    const std::optional<at::Tensor>& key_groups) {
  const auto acc = check_info_nce_args(query, key, scale);
  check_info_nce_vector(grad_rows, query.size(0), acc, query, "grad_rows");
  check_info_nce_vector(lse_rows, query.size(0), acc, query, "lse_rows");
  check_info_nce_vector(pos, query.size(0), acc, query, "pos");
  if (grad_pos.has_value()) check_info_nce_vector(*grad_pos, query.size(0), acc, query, "grad_pos");
  if (grad_cols.has_value()) {
    check_info_nce_vector(*grad_cols, key.size(0), acc, query, "grad_cols");
    TORCH_CHECK(lse_cols.has_value(), "fusedloss: grad_cols needs lse_cols (the forward ran with cols=True)");
  }
  if (lse_cols.has_value() && grad_cols.has_value()) {
    check_info_nce_vector(*lse_cols, key.size(0), acc, query, "lse_cols");
  }
  TORCH_CHECK(npos.dim() == 1 && npos.size(0) == query.size(0) && npos.scalar_type() == at::kLong &&
                  npos.device() == query.device(),
              "fusedloss: npos must be an int64 (", query.size(0), ",) tensor on query's device");
  check_info_nce_labels(labels, query, key, key_groups);
}

// reduce_rows: loss (N,) contiguous, a floating accumulation dtype; target (N,) int64 contiguous on
// its device; weight (C,) and token_weight (N,) contiguous in the loss's dtype.
inline void check_reduce_args(const at::Tensor& loss, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& token_weight) {
  TORCH_CHECK(loss.dim() == 1 && loss.is_contiguous(), "fusedloss: loss must be a contiguous (N,) tensor, got ",
              loss.sizes());
  const auto dt = loss.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "fusedloss: loss must be float32 or float64, got ", dt);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == loss.size(0) && target.is_contiguous(),
              "fusedloss: target must be a contiguous (N,) tensor with N = ", loss.size(0), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "fusedloss: target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.device() == loss.device(), "fusedloss: target is on ", target.device(), " but loss is on ",
              loss.device());
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) > 0 && weight->is_contiguous() && weight->scalar_type() == dt &&
                    weight->device() == loss.device(),
                "fusedloss: weight must be a contiguous, non-empty (C,) ", dt, " tensor on ", loss.device());
  }
  if (token_weight.has_value()) {
    TORCH_CHECK(token_weight->dim() == 1 && token_weight->size(0) == loss.size(0) && token_weight->is_contiguous() &&
                    token_weight->scalar_type() == dt && token_weight->device() == loss.device(),
                "fusedloss: token_weight must be a contiguous (N,) ", dt, " tensor on ", loss.device());
  }
}

// kl_div_fwd / kl_div_bwd (csrc/{cpu,cuda}/kl_div.*).
// student and teacher (N, C) with unit class stride, one dtype and device; target (N,) int64 or None.
inline void check_kl_args(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                   double temperature, double beta) {
  TORCH_CHECK(student.dim() == 2, "fusedloss: student must be 2-D (N, C), got ", student.dim(), "-D");
  TORCH_CHECK(teacher.sizes() == student.sizes(), "fusedloss: teacher must have student's shape ", student.sizes(),
              ", got ", teacher.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "fusedloss: teacher must have student's dtype ",
              student.scalar_type(), ", got ", teacher.scalar_type());
  TORCH_CHECK(teacher.device() == student.device(), "fusedloss: teacher is on ", teacher.device(),
              " but student is on ", student.device());
  TORCH_CHECK(student.size(1) <= 1 || (student.stride(1) == 1 && teacher.stride(1) == 1),
              "fusedloss: student and teacher must have unit stride along the class dimension");
  TORCH_CHECK(temperature > 0, "fusedloss: temperature must be > 0, got ", temperature);
  TORCH_CHECK(beta >= 0 && beta <= 1, "fusedloss: beta must be in [0, 1], got ", beta);
  if (target.has_value()) {
    const auto& t = *target;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == student.size(0) && t.is_contiguous(),
                "fusedloss: target must be a contiguous (N,) tensor with N = ", student.size(0), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kLong, "fusedloss: target must be int64, got ", t.scalar_type());
    TORCH_CHECK(t.device() == student.device(), "fusedloss: target is on ", t.device(), " but student is on ",
                student.device());
  }
}

inline void check_kl_stats(const at::Tensor& stats, const at::Tensor& student) {
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == student.size(0) && stats.size(1) == 6 && stats.is_contiguous(),
              "fusedloss: stats must be the forward's contiguous (N, 6) output");
  TORCH_CHECK(stats.scalar_type() == acc, "fusedloss: stats must be ", acc, ", got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == student.device(), "fusedloss: stats is on the wrong device");
}

}  // namespace fusedloss
