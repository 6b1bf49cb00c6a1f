// Runtime value -> compile-time template argument, for the launchers (plain C++17, no CUDA).
//
//   with_int<2, 3, 4>(bits, fallback, [&](auto b) { return launch<decltype(b)::value>(...); })
//
// calls f(std::integral_constant<int, V>{}) for the V in Vs equal to v and returns its result, or
// returns fallback when v is none of them. One helper instead of a switch per template parameter.
#pragma once

#include <type_traits>

namespace flute {

template <int... Vs, typename R, typename F>
R with_int(int v, R fallback, F&& f) {
  R result = fallback;
  (void)((v == Vs ? (result = f(std::integral_constant<int, Vs>{}), true) : false) || ...);
  return result;
}

}  // namespace flute
