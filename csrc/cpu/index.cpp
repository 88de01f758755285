// Glue for the vector indexes (lckv/flat_index.h, ivf_index.h, graph_index.h, cluster_index.h): argument checks,
// zero-copy reads of CPU float32 tensors, GIL released around every build, add and search.
#include <omp.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "bind.h"
#include "checks.h"
#include "search_params.h"
// The cores get hidden visibility like the pybind11 module that wraps them.
#pragma GCC visibility push(hidden)
#include "lckv/cluster_index.h"
#include "lckv/flat_index.h"
#include "lckv/graph_index.h"
#include "lckv/select_top.h"
#include "lckv/ivf_index.h"
#pragma GCC visibility pop

namespace lckv {
namespace {

namespace py = pybind11;
using Result = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>;

// Rows of `dim` float32 values, CPU, contiguous and finite; `layout` names the expected shape.
void check_rows(const torch::Tensor& t, const char* name, int64_t ndim, const char* layout, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU (the index lives in host memory), got device ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type(),
                   " (convert with .float())");
  check_dim(t, name, ndim, layout);
  TORCH_CHECK_VALUE(t.size(ndim - 1) == dim, name, " must have head_dim ", dim,
                    " (the index's dim) in its last dimension, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (call .contiguous()), got strides ",
                    t.strides());
  TORCH_CHECK_VALUE(t.numel() == 0 || torch::isfinite(t).all().item<bool>(), name,
                    " contains NaN or inf");
}

// A copy of an index's std::vector as a 1-D tensor of the element type (int64_t, float).
template <typename T>
torch::Tensor to_tensor(const std::vector<T>& v) {
  return torch::tensor(c10::ArrayRef<T>(v), c10::CppTypeToScalarType<T>::value);
}

void check_capacity(const VectorIndex& index, int64_t extra) { check_index_growth(index.size(), extra); }

void add(VectorIndex& index, const torch::Tensor& keys) {
  check_rows(keys, "keys", 2, "[n, head_dim]", index.dim());
  check_capacity(index, keys.size(0));
  py::gil_scoped_release no_gil;
  index.add(keys.data_ptr<float>(), keys.size(0));
}

// build(keys) of the indexes built from keys alone (IVF, Cluster).
template <typename KeyIndex>
void build_from_keys(KeyIndex& self, const torch::Tensor& keys) {
  check_rows(keys, "keys", 2, "[n, head_dim]", self.dim());
  check_capacity(self, keys.size(0));
  py::gil_scoped_release no_gil;
  self.build(keys.data_ptr<float>(), keys.size(0));
}

Result search(const VectorIndex& index, const torch::Tensor& queries, int64_t k, int64_t ef,
              int64_t nprobe, double scan, int64_t upper_ef, double expand, int64_t probe_supers) {
  check_rows(queries, "queries", 2, "[n_queries, head_dim]", index.dim());
  check_k(k);
  const SearchParams params = make_params(ef, nprobe, scan, upper_ef, expand, probe_supers);
  TORCH_CHECK_VALUE(index.size() > 0, "search on an empty index: build() or add() keys first");
  const int64_t m = queries.size(0);
  auto scores = torch::empty({m, k}, torch::kFloat32);
  auto ids = torch::empty({m, k}, torch::kInt64);
  auto n_scored = torch::empty({m}, torch::kInt64);
  {
    py::gil_scoped_release no_gil;
    index.search_batch(queries.data_ptr<float>(), m, k, params, scores.data_ptr<float>(),
                       ids.data_ptr<int64_t>(), n_scored.data_ptr<int64_t>());
  }
  return {scores, ids, n_scored};
}

Result search_heads_py(const std::vector<std::shared_ptr<VectorIndex>>& heads,
                       const torch::Tensor& queries, int64_t k, int64_t ef, int64_t nprobe,
                       double scan, int64_t upper_ef, double expand, int64_t probe_supers) {
  TORCH_CHECK_VALUE(!heads.empty(), "heads must hold at least one index");
  const int64_t dim = heads[0]->dim();
  check_rows(queries, "queries", 3, "[heads, n_queries, head_dim]", dim);
  TORCH_CHECK_VALUE(queries.size(0) == static_cast<int64_t>(heads.size()), "queries must have ",
                    heads.size(), " heads (one per index) in dim 0, got shape ", queries.sizes());
  check_k(k);
  const SearchParams params = make_params(ef, nprobe, scan, upper_ef, expand, probe_supers);
  std::vector<const VectorIndex*> raw;
  for (std::size_t h = 0; h < heads.size(); ++h) {
    TORCH_CHECK_VALUE(heads[h] != nullptr, "heads[", h, "] is None");
    TORCH_CHECK_VALUE(heads[h]->dim() == dim, "heads[", h, "] has dim ", heads[h]->dim(),
                      ", heads[0] has dim ", dim);
    TORCH_CHECK_VALUE(heads[h]->size() > 0, "search on an empty index: heads[", h, "] has no keys");
    raw.push_back(heads[h].get());
  }
  const int64_t n_heads = queries.size(0), m = queries.size(1);
  auto scores = torch::empty({n_heads, m, k}, torch::kFloat32);
  auto ids = torch::empty({n_heads, m, k}, torch::kInt64);
  auto n_scored = torch::empty({n_heads, m}, torch::kInt64);
  {
    py::gil_scoped_release no_gil;
    search_heads(raw, queries.data_ptr<float>(), m, k, params, scores.data_ptr<float>(),
                 ids.data_ptr<int64_t>(), n_scored.data_ptr<int64_t>());
  }
  return {scores, ids, n_scored};
}

// add() of keys[h] ([heads, n, dim]) to heads[h] for every head, in parallel, GIL released: one
// check of the whole tensor instead of one per head.
void add_heads_py(const std::vector<std::shared_ptr<VectorIndex>>& heads, const torch::Tensor& keys) {
  TORCH_CHECK_VALUE(!heads.empty(), "heads must hold at least one index");
  const int64_t dim = heads[0]->dim();
  check_rows(keys, "keys", 3, "[heads, n, head_dim]", dim);
  TORCH_CHECK_VALUE(keys.size(0) == static_cast<int64_t>(heads.size()), "keys must have ", heads.size(),
                    " heads (one per index) in dim 0, got shape ", keys.sizes());
  for (std::size_t h = 0; h < heads.size(); ++h) {
    TORCH_CHECK_VALUE(heads[h] != nullptr, "heads[", h, "] is None");
    TORCH_CHECK_VALUE(heads[h]->dim() == dim, "heads[", h, "] has dim ", heads[h]->dim(), ", heads[0] has dim ", dim);
    check_capacity(*heads[h], keys.size(1));
  }
  const int64_t n_heads = keys.size(0), n = keys.size(1);
  if (n == 0) return;
  py::gil_scoped_release no_gil;
  const float* base = keys.data_ptr<float>();
#pragma omp parallel for schedule(dynamic, 1) if (n_heads > 1 && n >= 256)
  for (int64_t h = 0; h < n_heads; ++h) heads[h]->add(base + h * n * dim, n);
}

// ClusterIndex::search_group for every head: heads[h] gets queries[h] ([heads, group, dim]).
Result search_groups_py(const std::vector<std::shared_ptr<ClusterIndex>>& heads, const torch::Tensor& queries,
                        int64_t k, double scan, double expand, double scale, bool sorted) {
  TORCH_CHECK_VALUE(!heads.empty(), "heads must hold at least one index");
  const int64_t dim = heads[0]->dim();
  check_rows(queries, "queries", 3, "[heads, group, head_dim]", dim);
  TORCH_CHECK_VALUE(queries.size(0) == static_cast<int64_t>(heads.size()), "queries must have ", heads.size(),
                    " heads (one per index) in dim 0, got shape ", queries.sizes());
  TORCH_CHECK_VALUE(queries.size(1) > 0, "queries must hold at least one query head per index, got shape ",
                    queries.sizes());
  check_k(k);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, "scale must be a finite number > 0, got ", scale);
  const SearchParams params = make_params(1, 1, scan, 0, expand);
  for (std::size_t h = 0; h < heads.size(); ++h) {
    TORCH_CHECK_VALUE(heads[h] != nullptr, "heads[", h, "] is None");
    TORCH_CHECK_VALUE(heads[h]->dim() == dim, "heads[", h, "] has dim ", heads[h]->dim(), ", heads[0] has dim ", dim);
    TORCH_CHECK_VALUE(heads[h]->size() > 0, "search on an empty index: heads[", h, "] has no keys");
  }
  const int64_t n_heads = queries.size(0), group = queries.size(1);
  auto probs = torch::empty({n_heads, k}, torch::kFloat32);
  auto ids = torch::empty({n_heads, k}, torch::kInt64);
  auto n_scored = torch::empty({n_heads}, torch::kInt64);
  {
    py::gil_scoped_release no_gil;
    const float* q = queries.data_ptr<float>();
    float* p = probs.data_ptr<float>();
    int64_t* i = ids.data_ptr<int64_t>();
    int64_t* n = n_scored.data_ptr<int64_t>();
#pragma omp parallel for schedule(dynamic, 1) if (n_heads > 1)
    for (int64_t h = 0; h < n_heads; ++h)
      n[h] = heads[h]->search_group(q + h * group * dim, group, k, params, static_cast<float>(scale), p + h * k,
                                     i + h * k, sorted);
  }
  return {probs, ids, n_scored};
}

// The build and search settings of index `kind` with their defaults (the params structs' member
// initialisers), as {"build": {...}, "search": {...}}: what lckv/index/native.py offers.
py::dict index_defaults(const std::string& kind) {
  const SearchParams search;
  py::dict build, searched;
  auto put = [&](const char* name, auto value) { build[name] = value; };
  if (kind == "ivf") {
    visit_settings(IVFBuildParams{}, put);
    searched["nprobe"] = search.nprobe;
  } else if (kind == "graph") {
    visit_settings(GraphBuildParams{}, put);
    searched["ef"] = search.ef;
    searched["upper_ef"] = search.upper_ef;
  } else if (kind == "cluster") {
    visit_settings(ClusterBuildParams{}, put);
    searched["scan"] = search.scan;
    searched["expand"] = search.expand;
    searched["probe_supers"] = search.probe_supers;
  } else {
    TORCH_CHECK_VALUE(kind == "flat", "kind must be 'flat', 'ivf', 'graph' or 'cluster', got '", kind, "'");
  }
  py::dict out;
  out["build"] = build;
  out["search"] = searched;
  return out;
}

}  // namespace

// ClusterIndex's matmul hook: out [m, n] = a [m, dim] . b [n, dim]^T by torch's BLAS (no copy).
void matmul_rows(const float* a, int64_t m, const float* b, int64_t n, int64_t dim, float* out) {
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  auto lhs = torch::from_blob(const_cast<float*>(a), {m, dim}, f32);
  auto rhs = torch::from_blob(const_cast<float*>(b), {n, dim}, f32);
  auto result = torch::from_blob(out, {m, n}, f32);
  at::mm_out(result, lhs, rhs.t());
}

void bind_index(py::module_& m) {
  ClusterIndex::matmul_hook() = &matmul_rows;
  // the defaults of the bindings below: the params structs' member initialisers
  const SearchParams kSearch;
  const IVFBuildParams kIvf;
  const ClusterBuildParams kCluster;
  const GraphBuildParams kGraph;
  py::class_<VectorIndex, std::shared_ptr<VectorIndex>>(m, "VectorIndex",
      "Base of the inner-product indexes: ids are insertion order; search returns "
      "(scores [m, k] float32 descending, ids [m, k] int64 padded with -1 / -inf, n_scored [m] int64).")
      .def_property_readonly("dim", &VectorIndex::dim)
      .def_property_readonly("size", &VectorIndex::size)
      .def_property_readonly("memory_bytes", &VectorIndex::memory_bytes)
      .def_property_readonly("simd_level",
                             [](const VectorIndex& self) { return simd_level_name(self.simd_level()); })
      .def("add", &add, py::arg("keys"), "Appends keys [n, dim] (float32, contiguous).")
      .def("search", &search, py::arg("queries"), py::arg("k"), py::arg("ef") = kSearch.ef,
           py::arg("nprobe") = kSearch.nprobe, py::arg("scan") = kSearch.scan, py::arg("upper_ef") = kSearch.upper_ef,
           py::arg("expand") = kSearch.expand, py::arg("probe_supers") = kSearch.probe_supers,
           "Top-k by inner product of queries [m, dim].");

  py::class_<FlatIndex, VectorIndex, std::shared_ptr<FlatIndex>>(m, "FlatIndex")
      .def(py::init<int64_t>(), py::arg("dim"));

  py::class_<IVFIndex, VectorIndex, std::shared_ptr<IVFIndex>>(m, "IVFIndex")
      .def(py::init([](int64_t dim, int64_t n_lists, int64_t n_iters, uint64_t seed) {
             IVFBuildParams p;
             p.n_iters = n_iters;
             p.seed = seed;
             return std::make_shared<IVFIndex>(dim, n_lists, p);
           }),
           py::arg("dim"), py::arg("n_lists"), py::arg("n_iters") = kIvf.n_iters, py::arg("seed") = kIvf.seed)
      .def_property_readonly("n_lists", &IVFIndex::n_lists)
      .def("build", &build_from_keys<IVFIndex>, py::arg("keys"), "Trains k-means on keys [n, dim] and adds them.");

  py::class_<ClusterIndex, VectorIndex, std::shared_ptr<ClusterIndex>>(m, "ClusterIndex")
      .def(py::init([](int64_t dim, int64_t cluster_size, int64_t segment, int64_t n_iters, int64_t super_size,
                       int64_t super_span) {
             ClusterBuildParams p;
             p.cluster_size = cluster_size;
             p.segment = segment;
             p.n_iters = n_iters;
             p.super_size = super_size;
             p.super_span = super_span;
             return std::make_shared<ClusterIndex>(dim, p);
           }),
           py::arg("dim"), py::arg("cluster_size") = kCluster.cluster_size, py::arg("segment") = kCluster.segment,
           py::arg("n_iters") = kCluster.n_iters, py::arg("super_size") = kCluster.super_size,
           py::arg("super_span") = kCluster.super_span)
      .def_property_readonly("n_clusters", &ClusterIndex::n_clusters)
      .def_property_readonly("n_supers", &ClusterIndex::n_supers)
      .def("super_assignments", [](const ClusterIndex& self) { return to_tensor(self.super_assignments()); },
           "Super-cluster of every cluster, [n_clusters] int64 (-1: loose, in a partial span).")
      .def("super_means", [](const ClusterIndex& self) { return to_tensor(self.super_means()).reshape({-1, self.dim()}); },
           "Super-cluster means [n_supers, dim] float32.")
      .def("super_radii", [](const ClusterIndex& self) { return to_tensor(self.super_radii()); },
           "Super-cluster radii [n_supers] float32 (largest member-centroid distance from the mean, rounded up).")
      .def_property_readonly("n_clustered", &ClusterIndex::n_clustered)
      .def("assignments", [](const ClusterIndex& self) { return to_tensor(self.assignments()); },
           "Cluster of every key, [size] int64 (-1: the unclustered tail).")
      .def("centroids", [](const ClusterIndex& self) { return to_tensor(self.centroids()).reshape({-1, self.dim()}); },
           "Centroids [n_clusters, dim] float32.")
      .def("build", &build_from_keys<ClusterIndex>, py::arg("keys"),
           "Adds keys [n, dim] and clusters them segment by segment.");

  py::class_<GraphIndex, VectorIndex, std::shared_ptr<GraphIndex>>(m, "GraphIndex")
      .def(py::init([](int64_t dim, int64_t max_degree, int64_t build_knn, int64_t rank_window,
                       int64_t lists_per_key, int64_t n_entry, int64_t build_ef, int64_t repair_queries,
                       int64_t coarse_stride, int64_t coarse_degree, int64_t upper_size, int64_t upper_degree,
                       int64_t upper_ef) {
             GraphBuildParams p;
             p.max_degree = max_degree;
             p.build_knn = build_knn;
             p.rank_window = rank_window;
             p.lists_per_key = lists_per_key;
             p.n_entry = n_entry;
             p.build_ef = build_ef;
             p.repair_queries = repair_queries;
             p.coarse_stride = coarse_stride;
             p.coarse_degree = coarse_degree;
             p.upper_size = upper_size;
             p.upper_degree = upper_degree;
             p.upper_ef = upper_ef;
             return std::make_shared<GraphIndex>(dim, p);
           }),
           py::arg("dim"), py::arg("max_degree") = kGraph.max_degree, py::arg("build_knn") = kGraph.build_knn,
           py::arg("rank_window") = kGraph.rank_window, py::arg("lists_per_key") = kGraph.lists_per_key,
           py::arg("n_entry") = kGraph.n_entry, py::arg("build_ef") = kGraph.build_ef,
           py::arg("repair_queries") = kGraph.repair_queries, py::arg("coarse_stride") = kGraph.coarse_stride,
           py::arg("coarse_degree") = kGraph.coarse_degree, py::arg("upper_size") = kGraph.upper_size,
           py::arg("upper_degree") = kGraph.upper_degree, py::arg("upper_ef") = kGraph.upper_ef)
      .def_property_readonly("mean_degree", &GraphIndex::mean_degree)
      .def_property_readonly("entry_points", &GraphIndex::entry_points)
      .def_property_readonly("upper_keys", &GraphIndex::upper_keys)
      .def("build", [](GraphIndex& self, const torch::Tensor& keys, const torch::Tensor& queries) {
        check_rows(keys, "keys", 2, "[n, head_dim]", self.dim());
        check_rows(queries, "queries", 2, "[n_queries, head_dim]", self.dim());
        check_capacity(self, keys.size(0));
        py::gil_scoped_release no_gil;
        self.build(keys.data_ptr<float>(), keys.size(0), queries.data_ptr<float>(), queries.size(0));
      }, py::arg("keys"), py::arg("queries"),
         "Adds keys [n, dim] and builds the graph from build queries [m, dim] (m may be 0).");

  m.def("index_defaults", &index_defaults, py::arg("kind"),
        "The settings of index kind 'flat', 'ivf', 'graph' or 'cluster' with their defaults: "
        "{'build': {setting: default}, 'search': {parameter: default}} (the C++ params structs).");
  m.def("set_index_threads", [](int n) {
    TORCH_CHECK_VALUE(n > 0, "n must be positive, got ", n);
    omp_set_num_threads(n);
  }, py::arg("n"), "Sets the OpenMP threads the index builds and searches use (this runtime only).");

  m.def("add_heads", &add_heads_py, py::arg("heads"), py::arg("keys"),
        "Appends keys[h] ([heads, n, dim], float32, contiguous) to heads[h] for every head; one check, "
        "GIL released, heads in parallel for large n.");
  m.def("search_groups", &search_groups_py, py::arg("heads"), py::arg("queries"), py::arg("k"),
        py::arg("scan") = kSearch.scan, py::arg("expand") = kSearch.expand, py::arg("scale") = 1.0, py::arg("sorted") = true,
        "ClusterIndex.search_group for heads[h] with queries[h] ([heads, group, dim]) in parallel, GIL "
        "released: a GQA group's top-k keys by summed softmax probability (cluster_index.h): "
        "(probs [heads, k] descending (any order unless sorted), ids [heads, k] padded with 0 / -1, n_scored [heads]).");
  m.def(
      "_select_top",
      [](const torch::Tensor& scores, int64_t count, double lo, double hi) {
        check_cpu_f32(scores, "scores", 1, "[n]");
        TORCH_CHECK_VALUE(count >= 0, "count must be >= 0, got ", count);
        TORCH_CHECK_VALUE(torch::isfinite(scores).all().item<bool>(), "scores must be finite");
        const auto s = scores.contiguous();
        const auto n = static_cast<std::size_t>(s.size(0));
        std::vector<uint32_t> positions(n);
        for (std::size_t i = 0; i < n; ++i) positions[i] = static_cast<uint32_t>(i);
        std::vector<float> best_s(std::min(n, static_cast<std::size_t>(count)));
        std::vector<uint32_t> best_id(best_s.size());
        if (lo <= hi)
          TORCH_CHECK_VALUE(n == 0 || (s.min().item<double>() >= lo && s.max().item<double>() <= hi),
                            "lo and hi must bound the scores");
        const std::size_t m = select_top(s.data_ptr<float>(), positions.data(), n, static_cast<std::size_t>(count),
                                         best_s.data(), best_id.data(), static_cast<float>(lo), static_cast<float>(hi));
        auto out = torch::empty({static_cast<int64_t>(m)}, torch::kInt64);
        for (std::size_t i = 0; i < m; ++i) out[static_cast<int64_t>(i)] = static_cast<int64_t>(best_id[i]);
        return out;
      },
      py::arg("scores"), py::arg("count"), py::arg("lo") = std::numeric_limits<double>::infinity(),
      py::arg("hi") = -std::numeric_limits<double>::infinity(),
      "Test hook for select_top (select_top.h): positions of the min(count, n) largest scores, by "
      "descending score then ascending position; lo <= hi are bounds of the scores (default: computed).");
  m.def("search_heads", &search_heads_py, py::arg("heads"), py::arg("queries"), py::arg("k"),
        py::arg("ef") = kSearch.ef, py::arg("nprobe") = kSearch.nprobe, py::arg("scan") = kSearch.scan,
        py::arg("upper_ef") = kSearch.upper_ef, py::arg("expand") = kSearch.expand,
        py::arg("probe_supers") = kSearch.probe_supers,
        "Searches heads[h] with queries[h] ([heads, m, dim]) in parallel, GIL released: "
        "(scores [heads, m, k], ids [heads, m, k], n_scored [heads, m]).");
}

}  // namespace lckv
