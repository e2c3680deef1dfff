// Fused CPU engine for BiLSTM2D token mixing (seqvision issue 4).
//
// x is a contiguous B x H x W x C map. Up to four LSTM (or GRU, or tanh-RNN) directions run over it:
// vertical forward / backward (sequences of length H, one per column: B*W rows) and horizontal forward /
// backward (length W, one per row: B*H rows). The input projections of all directions are one GEMM done by the
// caller-side ATen op here; the recurrences then run in lock-step. Rows (independent sequences) are split
// across threads once, so each thread runs its own time loop with no barrier per step: per step and
// direction, one small GEMM (h_prev @ W_hh^T, sequential BLAS inside the parallel region) followed by the
// fused gate loop (activations, state update), with h and c kept in per-thread buffers that stay in cache.
// Each h is written straight into the final B x H x W x (ndir*D) output at its direction's column block.
//
// Precision: float and double run in their own type. bfloat16: the input projection (~80% of the FLOPs) is a
// bf16 GEMM (oneDNN, fp32 accumulation); gates, h and c are fp32 ("acc" type), and only the output is rounded to
// bf16. The small recurrent GEMMs run in fp32 by default; with `bf16_recurrence` they take bf16 operands (h and
// W_hh rounded) with fp32 accumulation, on the matrix units where the CPU has them (Bf16Operand below).

// ATen and the op registry only: <torch/extension.h> (pybind11 and the whole C++ frontend) took 46 of the
// build's 47 s on 2 cores; these headers take 11.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// BLAS entry points of the MKL linked into libtorch_cpu. Weak: where they are missing (another BLAS,
// another platform) they resolve to null and the ATen fallback below runs instead.
extern "C" {
__attribute__((weak)) void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                                  const float*, const int*, const float*, const int*, const float*, float*,
                                  const int*);
__attribute__((weak)) void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
                                  const double*, const int*, const double*, const int*, const double*, double*,
                                  const int*);
__attribute__((weak)) int MKL_Set_Num_Threads_Local(int);
}

namespace {

// ---------------------------------------------------------------------------------------------------------
// Element types: storage type T, accumulation type acc (float for float/bf16, double for double).
// float and double are stored as computed; bf16 (specialised below) is widened to float.
template <typename T>
struct Elem {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "rnn2d: float, double or bf16 only");
  using acc = T;
  using raw = T;
  static inline T load(T v) { return v; }
  static inline T store(T v) { return v; }
};

// bf16 handled as raw uint16 so the conversions are plain integer ops the compiler can vectorise.
template <>
struct Elem<c10::BFloat16> {
  using acc = float;
  using raw = uint16_t;
  static inline float load(uint16_t v) {
    uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline uint16_t store(float f) {  // round to nearest even (NaN payloads are not preserved)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Activations. float: a branch-free Cephes-style exp (about 1 ulp) that vectorises inside `omp simd`
// loops (libm's expf does not); double: libm, for gradcheck-grade accuracy.
inline float exp_f(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const int n = int(t + 128.5f) - 128;  // round(t), vectorisable (the argument is > 0)
  const float fn = float(n);
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

inline float sigmoid_a(float x) { return 1.0f / (1.0f + exp_f(-x)); }
inline float tanh_a(float x) { return 1.0f - 2.0f / (1.0f + exp_f(2.0f * x)); }
inline double sigmoid_a(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_a(double x) { return std::tanh(x); }

// ---------------------------------------------------------------------------------------------------------
// Row-major GEMM: C[M x N] (ldc) = A[M x K] (lda) * op(B) + beta * C. trans_b: B is stored N x K (op = B^T),
// else K x N. A and B have the storage type, C the accumulation type.
template <typename T>
void gemm_fallback(bool trans_b, int M, int N, int K, const T* A, int lda, const T* B, int ldb,
                   typename Elem<T>::acc beta, typename Elem<T>::acc* C, int ldc) {
  using acc = typename Elem<T>::acc;
  const auto st = c10::CppTypeToScalarType<T>::value;
  const auto sacc = c10::CppTypeToScalarType<acc>::value;
  auto a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, at::TensorOptions().dtype(st));
  auto b = trans_b ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, at::TensorOptions().dtype(st)).t()
                   : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, at::TensorOptions().dtype(st));
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, at::TensorOptions().dtype(sacc));
  auto prod = at::mm(a.to(sacc), b.to(sacc));
  if (beta == acc(0)) {
    c.copy_(prod);
  } else {
    c.mul_(beta).add_(prod);
  }
}

inline void gemm(bool trans_b, int M, int N, int K, const float* A, int lda, const float* B, int ldb, float beta,
                 float* C, int ldc) {
  if (!sgemm_) return gemm_fallback<float>(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
  // Column-major BLAS computes C^T = op(B)^T A^T: swap the operands.
  const float one = 1.0f;
  sgemm_(trans_b ? "T" : "N", "N", &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

inline void gemm(bool trans_b, int M, int N, int K, const double* A, int lda, const double* B, int ldb,
                 double beta, double* C, int ldc) {
  if (!dgemm_) return gemm_fallback<double>(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
  const double one = 1.0;
  dgemm_(trans_b ? "T" : "N", "N", &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

// The per-step GEMMs are small and already run one per thread: keep MKL from nesting its own threads.
struct SequentialBlas {
  int prev = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  }
};

// ---------------------------------------------------------------------------------------------------------
// The fixed right operand B (K x N) of a recurrent product C = A B in bf16, prepared once per call and used at
// every step. Rows are padded with zeros to an even count and columns to a multiple of 16 (the matrix units
// multiply rows in pairs and write 16 fp32 columns per tile); A's padding columns are zero too, so the padding
// adds nothing. Where oneDNN packs bf16 for AMX, B is split into column blocks of `nb` (the output widths its
// packing takes) and each block is packed: the products then run on AMX tiles through oneDNN's batch-reduce
// GEMM ukernel (ATen's cpublas::brgemm). Elsewhere B stays row-major and the same call runs ATen's bf16 GEMM
// (oneDNN's AVX-512 kernels, or ATen's portable loop): slower, the same products up to summation order.
class Bf16Operand {
 public:
  // B[k][n] = src[k * sk + n * sn].
  Bf16Operand(const c10::BFloat16* src, int64_t K, int64_t N, int64_t sk, int64_t sn)
      : k_pad((K + 1) / 2 * 2), n_pad((N + 15) / 16 * 16), vnni_(packs_for_amx()) {
    nb_ = n_pad;
    if (vnni_) {
      for (int64_t nb : {64, 48, 32, 16}) {
        if (n_pad % nb == 0) {
          nb_ = nb;
          break;
        }
      }
    }
    std::vector<c10::BFloat16> block(k_pad * nb_);
    data_.resize(k_pad * n_pad);
    for (int64_t n0 = 0; n0 < n_pad; n0 += nb_) {
      for (int64_t k = 0; k < k_pad; ++k) {
        for (int64_t n = 0; n < nb_; ++n) {
          const bool inside = k < K && n0 + n < N;
          block[k * nb_ + n] = inside ? src[k * sk + (n0 + n) * sn] : c10::BFloat16(0.0f);
        }
      }
      c10::BFloat16* dst = data_.data() + n0 * k_pad;
      if (vnni_) {
        at::native::cpublas::pack(k_pad, nb_, nb_, nb_, at::kBFloat16, at::kBFloat16, block.data(), dst);
      } else {
        std::copy(block.begin(), block.end(), dst);
      }
    }
  }

  // C[M x n_pad] (row stride ldc) = A[M x k_pad] (row stride lda) B, in fp32.
  void multiply(int64_t M, const c10::BFloat16* A, int64_t lda, float* C, int64_t ldc) const {
    for (int64_t n0 = 0; n0 < n_pad; n0 += nb_) {
      at::native::cpublas::brgemm(M, nb_, k_pad, lda, nb_, ldc, /*add_C=*/false, A, data_.data() + n0 * k_pad,
                                  C + n0, vnni_);
    }
  }

  // Frees the AMX tile state a thread's multiplications configured; each thread calls it once it is done.
  void release() const { at::native::cpublas::brgemm_release(vnni_); }

  static bool packs_for_amx() { return at::native::cpublas::could_pack(at::kBFloat16); }

  int64_t k_pad, n_pad;

 private:
  int64_t nb_;
  bool vnni_;
  std::vector<c10::BFloat16> data_;
};

// One operand per direction, from the bf16 recurrent weights (ndir x G*D x D): the forward multiplies by W_hh^T
// (K = D, N = G*D), the backward by W_hh (K = G*D, N = D).
std::vector<Bf16Operand> bf16_operands(const at::Tensor& w_hh, bool transpose) {
  const int64_t nd = w_hh.size(0), GD = w_hh.size(1), D = w_hh.size(2);
  const auto* w = w_hh.data_ptr<c10::BFloat16>();
  std::vector<Bf16Operand> ops;
  for (int64_t d = 0; d < nd; ++d) {
    if (transpose) {
      ops.emplace_back(w + d * GD * D, D, GD, 1, D);
    } else {
      ops.emplace_back(w + d * GD * D, GD, D, D, 1);
    }
  }
  return ops;
}

// ---------------------------------------------------------------------------------------------------------
// Geometry of one direction over the B x H x W token grid.
struct Dir {
  bool vertical;
  bool reverse;
  int64_t T;     // sequence length (H or W)
  int64_t rows;  // number of sequences (B*W or B*H)
};

struct Grid {
  int64_t B, H, W;
  std::vector<Dir> dirs;  // vertical directions first, forward before backward (the output column order)

  Grid(int64_t B_, int64_t H_, int64_t W_, int64_t n_v, int64_t n_h) : B(B_), H(H_), W(W_) {
    for (int64_t k = 0; k < n_v; ++k) dirs.push_back({true, k == 1, H, B * W});
    for (int64_t k = 0; k < n_h; ++k) dirs.push_back({false, k == 1, W, B * H});
  }
  int64_t steps() const {
    int64_t t = 0;
    for (const auto& d : dirs) t = std::max(t, d.T);
    return t;
  }
  // Token index (b*H + row)*W + col read by sequence n of direction d at step t.
  inline int64_t token(const Dir& d, int64_t t, int64_t n) const {
    const int64_t s = d.reverse ? d.T - 1 - t : t;
    if (d.vertical) {
      const int64_t b = n / W;
      return (b * H + s) * W + (n - b * W);
    }
    return n * W + s;
  }
};

#ifndef SEQVISION_ROW_BLOCK
#define SEQVISION_ROW_BLOCK 32
#endif
constexpr int64_t kRowBlock = SEQVISION_ROW_BLOCK;

// A direction's rows sit at scattered tokens (one token record or one image row apart), so each row's
// projections, gates and outputs miss the cache, and hardware prefetchers do not follow that pattern. The
// step loops fetch row i + kAhead while row i computes: measured on 2 AVX2 cores, the stage-1 mixer of
// Sequencer2D-S went from 45 to 34 ms.
constexpr int64_t kAhead = 2;
template <bool WRITE = false>
inline void prefetch(const void* p, int64_t bytes) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(p), end = start + uintptr_t(bytes);
  for (uintptr_t line = start & ~uintptr_t(63); line < end; line += 64) {  // every cache line the range touches
    __builtin_prefetch(reinterpret_cast<const void*>(line), WRITE, 3);
  }
}

// Threads used and the row range [lo, hi) of a direction owned by thread `tid`.
inline int64_t pick_threads(const Grid& g) {
  int64_t rows = 0;
  for (const auto& d : g.dirs) rows = std::max(rows, d.rows);
  // Fewer than ~4 rows per thread makes the per-step GEMM pure overhead.
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 4));
}
inline void row_range(int64_t rows, int64_t tid, int64_t nt, int64_t& lo, int64_t& hi) {
  lo = rows * tid / nt;
  hi = rows * (tid + 1) / nt;
}

// Rows [lo[d], hi[d]) of every direction d owned by thread `tid`, and the most rows any direction gives it.
struct ThreadRows {
  std::vector<int64_t> lo, hi;
  int64_t max_rows;
};
inline ThreadRows thread_rows(const Grid& g, int64_t tid, int64_t nt) {
  const size_t nd = g.dirs.size();
  ThreadRows r{std::vector<int64_t>(nd), std::vector<int64_t>(nd), 0};
  for (size_t d = 0; d < nd; ++d) {
    row_range(g.dirs[d].rows, tid, nt, r.lo[d], r.hi[d]);
    r.max_rows = std::max(r.max_rows, r.hi[d] - r.lo[d]);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// The cells, in PyTorch's definitions and gate orders. Per direction, a token's input projection has
// kGates[K] blocks of D; training saves kSaved[K] blocks of D (acc type) per token and direction:
//   LSTM (i, f, g, o):  c = f c + i g, h = o tanh(c)            saves i, f, g, o (and c, in `cells`)
//   GRU (r, z, n):      n = tanh(x_n + b_in + r (W_hn h + b_hn)), h = (1 - z) n + z h_prev
//                                                              saves r, z, n, W_hn h + b_hn, h_prev
//   tanh-RNN:           h = tanh(x W_ih^T + b + h_prev W_hh^T)  saves h
enum Cell : int { kLSTM = 0, kGRU = 1, kRNN = 2 };
constexpr int64_t kGates[] = {4, 3, 1};
constexpr int64_t kSaved[] = {4, 5, 1};

Cell parse_cell(const std::string& name) {
  if (name == "lstm") return kLSTM;
  if (name == "gru") return kGRU;
  TORCH_CHECK(name == "rnn", "unknown cell '", name, "' (lstm, gru or rnn, the tanh RNN)");
  return kRNN;
}

// ---------------------------------------------------------------------------------------------------------
// Forward. Per row: pre = xproj + bias + h_prev W_hh^T, then the cell's gate math. `bias` is b_ih + b_hh,
// except for the GRU's n block, where it is b_in alone and b_hn (`bias_hn`) goes inside r (W_hn h + b_hn).
// BR: the recurrent products in bf16 (T = bf16 only), through `bf16_w` (one operand per direction), not `w_hh`.
template <typename T, int K, bool SAVE, bool BR>
void rnn_forward_impl(const Grid& g, int64_t D, const T* xproj, const typename Elem<T>::acc* bias,
                      const typename Elem<T>::acc* bias_hn, const typename Elem<T>::acc* w_hh,
                      const std::vector<Bf16Operand>& bf16_w, T* out, typename Elem<T>::acc* gates,
                      typename Elem<T>::acc* cells) {
  using acc = typename Elem<T>::acc;
  using raw = typename Elem<T>::raw;
  static_assert(!BR || std::is_same_v<T, c10::BFloat16>, "bf16 recurrent products are for bf16 calls");
  constexpr int64_t NG = kGates[K], NS = kSaved[K];
  const int64_t nd = int64_t(g.dirs.size()), GD = NG * D, SD = NS * D, proj_ld = nd * GD, out_ld = nd * D;
  const int64_t nt = pick_threads(g), steps = g.steps();
  // The recurrent product's row stride, and (BR) the row stride of the bf16 copy of h it multiplies.
  const int64_t r_ld = BR ? bf16_w[0].n_pad : GD, hb_ld = BR ? bf16_w[0].k_pad : 0;

  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    const SequentialBlas sequential;
    for (int64_t tid = t0; tid < t1; ++tid) {
      const auto [lo, hi, max_rows] = thread_rows(g, tid, nt);
      // Per-thread state in the acc type: h (the next GEMM's input; zero at t = 0), c, the recurrent product.
      std::vector<acc> hbuf(nd * max_rows * D, acc(0));
      std::vector<acc> cbuf(K == kLSTM ? nd * max_rows * D : 0, acc(0));
      std::vector<acc> rbuf(kRowBlock * r_ld);
      std::vector<uint16_t> hbbuf(nd * max_rows * hb_ld, 0);  // BR: h rounded to bf16 (zero padding columns)

      for (int64_t t = 0; t < steps; ++t) {
        for (int64_t d = 0; d < nd; ++d) {
          const Dir& dir = g.dirs[d];
          const int64_t m = hi[d] - lo[d];
          if (t >= dir.T || m == 0) continue;
          acc* h = hbuf.data() + d * max_rows * D;
          acc* c = K == kLSTM ? cbuf.data() + d * max_rows * D : nullptr;
          acc* r = rbuf.data();
          uint16_t* hb = hbbuf.data() + d * max_rows * hb_ld;
          const acc* b = bias + d * GD;
          const acc* bhn = K == kGRU ? bias_hn + d * D : nullptr;
          // Row blocks keep the recurrent product (kRowBlock x GD) in L1 between the GEMM and the gate loop.
          for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
            const int64_t mb = std::min(kRowBlock, m - r0);
            if (t == 0) {
              std::fill(r, r + mb * r_ld, acc(0));  // zero initial state
            } else if constexpr (BR) {
              bf16_w[d].multiply(mb, reinterpret_cast<const c10::BFloat16*>(hb + r0 * hb_ld), hb_ld, r, r_ld);
            } else {
              gemm(true, int(mb), int(GD), int(D), h + r0 * D, int(D), w_hh + d * GD * D, int(D), acc(0), r, int(GD));
            }
            for (int64_t i = r0; i < r0 + mb; ++i) {
              if (i + kAhead < m) {
                const int64_t ahead = g.token(dir, t, lo[d] + i + kAhead);
                prefetch(xproj + ahead * proj_ld + d * GD, GD * int64_t(sizeof(T)));
                prefetch<true>(out + ahead * out_ld + d * D, D * int64_t(sizeof(T)));
                if (SAVE) {
                  prefetch<true>(gates + (ahead * nd + d) * SD, SD * int64_t(sizeof(acc)));
                  if (K == kLSTM) prefetch<true>(cells + (ahead * nd + d) * D, D * int64_t(sizeof(acc)));
                }
              }
              const int64_t tok = g.token(dir, t, lo[d] + i);
              const raw* xp = reinterpret_cast<const raw*>(xproj + tok * proj_ld + d * GD);
              const acc* ri = r + (i - r0) * r_ld;
              acc* hi_ = h + i * D;
              uint16_t* hbi = hb + i * hb_ld;
              raw* oi = reinterpret_cast<raw*>(out + tok * out_ld + d * D);
              acc* gs = SAVE ? gates + (tok * nd + d) * SD : nullptr;
              if constexpr (K == kLSTM) {
                acc* ci = c + i * D;
                acc* cs = SAVE ? cells + (tok * nd + d) * D : nullptr;
#pragma omp simd
                for (int64_t j = 0; j < D; ++j) {
                  const acc ig = sigmoid_a(Elem<T>::load(xp[j]) + b[j] + ri[j]);
                  const acc fg = sigmoid_a(Elem<T>::load(xp[D + j]) + b[D + j] + ri[D + j]);
                  const acc gg = tanh_a(Elem<T>::load(xp[2 * D + j]) + b[2 * D + j] + ri[2 * D + j]);
                  const acc og = sigmoid_a(Elem<T>::load(xp[3 * D + j]) + b[3 * D + j] + ri[3 * D + j]);
                  const acc cn = fg * ci[j] + ig * gg;
                  const acc hv = og * tanh_a(cn);
                  ci[j] = cn;
                  hi_[j] = hv;
                  oi[j] = Elem<T>::store(hv);
                  if constexpr (BR) hbi[j] = Elem<c10::BFloat16>::store(hv);
                  if (SAVE) {
                    gs[j] = ig;
                    gs[D + j] = fg;
                    gs[2 * D + j] = gg;
                    gs[3 * D + j] = og;
                    cs[j] = cn;
                  }
                }
              } else if constexpr (K == kGRU) {
#pragma omp simd
                for (int64_t j = 0; j < D; ++j) {
                  const acc rg = sigmoid_a(Elem<T>::load(xp[j]) + b[j] + ri[j]);
                  const acc zg = sigmoid_a(Elem<T>::load(xp[D + j]) + b[D + j] + ri[D + j]);
                  const acc hn = ri[2 * D + j] + bhn[j];
                  const acc ng = tanh_a(Elem<T>::load(xp[2 * D + j]) + b[2 * D + j] + rg * hn);
                  const acc hp = hi_[j];
                  const acc hv = (acc(1) - zg) * ng + zg * hp;
                  hi_[j] = hv;
                  oi[j] = Elem<T>::store(hv);
                  if constexpr (BR) hbi[j] = Elem<c10::BFloat16>::store(hv);
                  if (SAVE) {
                    gs[j] = rg;
                    gs[D + j] = zg;
                    gs[2 * D + j] = ng;
                    gs[3 * D + j] = hn;
                    gs[4 * D + j] = hp;
                  }
                }
              } else {
#pragma omp simd
                for (int64_t j = 0; j < D; ++j) {
                  const acc hv = tanh_a(Elem<T>::load(xp[j]) + b[j] + ri[j]);
                  hi_[j] = hv;
                  oi[j] = Elem<T>::store(hv);
                  if constexpr (BR) hbi[j] = Elem<c10::BFloat16>::store(hv);
                  if (SAVE) gs[j] = hv;
                }
              }
            }
          }
        }
      }
    }
    if constexpr (BR) bf16_w[0].release();
  });
}

// A hidden-side d(pre-activation) value for the next recurrent product: fp32, or rounded to bf16 (BR).
template <bool BR, typename acc>
inline void put_dp(acc* dp, uint16_t* dp_bf16, int64_t idx, acc v) {
  if constexpr (BR) {
    dp_bf16[idx] = Elem<c10::BFloat16>::store(v);
  } else {
    dp[idx] = v;
  }
}

// Backward through time. Produces d(pre-activation) for every token and direction: `dpre` on the input side
// (dx, dW_ih, the bias) and, for the GRU, whose n block differs by the factor r, `dpre_h` on the hidden side
// (dW_hh, b_hn); the caller gets dx and every weight gradient from them with large GEMMs.
// BR: the recurrent products in bf16 (T = bf16 only), through `bf16_w` (one operand per direction), not `w_hh`.
template <typename T, int K, bool BR>
void rnn_backward_impl(const Grid& g, int64_t D, const T* grad_out, const typename Elem<T>::acc* w_hh,
                       const std::vector<Bf16Operand>& bf16_w, const typename Elem<T>::acc* gates,
                       const typename Elem<T>::acc* cells, T* dpre, T* dpre_h) {
  using acc = typename Elem<T>::acc;
  using raw = typename Elem<T>::raw;
  static_assert(!BR || std::is_same_v<T, c10::BFloat16>, "bf16 recurrent products are for bf16 calls");
  constexpr int64_t NG = kGates[K], NS = kSaved[K];
  const int64_t nd = int64_t(g.dirs.size()), GD = NG * D, SD = NS * D, pre_ld = nd * GD, out_ld = nd * D;
  const int64_t nt = pick_threads(g), steps = g.steps();
  // Row strides of dL/dh (the product) and of the hidden-side dpre rows it multiplies (BR: in bf16, padded).
  const int64_t dh_ld = BR ? bf16_w[0].n_pad : D, dp_ld = BR ? bf16_w[0].k_pad : GD;

  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    const SequentialBlas sequential;
    for (int64_t tid = t0; tid < t1; ++tid) {
      const auto [lo, hi, max_rows] = thread_rows(g, tid, nt);
      // This step's hidden-side dpre rows, contiguous for the GEMM (BR: rounded to bf16, zero padding columns).
      std::vector<acc> dpbuf(BR ? 0 : nd * max_rows * GD);
      std::vector<uint16_t> dpbbuf(BR ? nd * max_rows * dp_ld : 0, 0);
      std::vector<acc> dcbuf(nd * max_rows * D);   // carried to the previous step: LSTM dL/dc, GRU dL/dh via z
      std::vector<acc> dhbuf(max_rows * dh_ld);    // dL/dh from the recurrent product
      const std::vector<acc> zeros(D, acc(0));     // c_{-1}

      for (int64_t t = steps - 1; t >= 0; --t) {
        for (int64_t d = 0; d < nd; ++d) {
          const Dir& dir = g.dirs[d];
          const int64_t m = hi[d] - lo[d];
          if (t >= dir.T || m == 0) continue;
          acc* dp = BR ? nullptr : dpbuf.data() + d * max_rows * GD;
          uint16_t* dpb = BR ? dpbbuf.data() + d * max_rows * dp_ld : nullptr;
          acc* dc = dcbuf.data() + d * max_rows * D;
          acc* dh = dhbuf.data();
          if (t == dir.T - 1) {
            std::fill(dh, dh + m * dh_ld, acc(0));
            std::fill(dc, dc + m * D, acc(0));
          } else if constexpr (BR) {
            bf16_w[d].multiply(m, reinterpret_cast<const c10::BFloat16*>(dpb), dp_ld, dh, dh_ld);
          } else {
            gemm(false, int(m), int(D), int(GD), dp, int(GD), w_hh + d * GD * D, int(D), acc(0), dh, int(D));
          }
          for (int64_t i = 0; i < m; ++i) {
            const int64_t n = lo[d] + i;
            if (i + kAhead < m) {
              const int64_t ahead = g.token(dir, t, n + kAhead);
              prefetch(gates + (ahead * nd + d) * SD, SD * int64_t(sizeof(acc)));
              if (K == kLSTM) {
                prefetch(cells + (ahead * nd + d) * D, D * int64_t(sizeof(acc)));
                if (t > 0) prefetch(cells + (g.token(dir, t - 1, n + kAhead) * nd + d) * D, D * int64_t(sizeof(acc)));
              }
              prefetch(grad_out + ahead * out_ld + d * D, D * int64_t(sizeof(T)));
              prefetch<true>(dpre + ahead * pre_ld + d * GD, GD * int64_t(sizeof(T)));
              if (K == kGRU) prefetch<true>(dpre_h + ahead * pre_ld + d * GD, GD * int64_t(sizeof(T)));
            }
            const int64_t tok = g.token(dir, t, n);
            const acc* gs = gates + (tok * nd + d) * SD;
            const raw* go = reinterpret_cast<const raw*>(grad_out + tok * out_ld + d * D);
            raw* dpg = reinterpret_cast<raw*>(dpre + tok * pre_ld + d * GD);
            acc* dpl = BR ? nullptr : dp + i * GD;
            uint16_t* dpbl = BR ? dpb + i * dp_ld : nullptr;
            const acc* dhi = dh + i * dh_ld;
            acc* dci = dc + i * D;
            if constexpr (K == kLSTM) {
              const acc* cs = cells + (tok * nd + d) * D;
              const acc* cp = t > 0 ? cells + (g.token(dir, t - 1, n) * nd + d) * D : zeros.data();
#pragma omp simd
              for (int64_t j = 0; j < D; ++j) {
                const acc ig = gs[j], fg = gs[D + j], gg = gs[2 * D + j], og = gs[3 * D + j];
                const acc tc = tanh_a(cs[j]);
                const acc dhv = Elem<T>::load(go[j]) + dhi[j];
                const acc dcv = dci[j] + dhv * og * (acc(1) - tc * tc);
                const acc cprev = cp[j];
                dci[j] = dcv * fg;
                const acc di = dcv * gg * ig * (acc(1) - ig);
                const acc df = dcv * cprev * fg * (acc(1) - fg);
                const acc dg = dcv * ig * (acc(1) - gg * gg);
                const acc dO = dhv * tc * og * (acc(1) - og);
                dpg[j] = Elem<T>::store(di);
                dpg[D + j] = Elem<T>::store(df);
                dpg[2 * D + j] = Elem<T>::store(dg);
                dpg[3 * D + j] = Elem<T>::store(dO);
                put_dp<BR>(dpl, dpbl, j, di);
                put_dp<BR>(dpl, dpbl, D + j, df);
                put_dp<BR>(dpl, dpbl, 2 * D + j, dg);
                put_dp<BR>(dpl, dpbl, 3 * D + j, dO);
              }
            } else if constexpr (K == kGRU) {
              raw* dph = reinterpret_cast<raw*>(dpre_h + tok * pre_ld + d * GD);
#pragma omp simd
              for (int64_t j = 0; j < D; ++j) {
                const acc rg = gs[j], zg = gs[D + j], ng = gs[2 * D + j], hn = gs[3 * D + j], hp = gs[4 * D + j];
                const acc dhv = Elem<T>::load(go[j]) + dhi[j] + dci[j];
                const acc dn = dhv * (acc(1) - zg) * (acc(1) - ng * ng);
                const acc dz = dhv * (hp - ng) * zg * (acc(1) - zg);
                const acc dr = dn * hn * rg * (acc(1) - rg);
                const acc dnh = dn * rg;  // through W_hn h + b_hn
                dci[j] = dhv * zg;
                dpg[j] = Elem<T>::store(dr);
                dpg[D + j] = Elem<T>::store(dz);
                dpg[2 * D + j] = Elem<T>::store(dn);
                dph[j] = Elem<T>::store(dr);
                dph[D + j] = Elem<T>::store(dz);
                dph[2 * D + j] = Elem<T>::store(dnh);
                put_dp<BR>(dpl, dpbl, j, dr);
                put_dp<BR>(dpl, dpbl, D + j, dz);
                put_dp<BR>(dpl, dpbl, 2 * D + j, dnh);
              }
            } else {
#pragma omp simd
              for (int64_t j = 0; j < D; ++j) {
                const acc hv = gs[j];
                const acc dv = (Elem<T>::load(go[j]) + dhi[j]) * (acc(1) - hv * hv);
                dpg[j] = Elem<T>::store(dv);
                put_dp<BR>(dpl, dpbl, j, dv);
              }
            }
          }
        }
      }
    }
    if constexpr (BR) bf16_w[0].release();
  });
}

// ---------------------------------------------------------------------------------------------------------
// Workspace for the input projections of one chunk of images (below), reused across calls (one per calling
// thread, grow-only: it keeps the largest chunk seen, 6 MB at stage 1 of S on 2 threads). Re-use avoids the page
// faults and zeroing of a fresh multi-MB allocation per call; 2 MiB pages (madvise) reduce the TLB misses of the
// strided row reads (the horizontal directions read rows a whole image row apart).
struct Workspace {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~Workspace() { std::free(ptr); }
  void* get(size_t need) {
    if (need > bytes) {
      constexpr size_t kHuge = size_t(2) << 20;
      std::free(ptr);
      bytes = (need + kHuge - 1) / kHuge * kHuge;
      ptr = std::aligned_alloc(kHuge, bytes);
      TORCH_CHECK(ptr, "out of memory allocating the LSTM2D workspace");
      madvise(ptr, bytes, MADV_HUGEPAGE);
    }
    return ptr;
  }
};

at::Tensor workspace_tensor(at::IntArrayRef shape, const at::TensorOptions& opt) {
  thread_local Workspace ws;
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return at::from_blob(ws.get(size_t(n) * opt.dtype().itemsize()), shape, opt);
}

// Images per chunk of the forward pass: enough that every thread gets two row blocks of each direction (the
// per-step GEMMs stay efficient), and otherwise as many as fit kChunkBytes of projections (8 MiB: 2 images at
// stage 1 of Sequencer2D-S). Before chunking, the workspace grew with the batch (100 MB at batch 32, kept
// afterwards); measured on 2 AVX2 cores, chunking changes the speed by less than the noise (+-3%).
constexpr int64_t kChunkBytes = int64_t(8) << 20;
int64_t images_per_chunk(int64_t B, int64_t H, int64_t W, int64_t proj_bytes_per_token) {
  const int64_t rows_per_image = std::max<int64_t>(1, std::min(H, W));  // of the direction with the fewest
  const int64_t by_rows = (2 * kRowBlock * at::get_num_threads() + rows_per_image - 1) / rows_per_image;
  const int64_t by_bytes = kChunkBytes / std::max<int64_t>(1, H * W * proj_bytes_per_token);
  return std::max<int64_t>(1, std::min(B, std::max(by_rows, by_bytes)));
}

// ---------------------------------------------------------------------------------------------------------
// Entry points (called from seqvision/ops/fused.py inside torch.library custom ops).

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, int64_t nd, Cell cell) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "x must be a CPU tensor B x H x W x C");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
              "unsupported dtype ", x.scalar_type());
  TORCH_CHECK(w_ih.scalar_type() == x.scalar_type() && w_hh.scalar_type() == x.scalar_type(),
              "weights must have the dtype of x");
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(0) == nd && w_hh.size(1) == kGates[cell] * w_hh.size(2),
              "w_hh: ndir x gates*D x D");
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == nd * w_hh.size(1) && w_ih.size(1) == x.size(3),
              "w_ih: ndir*gates*D x C");
}

// Runs `fn` with the cell as a compile-time constant.
template <typename F>
void dispatch_cell(Cell cell, F&& fn) {
  switch (cell) {
    case kLSTM: return fn(std::integral_constant<int, kLSTM>());
    case kGRU: return fn(std::integral_constant<int, kGRU>());
    default: return fn(std::integral_constant<int, kRNN>());
  }
}

// Runs `fn(std::bool_constant<BR>)` with `br` as a compile-time constant; true only for bf16 (`scalar_t`).
template <typename scalar_t, typename F>
void dispatch_recurrence(bool br, F&& fn) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (br) return fn(std::true_type());
  }
  fn(std::false_type());
}

// Returns (out, gates, cells); gates / cells are empty unless `save` (training); cells only for the LSTM.
// bias_hn: the GRU's b_hn (ndir*D), empty for the other cells. bf16_recurrence: for bf16 x, the recurrent products
// take bf16 operands (fp32 accumulation) instead of fp32 ones; ignored for other dtypes.
std::vector<at::Tensor> rnn2d_forward(const at::Tensor& x_, const at::Tensor& w_ih_, const at::Tensor& bias_,
                                      const at::Tensor& bias_hn_, const at::Tensor& w_hh_, const std::string& cell_name,
                                      int64_t n_v, int64_t n_h, bool save, bool bf16_recurrence) {
  const int64_t nd = n_v + n_h;
  const Cell cell = parse_cell(cell_name);
  check_inputs(x_, w_ih_, w_hh_, nd, cell);
  const auto x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const auto at_acc = acc_type(x.scalar_type());
  const auto bias = bias_.to(at_acc).contiguous(), bias_hn = bias_hn_.to(at_acc).contiguous();
  // The recurrent GEMMs run in the acc type (fp32 for bf16: small, and keeps h and the gates exact), or with
  // bf16 operands prepared once for the whole sequence.
  const bool br = bf16_recurrence && x.scalar_type() == at::kBFloat16;
  const auto w_hh_acc = br ? at::empty({0}, x.options().dtype(at_acc)) : w_hh.to(at_acc).contiguous();
  const std::vector<Bf16Operand> bf16_w = br ? bf16_operands(w_hh, /*transpose=*/true) : std::vector<Bf16Operand>();
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), D = w_hh.size(2);
  TORCH_CHECK(bias.numel() == w_ih.size(0), "bias: ndir*gates*D");
  TORCH_CHECK(bias_hn.numel() == (cell == kGRU ? nd * D : 0), "bias_hn: ndir*D for the GRU, empty otherwise");
  auto out = at::empty({B, H, W, nd * D}, x.options());
  const auto aopt = x.options().dtype(at_acc);
  auto gates = save ? at::empty({B, H, W, nd, kSaved[cell] * D}, aopt) : at::empty({0}, aopt);
  auto cells = save && cell == kLSTM ? at::empty({B, H, W, nd, D}, aopt) : at::empty({0}, aopt);
  // Images are independent: run them in chunks, so the projections of a batch of any size fit one small
  // workspace.
  const int64_t chunk = images_per_chunk(B, H, W, w_ih.size(0) * int64_t(x.element_size()));
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0), tokens = nb * H * W, tok0 = b0 * H * W;
    const Grid g(nb, H, W, n_v, n_h);
    // One GEMM gives every direction's input projection for every token of the chunk.
    auto xproj = workspace_tensor({tokens, w_ih.size(0)}, x.options());
    at::mm_out(xproj, x.narrow(0, b0, nb).view({tokens, C}), w_ih.t());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rnn2d_forward", [&] {
      using acc = typename Elem<scalar_t>::acc;
      dispatch_cell(cell, [&](auto k) {
        constexpr int K = decltype(k)::value;
        const acc* bhn = K == kGRU ? bias_hn.data_ptr<acc>() : nullptr;
        scalar_t* o = out.data_ptr<scalar_t>() + tok0 * nd * D;  // the chunk's rows of every output
        const acc* whh = br ? nullptr : w_hh_acc.data_ptr<acc>();
        dispatch_recurrence<scalar_t>(br, [&](auto r) {
          constexpr bool BR = decltype(r)::value;
          if (save) {
            acc* gs = gates.data_ptr<acc>() + tok0 * nd * kSaved[K] * D;
            acc* cs = K == kLSTM ? cells.data_ptr<acc>() + tok0 * nd * D : nullptr;
            rnn_forward_impl<scalar_t, K, true, BR>(g, D, xproj.data_ptr<scalar_t>(), bias.data_ptr<acc>(), bhn, whh,
                                                    bf16_w, o, gs, cs);
          } else {
            rnn_forward_impl<scalar_t, K, false, BR>(g, D, xproj.data_ptr<scalar_t>(), bias.data_ptr<acc>(), bhn, whh,
                                                     bf16_w, o, nullptr, nullptr);
          }
        });
      });
    });
  }
  return {out, gates, cells};
}

// h_{t-1} of every token and direction (zero at each sequence start), aligned with the tokens.
at::Tensor shifted_hidden(const at::Tensor& out, const Grid& g, int64_t D) {
  auto prev = at::zeros_like(out);
  for (int64_t d = 0; d < int64_t(g.dirs.size()); ++d) {
    const Dir& dir = g.dirs[d];
    const int64_t dim = dir.vertical ? 1 : 2, T = dir.T;
    if (T < 2) continue;
    auto src = out.narrow(3, d * D, D), dst = prev.narrow(3, d * D, D);
    if (dir.reverse) {
      dst.narrow(dim, 0, T - 1).copy_(src.narrow(dim, 1, T - 1));
    } else {
      dst.narrow(dim, 1, T - 1).copy_(src.narrow(dim, 0, T - 1));
    }
  }
  return prev;
}

// Returns (dx, dw_ih, dbias, dbias_hn, dw_hh); dbias_hn is empty except for the GRU. bf16_recurrence: as for
// the forward (the reverse-time products take bf16 operands).
std::vector<at::Tensor> rnn2d_backward(const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& w_ih_,
                                       const at::Tensor& w_hh_, const at::Tensor& out_, const at::Tensor& gates_,
                                       const at::Tensor& cells_, const std::string& cell_name, int64_t n_v,
                                       int64_t n_h, bool bf16_recurrence) {
  const int64_t nd = n_v + n_h;
  const Cell cell = parse_cell(cell_name);
  check_inputs(x_, w_ih_, w_hh_, nd, cell);
  const auto x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const auto out = out_.contiguous(), gates = gates_.contiguous(), cells = cells_.contiguous();
  const auto grad_out = grad_out_.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), D = w_hh.size(2), N = B * H * W;
  const int64_t GD = kGates[cell] * D;
  TORCH_CHECK(gates.numel() == N * nd * kSaved[cell] * D && cells.numel() == (cell == kLSTM ? N * nd * D : 0),
              "forward was run without `save`");
  const Grid g(B, H, W, n_v, n_h);
  auto dpre = at::empty({N, nd * GD}, x.options());
  auto dpre_h = cell == kGRU ? at::empty({N, nd * GD}, x.options()) : dpre;
  const bool br = bf16_recurrence && x.scalar_type() == at::kBFloat16;
  const auto at_acc = acc_type(x.scalar_type());
  const auto w_hh_acc = br ? at::empty({0}, x.options().dtype(at_acc)) : w_hh.to(at_acc).contiguous();
  const std::vector<Bf16Operand> bf16_w = br ? bf16_operands(w_hh, /*transpose=*/false) : std::vector<Bf16Operand>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rnn2d_backward", [&] {
    using acc = typename Elem<scalar_t>::acc;
    dispatch_cell(cell, [&](auto k) {
      constexpr int K = decltype(k)::value;
      dispatch_recurrence<scalar_t>(br, [&](auto r) {
        rnn_backward_impl<scalar_t, K, decltype(r)::value>(
            g, D, grad_out.data_ptr<scalar_t>(), br ? nullptr : w_hh_acc.data_ptr<acc>(), bf16_w,
            gates.data_ptr<acc>(), K == kLSTM ? cells.data_ptr<acc>() : nullptr, dpre.data_ptr<scalar_t>(),
            K == kGRU ? dpre_h.data_ptr<scalar_t>() : nullptr);
      });
    });
  });
  const auto x2 = x.view({N, C});
  auto dx = at::mm(dpre, w_ih).view({B, H, W, C});
  auto dw_ih = at::mm(dpre.t(), x2);
  auto dbias = dpre.sum(0, /*keepdim=*/false, at_acc);
  auto dbias_hn = at::empty({0}, x.options().dtype(at_acc));
  if (cell == kGRU) {  // the n blocks of dpre_h, summed over tokens
    dbias_hn = dpre_h.view({N, nd, 3, D}).select(2, 2).sum(0, /*keepdim=*/false, at_acc).reshape({nd * D});
  }
  const auto hprev = shifted_hidden(out, g, D).view({N, nd * D});
  auto dw_hh = at::empty_like(w_hh);
  for (int64_t d = 0; d < nd; ++d) {
    auto dst = dw_hh[d];
    at::mm_out(dst, dpre_h.narrow(1, d * GD, GD).t(), hprev.narrow(1, d * D, D));
  }
  return {dx, dw_ih, dbias, dbias_hn, dw_hh};
}

bool has_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// How bf16 recurrent products run on this CPU: "amx" (oneDNN's packed ukernel on the AMX tiles) or "gemm"
// (ATen's bf16 GEMM: oneDNN's AVX-512 kernels, or ATen's portable loop).
std::string bf16_recurrence_kernel() { return Bf16Operand::packs_for_amx() ? "amx" : "gemm"; }

// Threads a parallel region of this build runs on. at::parallel_for expands an `omp parallel` pragma inside this
// file, so a build without -fopenmp runs every region on the calling thread alone, silently (until this check
// existed, the recurrences did: 1.2-1.5x slower mixers on 2 cores).
int64_t parallel_threads() {
  std::mutex lock;
  std::set<std::thread::id> seen;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const std::lock_guard<std::mutex> guard(lock);
    seen.insert(std::this_thread::get_id());
  });
  return int64_t(seen.size());
}

}  // namespace

// Registered as torch.ops.<extension name>.*: the name carries a hash of the CPU flags and torch version, so
// two builds loaded into one process do not collide. (The indirection expands the macro before TORCH_LIBRARY
// pastes it into identifiers.)
#define SEQVISION_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
SEQVISION_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("rnn2d_forward", &rnn2d_forward);
  m.def("rnn2d_backward", &rnn2d_backward);
  m.def("has_blas", &has_blas);
  m.def("bf16_recurrence_kernel", &bf16_recurrence_kernel);
  m.def("parallel_threads", &parallel_threads);
  m.def("images_per_chunk", &images_per_chunk);
}
