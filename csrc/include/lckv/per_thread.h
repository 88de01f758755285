// The calling thread's scratch object, reached through one opaque call. Torch-free.
#pragma once

namespace lckv {

// The calling thread's instance of T (one per Tag, so two call sites never share one). In a shared
// library every thread_local access is a __tls_get_addr call, and GCC re-derives the address at
// uses inside loops rather than keep it in a register (perf: 6% of a graph search was
// __tls_get_addr before this); the noinline call returns it once.
template <typename T, typename Tag>
__attribute__((noinline)) T& per_thread() {
  thread_local T value;
  return value;
}

}  // namespace lckv
