// Glue for lckv::kmeans (lckv/kmeans.h) on one set of points per head: argument checks,
// zero-copy reads, GIL released, heads in parallel.
#include <cmath>
#include <cstdint>
#include <vector>

#include "bind.h"
#include "checks.h"
#pragma GCC visibility push(hidden)  // as the index cores are everywhere in the module
#include "lckv/kmeans.h"
#pragma GCC visibility pop

namespace lckv {
namespace {

std::tuple<torch::Tensor, torch::Tensor> kmeans_py(const torch::Tensor& points, int64_t n_clusters, int64_t iterations,
                                                   uint64_t seed) {
  check_cpu_f32(points, "points", 3, "[heads, n, dim]");
  TORCH_CHECK_VALUE(points.is_contiguous(), "points must be contiguous (call .contiguous()), got strides ",
                    points.strides());
  const int64_t heads = points.size(0), n = points.size(1), dim = points.size(2);
  TORCH_CHECK_VALUE(dim > 0, "points must have dim >= 1 in its last dimension, got shape ", points.sizes());
  TORCH_CHECK_VALUE(n_clusters >= 1 && n_clusters <= n, "n_clusters must be in [1, n] with n = ", n,
                    " points per head, got ", n_clusters);
  TORCH_CHECK_VALUE(iterations >= 0, "iterations must be >= 0, got ", iterations);
  TORCH_CHECK_VALUE(torch::isfinite(points).all().item<bool>(), "points contains NaN or inf");
  auto centroids = torch::empty({heads, n_clusters, dim}, torch::kFloat32);
  auto assign = torch::empty({heads, n}, torch::kInt64);
  {
    pybind11::gil_scoped_release no_gil;
    const std::vector<int64_t> init = random_points(n, n_clusters, seed);  // the same points in every head
    const KMeansParams params{iterations};
    const float* x = points.data_ptr<float>();
    float* cent = centroids.data_ptr<float>();
    int64_t* as = assign.data_ptr<int64_t>();
#pragma omp parallel for schedule(dynamic, 1) if (heads > 1)
    for (int64_t h = 0; h < heads; ++h) {
      KMeansResult km;
      kmeans(x + h * n * dim, nullptr, n, dim, init, params, km);
      std::copy(km.centroids.begin(), km.centroids.end(), cent + h * n_clusters * dim);
      std::copy(km.assign.begin(), km.assign.end(), as + h * n);
    }
  }
  return {centroids, assign};
}

}  // namespace

void bind_kmeans(pybind11::module_& m) {
  m.def("kmeans", &kmeans_py, pybind11::arg("points"), pybind11::arg("n_clusters"), pybind11::arg("iterations"),
        pybind11::arg("seed"),
        "Lloyd's k-means in L2 of each head's points [heads, n, dim] (float32, contiguous, CPU), heads in "
        "parallel (lckv/kmeans.h): the initial centroids are n_clusters distinct points drawn by seed (the same "
        "positions in every head), then `iterations` rounds of assignment to the nearest centroid and moving "
        "each centroid to its points' mean (an empty cluster keeps its centroid), then a last assignment. "
        "Returns (centroids [heads, n_clusters, dim] float32, assign [heads, n] int64). iterations=0 gives "
        "the initial centroids.");
}

}  // namespace lckv
