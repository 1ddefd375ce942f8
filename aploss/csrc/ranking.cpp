// The AP-loss engine's two passes over every pair, fused (aploss/engine.py has the method and
// the pure-PyTorch twin of each op, which the tests hold these to bit for bit).
//
// place_negatives: each ranked negative is placed in its bin among the cuts and summed into its
//   bin's count and centred score sum; ignored pairs, positives and negatives below every
//   window go to the unscored bin at the cost of one comparison.
// evaluate_update: each pair's update from its bin's linear function.
// rank_sort_sorting: Rank & Sort's sorting terms over pairs of positives (aploss/rank_sort.py).
//
// One pass each, one loop per thread, instead of a dozen PyTorch kernels that each wait for
// every thread: on a busy machine that wait is what dominated. The sums run over fixed chunks
// in element order and are merged in chunk order, so the result does not depend on the thread
// count and equals the PyTorch path's bincount over the same chunks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

// The bins of aploss.bin_locator.BinLocator: bin 2k+1 is the cut u_k, bin 2k the open interval
// below it, so a value's bin is #{u < x} + #{u <= x}. A uniform grid of cells narrows the cuts
// to compare with; values outside the cuts' range need no lookup at all.
struct Bins {
  const double* cuts;
  int64_t num_cuts;
  const int32_t* cell_start;  // [cells + 3]: index of the first cut of each cell, edge cells included
  double low;
  double scale;
  int64_t cells;  // between the cuts; cell 0 lies below them and cell cells + 1 above

  int64_t locate(double value) const {
    if (value < cuts[0]) return 0;
    if (value > cuts[num_cuts - 1]) return 2 * num_cuts;
    // The same float operations as BinLocator._cell (built with -ffp-contract=off, so no fused
    // multiply-add changes a rounding), so a cut in an earlier cell is strictly below the value
    // and one in a later cell strictly above it.
    double position = (value - low) * scale + 1.0;
    position = std::isnan(position) ? 1.0 : std::min(std::max(position, 0.0), static_cast<double>(cells + 1));
    const int64_t cell = static_cast<int64_t>(position);
    const int64_t first = cell_start[cell], last = cell_start[cell + 1];
    if (last - first > 8) {
      const double* begin = cuts + first;
      const double* end = cuts + last;
      return 2 * first + (std::lower_bound(begin, end, value) - begin) + (std::upper_bound(begin, end, value) - begin);
    }
    int64_t bin = 2 * first;
    for (int64_t k = first; k < last; ++k) bin += (cuts[k] < value) + (cuts[k] <= value);
    return bin;
  }
};

template <typename score_t, typename label_t, typename bin_t>
bool place_chunk(const score_t* logits, const label_t* labels, int64_t begin, int64_t end, const Bins& bins,
                 const double* center, double lowest, double highest, double prune_below, int64_t unscored,
                 double* count, double* offset, bin_t* placed) {
  bool has_nan = false;
  for (int64_t i = begin; i < end; ++i) {
    int64_t bin = unscored;
    if (labels[i] == 0) {
      double score = static_cast<double>(logits[i]);
      if (std::isnan(score)) {
        has_nan = true;
      } else if (score = std::min(std::max(score, lowest), highest); !(score < prune_below)) {
        // Clamped first, so that -inf ties with a positive at -inf (both at the lowest float).
        bin = bins.locate(score);
        count[bin] += 1.0;
        offset[bin] += score - center[bin];
      }
    }
    if (placed) placed[i] = static_cast<bin_t>(bin);
  }
  return has_nan;
}

template <typename score_t, typename label_t, typename bin_t>
bool place_all(const at::Tensor& logits, const at::Tensor& labels, const Bins& bins, const double* center,
               double lowest, double highest, double prune_below, int64_t unscored, int64_t chunk,
               double* count, double* offset, bin_t* placed) {
  const score_t* scores = logits.data_ptr<score_t>();
  const label_t* label = labels.data_ptr<label_t>();
  const int64_t n = logits.numel();
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t size = unscored + 1;
  const int64_t wave = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  std::vector<double> partial(2 * wave * size);
  std::vector<char> nan(wave);
  bool has_nan = false;
  for (int64_t first = 0; first < chunks; first += wave) {
    const int64_t in_wave = std::min(wave, chunks - first);
    std::fill(partial.begin(), partial.begin() + 2 * in_wave * size, 0.0);
    at::parallel_for(0, in_wave, 1, [&](int64_t from, int64_t to) {
      for (int64_t w = from; w < to; ++w) {
        const int64_t begin = (first + w) * chunk;
        nan[w] = place_chunk(scores, label, begin, std::min(n, begin + chunk), bins, center, lowest, highest,
                             prune_below, unscored, partial.data() + 2 * w * size,
                             partial.data() + (2 * w + 1) * size, placed);
      }
    });
    for (int64_t w = 0; w < in_wave; ++w) {
      const double* chunk_count = partial.data() + 2 * w * size;
      const double* chunk_offset = chunk_count + size;
      for (int64_t b = 0; b < size; ++b) {
        count[b] += chunk_count[b];
        offset[b] += chunk_offset[b];
      }
      has_nan = has_nan || nan[w];
    }
  }
  return has_nan;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> place_negatives(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& cuts, const at::Tensor& cell_start,
    double low, double scale, const at::Tensor& center, double lowest, double highest, double prune_below,
    bool keep, int64_t chunk) {
  TORCH_CHECK(logits.device().is_cpu() && logits.is_contiguous() && labels.is_contiguous(),
              "place_negatives: contiguous CPU tensors expected");
  TORCH_CHECK(logits.numel() == labels.numel(), "place_negatives: logits and labels differ in size");
  TORCH_CHECK(cuts.scalar_type() == at::kDouble && center.scalar_type() == at::kDouble &&
                  cell_start.scalar_type() == at::kInt && cuts.numel() > 0 && chunk > 0,
              "place_negatives: bad bin tables");
  const int64_t num_cuts = cuts.numel();
  const int64_t unscored = 2 * num_cuts + 1;
  TORCH_CHECK(center.numel() == unscored + 1, "place_negatives: center needs one value per bin");
  const at::Tensor cuts_c = cuts.contiguous(), cell_start_c = cell_start.contiguous(), center_c = center.contiguous();
  const Bins bins{cuts_c.data_ptr<double>(), num_cuts, cell_start_c.data_ptr<int32_t>(), low, scale,
                  cell_start_c.numel() - 3};
  auto options = logits.options().dtype(at::kDouble);
  at::Tensor count = at::zeros({unscored + 1}, options);
  at::Tensor offset = at::zeros({unscored + 1}, options);
  const bool narrow = unscored <= std::numeric_limits<int16_t>::max();
  at::Tensor placed = keep ? at::empty(logits.sizes(), logits.options().dtype(narrow ? at::kShort : at::kInt))
                           : at::empty({0}, logits.options().dtype(at::kShort));
  bool has_nan = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "place_negatives", [&] {
    using score_t = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "place_negatives_labels", [&] {
      using label_t = scalar_t;
      if (!keep) {
        has_nan = place_all<score_t, label_t, int16_t>(logits, labels, bins, center_c.data_ptr<double>(), lowest,
                                                       highest, prune_below, unscored, chunk,
                                                       count.data_ptr<double>(), offset.data_ptr<double>(), nullptr);
      } else if (narrow) {
        has_nan = place_all<score_t, label_t, int16_t>(logits, labels, bins, center_c.data_ptr<double>(), lowest,
                                                       highest, prune_below, unscored, chunk,
                                                       count.data_ptr<double>(), offset.data_ptr<double>(),
                                                       placed.data_ptr<int16_t>());
      } else {
        has_nan = place_all<score_t, label_t, int32_t>(logits, labels, bins, center_c.data_ptr<double>(), lowest,
                                                       highest, prune_below, unscored, chunk,
                                                       count.data_ptr<double>(), offset.data_ptr<double>(),
                                                       placed.data_ptr<int32_t>());
      }
    });
  });
  return {count, offset, placed, has_nan};
}

template <typename score_t, typename bin_t>
void evaluate_all(const score_t* logits, const bin_t* placed, int64_t n, const double* intercept,
                  const double* slope, const double* center, double lowest, double highest, int64_t unscored,
                  score_t* grad) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bin = placed[i];
      if (bin == unscored) {  // NaN or inf in an ignored pair stays without effect
        grad[i] = static_cast<score_t>(0.0);
        continue;
      }
      const double score = std::min(std::max(static_cast<double>(logits[i]), lowest), highest);
      grad[i] = static_cast<score_t>((score - center[bin]) * slope[bin] + intercept[bin]);
    }
  });
}

at::Tensor evaluate_update(const at::Tensor& logits, const at::Tensor& placed, const at::Tensor& intercept,
                           const at::Tensor& slope, const at::Tensor& center, double lowest, double highest) {
  TORCH_CHECK(logits.device().is_cpu() && logits.is_contiguous() && placed.is_contiguous() &&
                  logits.numel() == placed.numel(),
              "evaluate_update: contiguous CPU tensors of equal size expected");
  TORCH_CHECK(intercept.scalar_type() == at::kDouble && slope.scalar_type() == at::kDouble &&
                  center.scalar_type() == at::kDouble,
              "evaluate_update: float64 bin tables expected");
  const at::Tensor intercept_c = intercept.contiguous(), slope_c = slope.contiguous(), center_c = center.contiguous();
  const int64_t unscored = intercept_c.numel() - 1;
  at::Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "evaluate_update", [&] {
    if (placed.scalar_type() == at::kShort) {
      evaluate_all(logits.data_ptr<scalar_t>(), placed.data_ptr<int16_t>(), logits.numel(),
                   intercept_c.data_ptr<double>(), slope_c.data_ptr<double>(), center_c.data_ptr<double>(), lowest,
                   highest, unscored, grad.data_ptr<scalar_t>());
    } else {
      TORCH_CHECK(placed.scalar_type() == at::kInt, "evaluate_update: bins must be int16 or int32");
      evaluate_all(logits.data_ptr<scalar_t>(), placed.data_ptr<int32_t>(), logits.numel(),
                   intercept_c.data_ptr<double>(), slope_c.data_ptr<double>(), center_c.data_ptr<double>(), lowest,
                   highest, unscored, grad.data_ptr<scalar_t>());
    }
  });
  return grad;
}

// RS's H: the linear ramp for delta > 0, the hard step [x >= 0] for delta = 0.
inline double rank_sort_step(double difference, double delta) {
  if (delta > 0) return std::min(std::max(difference / (2 * delta) + 0.5, 0.0), 1.0);
  return difference >= 0 ? 1.0 : 0.0;
}

// Per positive i: L_S(i) = current(i) - sum_{t_j >= t_i} H_ij (1 - t_j) / sum_{t_j >= t_i} H_ij, and
// each positive's sorting update: -L_S(i) where sum_j M_ij > threshold, plus sum_i L_S(i) M_ij /
// sum_k M_ik, M_ij = [t_j < t_i] H_ij. O(P^2) in two passes, over rows and then over columns, so
// that every sum runs in index order inside one thread: the result does not depend on the thread
// count. Under load, this is a few coarse tasks where the PyTorch path is hundreds of small ones.
std::tuple<at::Tensor, at::Tensor> rank_sort_sorting(const at::Tensor& scores, const at::Tensor& targets,
                                                     const at::Tensor& current, double delta, double threshold) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kDouble && targets.scalar_type() == at::kDouble &&
                  current.scalar_type() == at::kDouble && scores.numel() == targets.numel() &&
                  scores.numel() == current.numel(),
              "rank_sort_sorting: float64 CPU tensors of equal size expected");
  const at::Tensor s_c = scores.contiguous(), t_c = targets.contiguous(), current_c = current.contiguous();
  const double* s = s_c.data_ptr<double>();
  const double* t = t_c.data_ptr<double>();
  const double* now = current_c.data_ptr<double>();
  const int64_t n = s_c.numel();
  at::Tensor error = at::empty({n}, s_c.options()), push = at::empty({n}, s_c.options());
  std::vector<double> share(n), own(n);
  double* error_p = error.data_ptr<double>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double sorted_sum = 0.0, sorted_weight = 0.0, missorted = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        const double h = rank_sort_step(s[j] - s[i], delta);
        if (t[j] >= t[i]) {
          sorted_sum += h * (1 - t[j]);
          sorted_weight += h;
        } else {
          missorted += h;
        }
      }
      const double sorting_error = now[i] - sorted_sum / sorted_weight;
      error_p[i] = sorting_error;
      const bool applies = missorted > threshold;
      share[i] = applies ? sorting_error / missorted : 0.0;
      own[i] = applies ? sorting_error : 0.0;
    }
  });
  double* push_p = push.data_ptr<double>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double received = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        if (t[j] < t[i]) received += share[i] * rank_sort_step(s[j] - s[i], delta);
      }
      push_p[j] = received - own[j];
    }
  });
  return {error, push};
}

}  // namespace

TORCH_LIBRARY(aploss, m) {
  m.def("place_negatives(Tensor logits, Tensor labels, Tensor cuts, Tensor cell_start, float low, float scale, "
        "Tensor center, float lowest, float highest, float prune_below, bool keep, int chunk) "
        "-> (Tensor, Tensor, Tensor, bool)");
  m.def("evaluate_update(Tensor logits, Tensor placed, Tensor intercept, Tensor slope, Tensor center, "
        "float lowest, float highest) -> Tensor");
  m.def("rank_sort_sorting(Tensor scores, Tensor targets, Tensor current, float delta, float threshold) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aploss, CPU, m) {
  m.impl("place_negatives", &place_negatives);
  m.impl("evaluate_update", &evaluate_update);
  m.impl("rank_sort_sorting", &rank_sort_sorting);
}
