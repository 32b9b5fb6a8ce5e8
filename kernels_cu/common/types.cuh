// flashtree: 16-bit element types and 16-byte vector access, with no CUDA headers.
//
// NVRTC compiles these kernels without cuda_fp16.h or cuda_bf16.h: the 16-bit types are
// plain storage structs and every conversion is one PTX instruction (sm_80 and newer).
// Keeping the headers out makes a cold compile take a fraction of a second.
#pragma once

namespace ft {

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

struct __align__(2) f16 { u16 bits; };
struct __align__(2) bf16 { u16 bits; };

// Conditional<C, A, B>::type is A when C holds, else B (std::conditional; no std headers here).
template <bool C, typename A, typename B> struct Conditional { typedef A type; };
template <typename A, typename B> struct Conditional<false, A, B> { typedef B type; };

// A 16-byte vector: the unit of every global-memory load and store here.
struct __align__(16) Vec16 { u32 w[4]; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(f16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
__device__ __forceinline__ float to_float(bf16 x) {
  // bf16 is the top half of an fp32: widening is a shift.
  return __uint_as_float(static_cast<u32>(x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ f16 from_float<f16>(float f) {
  f16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
  return h;
}
template <> __device__ __forceinline__ bf16 from_float<bf16>(float f) {
  bf16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
  return h;
}

// Two floats packed into one 32-bit register of 16-bit values (lo = a, hi = b),
// the operand layout of mma.sync.
template <typename T> __device__ __forceinline__ u32 pack2(float a, float b);
template <> __device__ __forceinline__ u32 pack2<f16>(float a, float b) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
  return r;
}
template <> __device__ __forceinline__ u32 pack2<bf16>(float a, float b) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
  return r;
}

// The inverse of pack2: the two 16-bit values of a register as floats (lo, hi).
template <typename T>
__device__ __forceinline__ float2 unpack2(u32 w) {
  const T* e = reinterpret_cast<const T*>(&w);
  return make_float2(to_float(e[0]), to_float(e[1]));
}

// Elements of T in one 16-byte vector.
template <typename T> struct VecWidth { static constexpr int value = 16 / sizeof(T); };

// Unpack a 16-byte vector of T into floats.
template <typename T>
__device__ __forceinline__ void vec_to_float(const Vec16& v, float (&f)[VecWidth<T>::value]) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < VecWidth<T>::value; ++i) f[i] = to_float(e[i]);
}
// bf16 widens by shifts on whole 32-bit words (two values each): no per-element extraction.
template <>
__device__ __forceinline__ void vec_to_float<bf16>(const Vec16& v, float (&f)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(v.w[i] << 16);
    f[2 * i + 1] = __uint_as_float(v.w[i] & 0xffff0000u);
  }
}
// Store N floats as N values of T with one vector instruction (8 or 16 bytes). Building the
// 32-bit words first matters: a struct of 16-bit members is stored element by element.
template <typename T> struct Words { static constexpr int per = 4 / sizeof(T); };
template <typename T> __device__ __forceinline__ u32 word_of(const float* f);
template <> __device__ __forceinline__ u32 word_of<float>(const float* f) { return __float_as_uint(f[0]); }
template <> __device__ __forceinline__ u32 word_of<f16>(const float* f) { return pack2<f16>(f[0], f[1]); }
template <> __device__ __forceinline__ u32 word_of<bf16>(const float* f) { return pack2<bf16>(f[0], f[1]); }

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[N]) {
  constexpr int kWords = N / Words<T>::per;
  static_assert(kWords == 2 || kWords == 4, "store_vec writes 8 or 16 bytes");
  u32 w[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = word_of<T>(f + i * Words<T>::per);
  if constexpr (kWords == 4) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
  } else {
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" :: "l"(p), "r"(w[0]), "r"(w[1]) : "memory");
  }
}

// Programmatic dependent launch (compute capability >= 9.0; no-ops below): a kernel launched with
// `dependent=True` (flashtree/_jit/runtime.py) may start once every CTA of the kernel before it on
// the stream has called pdl_launch_dependents (its first call per CTA counts) or exited, and must
// call pdl_wait before it reads anything that kernel writes.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Streaming load: the data is read once, keep it out of L1.
__device__ __forceinline__ Vec16 load_vec_stream(const void* p) {
  Vec16 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
               : "l"(p));
  return v;
}

}  // namespace ft
