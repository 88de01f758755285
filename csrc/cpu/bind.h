// One registration function per op family; csrc/bindings.cpp calls each into lckv._C.
#pragma once

#include <torch/extension.h>

namespace lckv {

void bind_merge_states(pybind11::module_& m);
void bind_sparse_attention(pybind11::module_& m);
void bind_index(pybind11::module_& m);
void bind_memory(pybind11::module_& m);
void bind_estimate(pybind11::module_& m);
void bind_group_rank(pybind11::module_& m);
void bind_decode(pybind11::module_& m);
void bind_kmeans(pybind11::module_& m);
#ifdef LCKV_WITH_CUDA
void bind_cuda(pybind11::module_& m);  // csrc/cuda/bind.cpp, CUDA builds only
#endif

}  // namespace lckv
