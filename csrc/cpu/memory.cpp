// Glue for lckv/huge_pages.h: empty_huge(shape, dtype) -> an uninitialised CPU tensor on memory
// advised for transparent huge pages, freed by the tensor's deleter.
#include <limits>
#include <vector>

#include "bind.h"
#include "lckv/huge_pages.h"

namespace lckv {
namespace {

torch::Tensor empty_huge(const std::vector<int64_t>& shape, const pybind11::object& dtype_object) {
  const auto dtype = torch::python::detail::py_object_to_dtype(dtype_object);
  const int64_t element_size = static_cast<int64_t>(c10::elementSize(dtype));
  int64_t bytes = element_size;
  for (size_t i = 0; i < shape.size(); ++i) {
    TORCH_CHECK_VALUE(shape[i] >= 0, "shape must be non-negative sizes, got ", shape[i], " at dim ", i);
    TORCH_CHECK_VALUE(shape[i] == 0 || bytes <= std::numeric_limits<int64_t>::max() / shape[i],
                      "shape ", c10::IntArrayRef(shape), " of ", dtype, " overflows 64-bit byte counts");
    bytes *= shape[i];
  }
  HugePageAllocation allocation = allocate_huge_pages(static_cast<size_t>(bytes));
  if (allocation.data == nullptr) {
    throw std::bad_alloc();  // pybind11 turns it into MemoryError
  }
  if (!allocation.advised) {
    free_huge_pages(allocation.data);
    TORCH_CHECK(false, "empty_huge: ", allocation.error, " (use torch.empty instead)");
  }
  return torch::from_blob(allocation.data, shape, [](void* data) { free_huge_pages(data); },
                          torch::TensorOptions().dtype(dtype).device(torch::kCPU));
}

}  // namespace

void bind_memory(pybind11::module_& m) {
  m.def("empty_huge", &empty_huge, pybind11::arg("shape"), pybind11::arg("dtype"),
        "Uninitialised contiguous CPU tensor of `shape` and `dtype` on 2 MiB aligned memory advised "
        "with madvise(MADV_HUGEPAGE) before first touch; RuntimeError if the advice fails.");
  m.def("huge_page_bytes", []() { return kHugePageBytes; }, "Alignment/huge page size used by empty_huge.");
}

}  // namespace lckv
