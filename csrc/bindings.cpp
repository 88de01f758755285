// The one extension module, lckv._C. Each op family registers itself from its glue file.
#include "cpu/bind.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "lckv compiled CPU kernels";
  lckv::bind_merge_states(m);
  lckv::bind_sparse_attention(m);
  lckv::bind_index(m);
  lckv::bind_memory(m);
  lckv::bind_estimate(m);
  lckv::bind_group_rank(m);
  lckv::bind_decode(m);
  lckv::bind_kmeans(m);
#ifdef LCKV_WITH_CUDA
  lckv::bind_cuda(m);
#endif
}
