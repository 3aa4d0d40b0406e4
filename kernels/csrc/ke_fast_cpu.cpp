// C++ CPU kernels of ke_fast: the same Philox draws as the Triton kernels, bit for bit for uniform
// values (see kernels/reference.py for the contract), parallel over the cores with OpenMP.
#include <torch/extension.h>
#include <cmath>
#include <cstdint>

// Below this many mask words (512K elements) one thread is faster than waking a team, and does not
// suffer when the cores are shared with other processes.
constexpr int64_t kParallelWords = 16384;

namespace {

struct Group { uint32_t r[4]; };

// Philox4x32-10 exactly as triton.language.philox: counter (q_lo, q_hi, stream_lo, stream_hi), key = seed.
inline Group philox(uint64_t q, uint64_t key, uint64_t stream) {
  uint32_t c0 = (uint32_t)q, c1 = (uint32_t)(q >> 32), c2 = (uint32_t)stream, c3 = (uint32_t)(stream >> 32);
  uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
  for (int i = 0; i < 10; ++i) {
    uint64_t pb = (uint64_t)0xCD9E8D57u * c2, pa = (uint64_t)0xD2511F53u * c0;
    uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0, n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)pb; c3 = (uint32_t)pa; c0 = n0; c2 = n2;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  return Group{{c0, c1, c2, c3}};
}

inline float uniform_pm1(uint32_t r) { return (float)((int32_t)(r >> 8) - 8388608) * (1.0f / 8388608.0f); }

// fp32 values of the 4 elements of one group under a scheme kind (0 uniform, 1 normal, 2 zeros).
inline void group_values(const Group& g, int64_t kind, float scale, float out[4]) {
  if (kind == 2) { out[0] = out[1] = out[2] = out[3] = 0.0f; return; }
  if (kind == 0) {
    for (int j = 0; j < 4; ++j) out[j] = uniform_pm1(g.r[j]) * scale;
    return;
  }
  // fp64 Box-Muller rounded once to fp32: agrees with the other backends to about an ulp.
  for (int p = 0; p < 2; ++p) {
    double u1 = (double)((g.r[2 * p] >> 8) + 1) * (1.0 / 16777216.0);
    double u2 = (double)(g.r[2 * p + 1] >> 8) * (1.0 / 16777216.0);
    double rad = std::sqrt(-2.0 * std::log(u1));
    double theta = 6.283185307179586 * u2;
    out[2 * p] = (float)(rad * std::cos(theta)) * scale;
    out[2 * p + 1] = (float)(rad * std::sin(theta)) * scale;
  }
}

// Philox of the 8 groups of one mask word at once, in GCC vector extensions so it compiles to SIMD
// (AVX-512 / AVX2 / NEON; built with -march=native): r[j][i] = output j of group q0 + i.
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint64_t u64x4 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline void mulhilo8(u32x8 a, uint64_t b, u32x8& hi, u32x8& lo) {
  u64x4 a64 = (u64x4)a;
  u64x4 pe = (a64 & 0xFFFFFFFFull) * b;  // lanes 0, 2, 4, 6
  u64x4 po = (a64 >> 32) * b;            // lanes 1, 3, 5, 7
  lo = (u32x8)((pe & 0xFFFFFFFFull) | (po << 32));
  hi = (u32x8)((pe >> 32) | (po & 0xFFFFFFFF00000000ull));
}

inline void philox8(uint64_t q0, uint64_t key, uint64_t stream, u32x8 r[4]) {
  u32x8 c0, c1;
  for (int i = 0; i < 8; ++i) { c0[i] = (uint32_t)(q0 + i); c1[i] = (uint32_t)((q0 + i) >> 32); }
  u32x8 c2 = (u32x8){} + (uint32_t)stream, c3 = (u32x8){} + (uint32_t)(stream >> 32);
  uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
  for (int round = 0; round < 10; ++round) {
    u32x8 hb, lb, ha, la;
    mulhilo8(c2, 0xCD9E8D57u, hb, lb);
    mulhilo8(c0, 0xD2511F53u, ha, la);
    c0 = hb ^ c1 ^ k0; c2 = ha ^ c3 ^ k1; c1 = lb; c3 = la;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  r[0] = c0; r[1] = c1; r[2] = c2; r[3] = c3;
}

// The 32 uniform values of one mask word (element 32w + e), in element order.
inline void uniform32(uint64_t q0, uint64_t key, uint64_t stream, float scale, float out[32]) {
  u32x8 r[4];
  philox8(q0, key, stream, r);
  f32x8 v[4];
  for (int j = 0; j < 4; ++j)
    v[j] = __builtin_convertvector((i32x8)(r[j] >> 8) - 8388608, f32x8) * (1.0f / 8388608.0f) * scale;
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 4; ++j) out[4 * i + j] = v[j][i];
}

template <typename T>
void reset_tensor_impl(T* w, const int32_t* words, int64_t n, uint64_t key, uint64_t stream, int64_t kind, float scale) {
  const int64_t nwords = (n + 31) / 32;
#pragma omp parallel for schedule(static, 256) if (nwords >= kParallelWords)
  for (int64_t wi = 0; wi < nwords; ++wi) {
    uint32_t reset = ~(uint32_t)words[wi];
    const int64_t base = wi * 32;
    if (n - base < 32) reset &= (1u << (n - base)) - 1u;  // tail elements do not exist
    if (reset == 0) continue;  // all-fit word: no read, no write
    float v[32];
    if (kind == 0) {
      uniform32((uint64_t)(base / 4), key, stream, scale, v);
    } else if (kind == 2) {
      for (int e = 0; e < 32; ++e) v[e] = 0.0f;
    } else {
      for (int gi = 0; gi < 8; ++gi)
        if ((reset >> (4 * gi)) & 0xFu) group_values(philox((uint64_t)(base / 4 + gi), key, stream), kind, scale, v + 4 * gi);
    }
    T* out = w + base;
    if (reset == 0xFFFFFFFFu) {  // all-reset word: straight writes, the weight is not read
      for (int e = 0; e < 32; ++e) out[e] = static_cast<T>(v[e]);
    } else {
      for (int e = 0; e < 32; ++e)
        if (reset & (1u << e)) out[e] = static_cast<T>(v[e]);
    }
  }
}

void reset_tensor_(torch::Tensor w, torch::Tensor words, int64_t key, int64_t stream, int64_t kind, double scale) {
  TORCH_CHECK(w.device().is_cpu() && words.device().is_cpu(), "reset_tensor_: CPU tensors expected");
  TORCH_CHECK(w.is_contiguous(), "reset_tensor_: weight must be contiguous");
  TORCH_CHECK(words.scalar_type() == torch::kInt32 && words.is_contiguous(), "reset_tensor_: mask must be contiguous int32 words");
  TORCH_CHECK(words.numel() * 32 >= w.numel(), "reset_tensor_: mask has too few words");
  const float s = (float)scale;
  const int32_t* m = words.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "ke_fast_reset_tensor_cpu", [&] {
    reset_tensor_impl<scalar_t>(w.data_ptr<scalar_t>(), m, w.numel(), (uint64_t)key, (uint64_t)stream, kind, s);
  });
}

torch::Tensor wels_bits(int64_t n, int64_t key, int64_t stream, int64_t threshold) {
  const int64_t nwords = (n + 31) / 32;
  auto out = torch::empty({nwords}, torch::dtype(torch::kInt32));
  int32_t* o = out.data_ptr<int32_t>();
#pragma omp parallel for schedule(static, 256) if (nwords >= kParallelWords)
  for (int64_t wi = 0; wi < nwords; ++wi) {
    const int64_t base = wi * 32;
    u32x8 r[4];
    philox8((uint64_t)(base / 4), (uint64_t)key, (uint64_t)stream, r);
    uint32_t word = 0;
    for (int gi = 0; gi < 8; ++gi)
      for (int j = 0; j < 4; ++j)
        if ((int64_t)(r[j][gi] >> 8) < threshold) word |= 1u << (4 * gi + j);
    if (n - base < 32) word &= (1u << (n - base)) - 1u;  // tail bits stay zero
    o[wi] = (int32_t)word;
  }
  return out;
}

// out = (x * M).to(out dtype): the fit-mode weight (and grad * M) in one pass.
template <typename In, typename Out>
void apply_mask_impl(const In* x, const int32_t* m, Out* out, int64_t n) {
  const int64_t full = n / 32;  // whole words: a fixed 32-step loop the compiler vectorises
#pragma omp parallel for schedule(static, 256) if (full >= kParallelWords / 8)
  for (int64_t wi = 0; wi < full; ++wi) {
    const uint32_t word = (uint32_t)m[wi];
    const In* xs = x + wi * 32;
    Out* os = out + wi * 32;
    for (int e = 0; e < 32; ++e) os[e] = static_cast<Out>(((word >> e) & 1u) ? static_cast<float>(xs[e]) : 0.0f);
  }
  for (int64_t i = full * 32; i < n; ++i)
    out[i] = static_cast<Out>((((uint32_t)m[full] >> (i - full * 32)) & 1u) ? static_cast<float>(x[i]) : 0.0f);
}

torch::Tensor apply_mask(torch::Tensor x, torch::Tensor words, c10::ScalarType out_dtype) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "apply_mask: contiguous CPU tensor expected");
  TORCH_CHECK(words.scalar_type() == torch::kInt32 && words.numel() * 32 >= x.numel(), "apply_mask: bad mask words");
  auto out = torch::empty(x.sizes(), x.options().dtype(out_dtype));
  const int32_t* m = words.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ke_fast_apply_mask_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "ke_fast_apply_mask_out", [&] {
      apply_mask_impl<in_t, scalar_t>(x.data_ptr<in_t>(), m, out.data_ptr<scalar_t>(), x.numel());
    });
  });
  return out;
}

// fp32 values at arbitrary element indices (int64, may exceed 2^31): the tests' probe of the contract.
torch::Tensor draw_at(torch::Tensor idx, int64_t key, int64_t stream, int64_t kind, double scale) {
  TORCH_CHECK(idx.scalar_type() == torch::kInt64, "draw_at: int64 indices expected");
  auto ic = idx.contiguous();
  auto out = torch::empty(ic.sizes(), torch::dtype(torch::kFloat32));
  const int64_t* ip = ic.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float s = (float)scale;
#pragma omp parallel for schedule(static, 1024)
  for (int64_t i = 0; i < ic.numel(); ++i) {
    float v[4];
    group_values(philox((uint64_t)(ip[i] >> 2), (uint64_t)key, (uint64_t)stream), kind, s, v);
    op[i] = v[ip[i] & 3];
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("reset_tensor_", &reset_tensor_, "re-draw the 0-bit (reset) entries of one weight in place");
  m.def("wels_bits", &wels_bits, "WELS mask words from (seed, stream)");
  m.def("draw_at", &draw_at, "fp32 draws at element indices");
  m.def("apply_mask", &apply_mask, "(x * M).to(dtype) in one pass");
}
