// Search arguments shared by the glue of the index searches (index.cpp) and of the fused decode
// step (decode.cpp): one check of k and of the SearchParams values, one set of messages.
#pragma once

#include <cmath>
#include <cstdint>

#include "checks.h"
#pragma GCC visibility push(hidden)  // as the index cores are everywhere in the module
#include "lckv/vector_index.h"
#pragma GCC visibility pop

namespace lckv {

inline void check_k(int64_t k) { TORCH_CHECK_VALUE(k > 0, "k must be positive, got ", k); }

// The search settings, checked; the defaults of every binding are SearchParams' member initialisers.
inline SearchParams make_params(int64_t ef, int64_t nprobe, double scan, int64_t upper_ef = SearchParams{}.upper_ef,
                                double expand = SearchParams{}.expand,
                                int64_t probe_supers = SearchParams{}.probe_supers) {
  TORCH_CHECK_VALUE(ef > 0, "ef must be positive, got ", ef);
  TORCH_CHECK_VALUE(upper_ef >= 0, "upper_ef must be >= 0 (0: the index's build setting), got ", upper_ef);
  TORCH_CHECK_VALUE(nprobe > 0, "nprobe must be positive, got ", nprobe);
  TORCH_CHECK_VALUE(std::isfinite(scan) && scan >= 1.0, "scan must be a finite number >= 1, got ", scan);
  TORCH_CHECK_VALUE(std::isfinite(expand) && expand > 0.0 && expand <= 1.0,
                    "expand must be a fraction in (0, 1], got ", expand);
  TORCH_CHECK_VALUE(probe_supers >= 0, "probe_supers must be >= 0 (0: the exact rule), got ", probe_supers);
  SearchParams params;
  params.expand = expand;
  params.probe_supers = probe_supers;
  params.ef = ef;
  params.nprobe = nprobe;
  params.scan = scan;
  params.upper_ef = upper_ef;
  return params;
}

}  // namespace lckv
