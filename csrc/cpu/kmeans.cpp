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

std::tuple<torch::Tensor, torch::Tensor> kmeans_py(const torch::Tensor& points, const torch::Tensor& init_rows,
                                                   int64_t iterations) {
  check_cpu_f32(points, "points", 3, "[heads, n, dim]");
  TORCH_CHECK_VALUE(points.is_contiguous(), "points must be contiguous (call .contiguous()), got strides ",
                    points.strides());
  const int64_t heads = points.size(0), n = points.size(1), dim = points.size(2);
  TORCH_CHECK_VALUE(dim > 0, "points must have dim >= 1 in its last dimension, got shape ", points.sizes());
  TORCH_CHECK_TYPE(init_rows.scalar_type() == torch::kInt64, "init must be int64, got ", init_rows.scalar_type());
  TORCH_CHECK_VALUE(init_rows.dim() == 1 && init_rows.device().is_cpu(),
                    "init must be a 1-D CPU tensor of point positions [n_clusters], got shape ", init_rows.sizes());
  const int64_t n_clusters = init_rows.size(0);
  TORCH_CHECK_VALUE(n_clusters >= 1 && n_clusters <= n, "init must hold between 1 and n = ", n,
                    " point positions, got ", n_clusters);
  const auto init_c = init_rows.contiguous();
  const std::vector<int64_t> init(init_c.data_ptr<int64_t>(), init_c.data_ptr<int64_t>() + n_clusters);
  std::vector<uint8_t> seen(static_cast<std::size_t>(n), 0);
  for (const int64_t row : init) {
    TORCH_CHECK_VALUE(row >= 0 && row < n, "init must hold point positions in [0, ", n, "), got ", row);
    TORCH_CHECK_VALUE(!seen[row], "init must hold distinct positions, got ", row, " twice");
    seen[row] = 1;
  }
  TORCH_CHECK_VALUE(iterations >= 0, "iterations must be >= 0, got ", iterations);
  TORCH_CHECK_VALUE(torch::isfinite(points).all().item<bool>(), "points contains NaN or inf");
  auto centroids = torch::empty({heads, n_clusters, dim}, torch::kFloat32);
  auto assign = torch::empty({heads, n}, torch::kInt64);
  {
    pybind11::gil_scoped_release no_gil;
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
  m.def("kmeans", &kmeans_py, pybind11::arg("points"), pybind11::arg("init"), pybind11::arg("iterations"),
        "Lloyd's k-means in L2 of each head's points [heads, n, dim] (float32, contiguous, CPU), heads in "
        "parallel (lckv/kmeans.h): the initial centroids are the points at positions init [n_clusters] (int64, "
        "distinct, the same positions in every head), then `iterations` rounds of assignment to the nearest "
        "centroid and moving each centroid to its points' mean (an empty cluster keeps its centroid), then a last "
        "assignment. Returns (centroids [heads, n_clusters, dim] float32, assign [heads, n] int64). "
        "iterations=0 gives the initial centroids.");
}

}  // namespace lckv
