// LCKV_HOST_DEVICE marks a function that the CUDA kernels and their host versions share, so the
// host unit tests (tests/cpp) run the very code the GPU runs. Torch-free.
#pragma once

#if defined(__CUDACC__)
#define LCKV_HOST_DEVICE __host__ __device__
#else
#define LCKV_HOST_DEVICE
#endif
