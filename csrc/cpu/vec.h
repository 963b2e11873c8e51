// Vector types and conversions shared by the ISA-generic CPU kernels (kernels.h,
// per_sample_kernels.h): float/double vectors of TORCHMATGRAD_VEC_BYTES (32 or 64), the scalar
// widening/narrowing of the 16-bit tags bf16_t / f16_t (same bits as c10::BFloat16 / c10::Half),
// widening vector loads and narrowing stores (whole vectors and the first `count` lanes), and a
// horizontal sum.
//
// Included by each ISA unit first of the three, inside the unit's namespace and under its
// `#pragma GCC target`, with TORCHMATGRAD_VEC_BYTES, TORCHMATGRAD_F16C and TORCHMATGRAD_AVX512
// saying what the unit's instructions are; hence no include guard and no #include here.

#ifndef TORCHMATGRAD_VEC_BYTES
#define TORCHMATGRAD_VEC_BYTES 32
#endif

typedef float f32v __attribute__((vector_size(TORCHMATGRAD_VEC_BYTES)));
typedef double f64v __attribute__((vector_size(TORCHMATGRAD_VEC_BYTES)));
// As many 16-bit / 32-bit integers as a float vector has lanes (16-bit conversions).
typedef uint16_t u16h __attribute__((vector_size(TORCHMATGRAD_VEC_BYTES / 2)));
typedef uint32_t u32v __attribute__((vector_size(TORCHMATGRAD_VEC_BYTES)));

template <typename A>
struct VecOf {
  using type = f32v;
  static constexpr int64_t lanes = TORCHMATGRAD_VEC_BYTES / 4;
};
template <>
struct VecOf<double> {
  using type = f64v;
  static constexpr int64_t lanes = TORCHMATGRAD_VEC_BYTES / 8;
};

// ---- scalar conversions -------------------------------------------------------------------
inline float to_acc(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_acc(f16_t v) {
  _Float16 h;
  std::memcpy(&h, &v.x, 2);
  return static_cast<float>(h);
}
inline float to_acc(float v) {
  return v;
}
inline double to_acc(double v) {
  return v;
}

template <typename O>
inline O from_acc(acc_t<O> v);
template <>
inline float from_acc<float>(float v) {
  return v;
}
template <>
inline double from_acc<double>(double v) {
  return v;
}
template <>
inline bf16_t from_acc<bf16_t>(float v) {
  // Round to nearest even, as c10::BFloat16 does; NaN stays a quiet NaN.
  uint32_t u;
  std::memcpy(&u, &v, 4);
  bf16_t r;
  r.x = (v != v) ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return r;
}
template <>
inline f16_t from_acc<f16_t>(float v) {
  _Float16 h = static_cast<_Float16>(v);
  f16_t r;
  std::memcpy(&r.x, &h, 2);
  return r;
}

// ---- vector loads (widening) and stores (narrowing) ----------------------------------------
template <typename T>
inline typename VecOf<acc_t<T>>::type vload(const T* p) {
  typename VecOf<acc_t<T>>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <>
inline f32v vload<bf16_t>(const bf16_t* p) {
  // bf16 is the top half of a float: widen and shift (vpmovzxwd + vpslld).
  u16h h;
  std::memcpy(&h, p, sizeof(h));
  u32v w = __builtin_convertvector(h, u32v) << 16;
  f32v r;
  std::memcpy(&r, &w, sizeof(r));
  return r;
}
template <>
inline f32v vload<f16_t>(const f16_t* p) {
#if defined(TORCHMATGRAD_AVX512)
  // The zero-masked forms: GCC 12 warns on the unmasked ones (an undefined pass-through).
  return _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(TORCHMATGRAD_F16C)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  f32v r;
  for (int i = 0; i < int(VecOf<float>::lanes); ++i) r[i] = to_acc(p[i]);
  return r;
#endif
}

template <typename O>
inline void vstore(O* p, typename VecOf<acc_t<O>>::type v) {
  std::memcpy(p, &v, sizeof(v));
}
template <>
inline void vstore<bf16_t>(bf16_t* p, f32v v) {
  u32v u;
  std::memcpy(&u, &v, sizeof(u));
  u32v r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? u32v{} + 0x7fc0u : r;  // NaN stays a quiet NaN
  u16h h = __builtin_convertvector(r, u16h);
  std::memcpy(p, &h, sizeof(h));
}
template <>
inline void vstore<f16_t>(f16_t* p, f32v v) {
#if defined(TORCHMATGRAD_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_maskz_cvtps_ph(0xffff, v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(TORCHMATGRAD_F16C)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < int(VecOf<float>::lanes); ++i) p[i] = from_acc<f16_t>(v[i]);
#endif
}

// The first `count` (0 < count < lanes) elements of a vector, the rest zero: the end of a row
// whose length is not a multiple of the vector width. A whole vector step with zeros in the
// unused lanes costs one step; the scalar loop it replaces cost up to lanes-1 steps per row and
// output (grad_W 1000×336 at 8 rows: 3× the time of 1000×320). AVX-512 has masked loads and
// stores that touch only the elements asked for; elsewhere the elements go through a small
// buffer.
template <typename T>
inline typename VecOf<acc_t<T>>::type vload_n(const T* p, int64_t count) {
#if defined(TORCHMATGRAD_AVX512)
  const auto mask = static_cast<uint32_t>((uint64_t(1) << count) - 1);
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(__mmask16(mask), p);
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_maskz_loadu_pd(__mmask8(mask), p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(__mmask16(mask), p);
    if constexpr (std::is_same_v<T, f16_t>) {
      return _mm512_maskz_cvtph_ps(0xffff, h);
    } else {
      u16h hv;
      std::memcpy(&hv, &h, sizeof(hv));
      u32v w = __builtin_convertvector(hv, u32v) << 16;
      f32v r;
      std::memcpy(&r, &w, sizeof(r));
      return r;
    }
  }
#else
  T buf[VecOf<acc_t<T>>::lanes] = {};
  std::memcpy(buf, p, size_t(count) * sizeof(T));
  return vload(buf);
#endif
}

template <typename O>
inline void vstore_n(O* p, typename VecOf<acc_t<O>>::type v, int64_t count) {
#if defined(TORCHMATGRAD_AVX512)
  const auto mask = static_cast<uint32_t>((uint64_t(1) << count) - 1);
  if constexpr (std::is_same_v<O, float>) {
    _mm512_mask_storeu_ps(p, __mmask16(mask), v);
  } else if constexpr (std::is_same_v<O, double>) {
    _mm512_mask_storeu_pd(p, __mmask8(mask), v);
  } else {
    O buf[VecOf<float>::lanes];
    vstore(buf, v);
    __m256i h;
    std::memcpy(&h, buf, sizeof(h));
    _mm256_mask_storeu_epi16(p, __mmask16(mask), h);
  }
#else
  O buf[VecOf<acc_t<O>>::lanes];
  vstore(buf, v);
  std::memcpy(p, buf, size_t(count) * sizeof(O));
#endif
}

template <typename V>
inline auto hsum(V v) {
  auto s = v[0];
  for (int i = 1; i < int(sizeof(V) / sizeof(s)); ++i) s += v[i];
  return s;
}
