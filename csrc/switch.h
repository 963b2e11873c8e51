// Runtime-to-template ladders (flash-attention's BOOL_SWITCH idea, as templates): each turns a
// runtime value into a compile-time one and calls `f` with it as a std::integral_constant, so
// a kernel is instantiated once per value and the choice is written in one place.
//   switch_bool(cond, f)             f(std::true_type{}) or f(std::false_type{})
//   switch_bound<1, 4, 16>(rows, f)  f(integral_constant<int, B>) for the smallest bound B ≥ rows
//                                    (the last bound when none is)
//   switch_int<1, 4>(count, f)       f(integral_constant<int, clamp(count, 1, 4)>)
// Torch-free: shared by the CPU ISA units and the CUDA launchers.
#pragma once

#include <cstdint>
#include <type_traits>

namespace torchmatgrad {

template <typename F>
inline void switch_bool(bool cond, F&& f) {
  if (cond)
    f(std::true_type{});
  else
    f(std::false_type{});
}

template <int First, int... Rest, typename F>
inline void switch_bound(int64_t value, F&& f) {
  if constexpr (sizeof...(Rest) == 0) {
    f(std::integral_constant<int, First>{});
  } else {
    if (value <= First)
      f(std::integral_constant<int, First>{});
    else
      switch_bound<Rest...>(value, f);
  }
}

template <int Lo, int Hi, typename F>
inline void switch_int(int64_t value, F&& f) {
  if constexpr (Lo >= Hi) {
    f(std::integral_constant<int, Hi>{});
  } else {
    if (value <= Lo)
      f(std::integral_constant<int, Lo>{});
    else
      switch_int<Lo + 1, Hi>(value, f);
  }
}

}  // namespace torchmatgrad
