// Compressed-domain kernels of rpq_fx (CPU): a linear layer computed from codebooks and codes
// without ever building the dense weight.
//
//   W[n, c*d:(c+1)*d] = codebooks[g(c), codes[c, n]]          (g(c) = c, or 0 when shared)
//   forward:  T[c, k, b] = codebooks[g(c), k] . x[b, c*d:(c+1)*d]   (a bmm, B*K*in MACs)
//             y[b, n]    = sum_c T[c, codes[c, n], b]              (a gather, B*C*N adds)
//   backward: S[c, k, b] = sum_{n: codes[c, n] = k} grad[b, n]      (a scatter, B*C*N adds)
//             grad_x[b, c*d:(c+1)*d] = sum_k S[c, k, b] codebooks[g(c), k]
//             grad_codebooks[g(c), k] += sum_b S[c, k, b] x[b, c*d:(c+1)*d]
//
// The batch is cut into blocks of BB columns, and the forward's work into tasks (a batch block and a band of rows)
// that the threads of an at::parallel_for region claim one at a time (the one- and two-row lookup-table path shares
// its work by split_phases instead). A task builds its block's table T[c, :, b0:b0+BB]
// a block of slices at a time (kTableBlockBytes, so it stays in L2: the whole table of d = 4, K = 256, BB = 32 is
// 32 MiB) from x read in place (short slices: transposed a block at a time, held in registers for d = 1, 2, 4, 8) and
// adds every row of its band from it, keeping per-row partial sums; each row's sum still runs over c in order, and
// the bias is added as each output is written. Each row the gather adds is BB contiguous values (one or two vector
// registers), several rows at a time to hide the adds' latency; one-row batches use AVX-512 permutes (K <= 32) or
// gathers. Codes are read as they are stored (uint8, or int16 read as uint16): no index tensor is built. The
// backward's scatter is not blocked yet.
//
// These are the CPU kernels of the rpq_fx ops, registered with the dispatcher (TORCH_LIBRARY_IMPL at
// the end): rpq_fx/ops/library.py defines the schemas, and torch.ops.rpq_fx.* reaches these for CPU
// tensors without Python in between. rpq_fx/_kernels.py builds and loads them; without them the ops
// run the same arithmetic with stock torch ops (rpq_fx/ops/stock.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <pthread.h>
#include <sched.h>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // also for the VBMI kernel, compiled for that target whatever the build's flags
#endif

namespace {

using at::Tensor;

// The largest of n codes read as stored (uint8, or int16 as uint16); a vectorised pass over C*N bytes.
template <typename code_t>
int64_t largest_code(const code_t* __restrict codes, int64_t n) {
  code_t largest = 0;
#pragma omp simd reduction(max : largest)
  for (int64_t i = 0; i < n; ++i) largest = codes[i] > largest ? codes[i] : largest;
  return largest;
}

// Codes (contiguous) must be uint8 / int16 and all below num_codes: no kernel may index past its
// own codebook (issue 19). Raises IndexError naming `what`, like rpq_fx.ops.check_codes.
void check_codes(const Tensor& codes, int64_t num_codes, const char* what) {
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte || codes.scalar_type() == at::kShort, what,
                   ": codes must be uint8 or int16, got ", codes.scalar_type());
  TORCH_CHECK(codes.is_contiguous(), what, ": codes must be contiguous here");
  const bool wide = codes.scalar_type() == at::kShort;
  if (num_codes >= (wide ? 65536 : 256) || codes.numel() == 0) return;
  const int64_t largest = wide ? largest_code(reinterpret_cast<const uint16_t*>(codes.data_ptr()), codes.numel())
                               : largest_code(codes.data_ptr<uint8_t>(), codes.numel());
  TORCH_CHECK_INDEX(largest < num_codes, what, ": code ", largest, " is out of range for ", num_codes,
                    " codewords (codes must be < ", num_codes, ")");
}

// Every tensor a kernel reads through a raw pointer must be a CPU tensor with storage (not meta).
void check_cpu(const Tensor& t, const char* name, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": the C++ kernels run on the CPU, ", name, " is on ", t.device());
}

// codebooks [G, K, d] with G == 1 (shared) or G == C: the kernels index codebook c * K for slice c.
void check_groups(int64_t groups, int64_t C, const char* what) {
  TORCH_CHECK(groups == 1 || groups == C, what, ": ", groups, " codebooks for ", C, " slices (want ", C, " or 1)");
}

// A block of a whole number of cache lines; rows of fewer values for small batches.
template <int BB>
constexpr int64_t rows_per_tile() { return BB >= 16 ? 64 : 1024 / BB; }

// The forward's table is built and consumed a block of slices at a time, each block at most this many bytes, so
// that it stays in a core's L2 cache while every row of the task adds from it (1 MiB L2 per core on the 2-core
// AVX-512 machine the constants were timed on). A whole [C, K, BB] table at d = 4, K = 256, BB = 32 is 32 MiB.
constexpr int64_t kTableBlockBytes = 256 * 1024;

// How many vectors of at most 64 bytes hold BB values of A.
template <typename A, int BB>
constexpr int vector_parts() { return BB * static_cast<int>(sizeof(A)) <= 64 ? 1 : BB * static_cast<int>(sizeof(A)) / 64; }

// gather_rows for R consecutive rows (table and sums of one type A, BB >= 2).
// reason: GCC left the `omp simd` form of this loop scalar, and kept a vector type wider than a register on the
// stack; explicit vectors of at most 64 bytes stay in registers
template <typename A, typename code_t, int BB, int R>
inline void gather_row_group(const A* __restrict table, int64_t K, const code_t* __restrict codes, int64_t N,
                             int64_t cb, A* __restrict partial, bool first) {
  constexpr int P = vector_parts<A, BB>(), W = BB / P;
  typedef A vec_t __attribute__((vector_size(sizeof(A) * W)));
  vec_t acc[R][P];
#pragma GCC unroll 16
  for (int q = 0; q < R * P; ++q) {
    acc[q / P][q % P] = vec_t{};
    if (!first) std::memcpy(&acc[q / P][q % P], partial + q * W, sizeof(vec_t));
  }
  for (int64_t c = 0; c < cb; ++c) {
    const A* tc = table + c * K * BB;
    const code_t* cc = codes + c * N;
#pragma GCC unroll 16
    for (int q = 0; q < R * P; ++q) {
      vec_t v;
      std::memcpy(&v, tc + static_cast<int64_t>(cc[q / P]) * BB + (q % P) * W, sizeof(vec_t));
      acc[q / P][q % P] += v;
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < R * P; ++q) std::memcpy(partial + q * W, &acc[q / P][q % P], sizeof(vec_t));
}

// partial[i, :] (+)= sum_{c < cb} table[c, codes[c * N + i], :] for i < nn, summed in A over c ascending (from zero
// when `first`): table [cb, K, BB], partial [nn, BB].
template <typename A, typename code_t, int BB>
void gather_rows(const A* __restrict table, int64_t K, const code_t* __restrict codes, int64_t N, int64_t cb,
                 int64_t nn, A* __restrict partial, bool first) {
  if constexpr (BB == 1) {
    if (first) std::fill(partial, partial + nn, A(0));
    for (int64_t c = 0; c < cb; ++c) {
      const A* __restrict tc = table + c * K;
      const code_t* __restrict cc = codes + c * N;
#pragma omp simd
      for (int64_t i = 0; i < nn; ++i) partial[i] += tc[cc[i]];
    }
  } else {
    // R rows at a time, each row's BB sums in P vectors held in registers while the block's slices are added in:
    // R * P independent chains of adds, so the adds' latency is hidden (one row alone waited on it: 4x slower)
    constexpr int P = vector_parts<A, BB>(), R = std::max(1, 8 / P);
    int64_t i = 0;
    for (; i + R <= nn; i += R) gather_row_group<A, code_t, BB, R>(table, K, codes + i, N, cb, partial + i * BB, first);
    for (; i < nn; ++i) gather_row_group<A, code_t, BB, 1>(table, K, codes + i, N, cb, partial + i * BB, first);
  }
}

#if defined(__AVX512F__)
// One batch row, float32 table, uint8 codes: 16 rows per instruction, 64 rows' sums in registers across the block's
// slices. K <= 16: the slice's table is one register and each lookup a permute (vpermps); K <= 32: two registers
// (vpermt2ps); larger K: a gather (vgatherdps). The same sums in the same order as gather_rows. The table buffer
// must hold 32 readable floats past its last slice (the permutes load whole registers).
template <>
void gather_rows<float, uint8_t, 1>(const float* __restrict table, int64_t K, const uint8_t* __restrict codes,
                                   int64_t N, int64_t cb, int64_t nn, float* __restrict partial, bool first) {
  auto lookup = [&](int64_t c, const uint8_t* cc) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cc)));
    const float* tc = table + c * K;
    if (K <= 16) return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(tc));
    if (K <= 32) return _mm512_permutex2var_ps(_mm512_loadu_ps(tc), idx, _mm512_loadu_ps(tc + 16));
    return _mm512_i32gather_ps(idx, tc, 4);
  };
  int64_t i = 0;
  for (; i + 64 <= nn; i += 64) {
    __m512 a0 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + i);
    __m512 a1 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + i + 16);
    __m512 a2 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + i + 32);
    __m512 a3 = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + i + 48);
    for (int64_t c = 0; c < cb; ++c) {
      const uint8_t* cc = codes + c * N + i;
      a0 = _mm512_add_ps(a0, lookup(c, cc));
      a1 = _mm512_add_ps(a1, lookup(c, cc + 16));
      a2 = _mm512_add_ps(a2, lookup(c, cc + 32));
      a3 = _mm512_add_ps(a3, lookup(c, cc + 48));
    }
    _mm512_storeu_ps(partial + i, a0);
    _mm512_storeu_ps(partial + i + 16, a1);
    _mm512_storeu_ps(partial + i + 32, a2);
    _mm512_storeu_ps(partial + i + 48, a3);
  }
  for (; i + 16 <= nn; i += 16) {
    __m512 a = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + i);
    for (int64_t c = 0; c < cb; ++c) a = _mm512_add_ps(a, lookup(c, codes + c * N + i));
    _mm512_storeu_ps(partial + i, a);
  }
  for (; i < nn; ++i) {
    float acc = first ? 0.0f : partial[i];
    for (int64_t c = 0; c < cb; ++c) acc += table[c * K + codes[c * N + i]];
    partial[i] = acc;
  }
}
#endif

// acc[k, :] = sum_t cbc[k, t] * xc[t, :] for k < K (BB columns, t ascending from t = 0), xc [D, BB] held in registers:
// per codeword D broadcasts and D * P multiply-adds, no load of x. The same sums in the same order as table_block's
// loop for any d.
template <typename A, int BB, int D>
inline void table_rows(A* __restrict acc, const A* __restrict xc, const A* __restrict cbc, int64_t K) {
  constexpr int P = vector_parts<A, BB>(), W = BB / P;
  typedef A vec_t __attribute__((vector_size(sizeof(A) * W)));
  vec_t xv[D][P];
#pragma GCC unroll 16
  for (int q = 0; q < D * P; ++q) std::memcpy(&xv[q / P][q % P], xc + (q / P) * BB + (q % P) * W, sizeof(vec_t));
  for (int64_t k = 0; k < K; ++k) {
    const A* __restrict w = cbc + k * D;
    vec_t a[P];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) a[p] = w[0] * xv[0][p];
#pragma GCC unroll 8
    for (int t = 1; t < D; ++t) {
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) a[p] += w[t] * xv[t][p];
    }
    std::memcpy(acc + k * BB, a, sizeof(a));
  }
}

// The table of slices [c0, c0 + cb) for one batch block, [cb, K, BB] in A, into `table`:
//   table[c - c0, k, j] = codebooks[g(c), k] . x[j, c*d:(c+1)*d]        (x's columns past the batch: zero)
// xt: the block's slices [c0, c0 + cb) of x as [cb, d, BB] in A (transpose_block). Short slices (d < 16) are summed here in A over the slice, ascending; long
// ones by ATen's bmm in the products' dtype T (cbe: the codebooks [C, K, d], xb: the block as [C, d, BB]), widened to A.
// cbt: the codebooks transposed, [1, d, K] in A (shared codebooks, BB == 1 only: the sums then run along K).
template <typename A, typename T, int BB>
void table_block(A* __restrict table, const Tensor& cbe, const Tensor& xb, const A* __restrict xt,
                 const A* __restrict cbt, const A* __restrict cba, bool shared, int64_t K, int64_t d, int64_t c0,
                 int64_t cb) {
  if (d >= 16) {
    // reason: the gather's vector loops read tables in A; a bfloat16 bmm's result is widened (exactly) once
    Tensor dst = at::from_blob(table, {cb, K, BB}, xb.options().dtype(c10::CppTypeToScalarType<A>::value));
    Tensor out = std::is_same_v<A, T> ? dst : at::empty({cb, K, BB}, xb.options());
    if constexpr (BB == 1) {
      // [cb, 1, d] @ [cb, d, K] is the same memory as [cb, K, 1], and reads the codebooks row by row
      Tensor rows = out.view({cb, 1, K});
      at::bmm_out(rows, xb.narrow(0, c0, cb).transpose(1, 2), cbe.narrow(0, c0, cb).transpose(1, 2));
    } else {
      at::bmm_out(out, cbe.narrow(0, c0, cb), xb.narrow(0, c0, cb));
    }
    if (!std::is_same_v<A, T>) dst.copy_(out);
    return;
  }
  for (int64_t c = c0; c < c0 + cb; ++c) {
    A* __restrict acc = table + (c - c0) * K * BB;
    const A* __restrict xc = xt + (c - c0) * d * BB;
    if (BB == 1 && cbt != nullptr) {
      // shared codebooks, one batch row: along K, one slice element at a time
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) acc[k] = cbt[k] * xc[0];
      for (int64_t t = 1; t < d; ++t) {
        const A v = xc[t];
        const A* __restrict row = cbt + t * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) acc[k] += row[k] * v;
      }
    } else {
      const A* __restrict cbc = cba + (shared ? 0 : c * K * d);
      if constexpr (BB >= 2) {
        switch (d) {  // reason: a compile-time d holds the block's x in registers across the K codewords
          case 1: table_rows<A, BB, 1>(acc, xc, cbc, K); continue;
          case 2: table_rows<A, BB, 2>(acc, xc, cbc, K); continue;
          case 4: table_rows<A, BB, 4>(acc, xc, cbc, K); continue;
          case 8: table_rows<A, BB, 8>(acc, xc, cbc, K); continue;
          default: break;
        }
        // reason: as in gather_row_group, GCC left the `omp simd` form scalar; explicit vectors
        constexpr int P = vector_parts<A, BB>(), W = BB / P;
        typedef A vec_t __attribute__((vector_size(sizeof(A) * W)));
        for (int64_t k = 0; k < K; ++k) {
          const A* __restrict w = cbc + k * d;
          vec_t a[P];
#pragma GCC unroll 4
          for (int p = 0; p < P; ++p) {
            vec_t v;
            std::memcpy(&v, xc + p * W, sizeof(vec_t));
            a[p] = w[0] * v;
          }
          for (int64_t t = 1; t < d; ++t) {
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p) {
              vec_t v;
              std::memcpy(&v, xc + t * BB + p * W, sizeof(vec_t));
              a[p] += w[t] * v;
            }
          }
          std::memcpy(acc + k * BB, a, sizeof(a));
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const A* __restrict w = cbc + k * d;
          A a = w[0] * xc[0];
          for (int64_t t = 1; t < d; ++t) a += w[t] * xc[t];
          acc[k] = a;
        }
      }
    }
  }
}

// S[c, codes[c, n], j] += grad[j, n] for every n, c in [c_begin, c_end), j < bw (grad stored as G, summed in T).
// grad: row j at grad + j * ldg; S: row (c, k) at S + (c * K + k) * lds, BB values.
template <typename T, typename G, typename code_t, int BB>
void scatter_block(const G* __restrict grad, int64_t ldg, int64_t bw, const code_t* __restrict codes, int64_t N,
                   int64_t K, int64_t c_begin, int64_t c_end, T* __restrict S, int64_t lds) {
  constexpr int64_t NB = rows_per_tile<BB>();
  alignas(64) T tile[NB][BB];
  for (int64_t s = 0; s < N; s += NB) {
    const int64_t nn = std::min(NB, N - s);
    for (int64_t j = 0; j < BB; ++j) {
      if (j < bw) {
        const G* __restrict g = grad + j * ldg + s;
        for (int64_t i = 0; i < nn; ++i) tile[i][j] = static_cast<T>(g[i]);
      } else {
        for (int64_t i = 0; i < nn; ++i) tile[i][j] = T(0);
      }
    }
    for (int64_t c = c_begin; c < c_end; ++c) {
      T* __restrict sc = S + c * K * lds;
      const code_t* __restrict cc = codes + c * N + s;
      for (int64_t i = 0; i < nn; ++i) {
        T* __restrict row = sc + static_cast<int64_t>(cc[i]) * lds;
#pragma omp simd
        for (int64_t j = 0; j < BB; ++j) row[j] += tile[i][j];
      }
    }
  }
}

// ------------------------------------------------------------------ work shared with helpers that may never start
// The calling thread and up to threads - 1 helpers claim small tasks from shared atomic counters, a few phases one
// after another (a phase starts once every task of the one before is done). The helpers are torch's intra-op team
// (at::parallel_for) while it joins in time, else tasks launched on ATen's inter-op pool (at::launch; see use_team).
// reason: at::parallel_for's join waits for every thread of its region to ARRIVE, and on a busy machine a
// descheduled worker turned 0.5 ms calls into 37-48 ms. With launched helpers the caller never waits for a thread
// that has not started: it claims tasks until a phase's counter runs out, then waits only for the tasks already
// claimed (each small, run by a thread that is running). A helper that starts late joins the phase under way; one
// that starts after the call returned finds every counter spent and leaves without touching the call's data (the
// state it reads is shared-owned; the call's work function is reached only through a successful claim, which the
// call waits for).
struct SplitPhase {
  std::atomic<int64_t> next{0}, done{0};
  int64_t tasks = 0;
};

struct SplitState {
  static constexpr int kMaxPhases = 3;
  std::array<SplitPhase, kMaxPhases> phases;
  int count = 0;
  void (*run)(void*, int, int64_t) = nullptr;  // run(context, phase, task)
  void* context = nullptr;  // the caller's work function: valid while a claim can succeed
  std::mutex error_lock;
  std::exception_ptr error;  // the first exception a task threw, rethrown by the caller
  std::atomic<int> caller_cpu{-1};  // the CPU the caller last claimed a task on
};

// Test hooks (rpq_fx::_lut_split_hooks, tests only): the least estimated work (ns) that is shared out, a delay before
// each helper starts and one before the caller starts (us), and how many tasks helpers have run (so a test can see
// the split happen, or not).
std::atomic<int64_t> g_split_min_ns{-1};  // -1: kSplitMinNs
// Calls estimated below this (ns) run on the calling thread (split_phases' users): waking a helper (at::launch) and handing it work cost
// about as much as it saves there (measured, one thread / split, d = 4 shared: estimated 42 us, 35 / 41 us; 66 us,
// 53 / 48 us; 104 us, 73 / 60 us; 204 us, 148 / 104 us).
constexpr int64_t kSplitMinNs = 60000;
std::atomic<int64_t> g_helper_delay_us{0}, g_caller_delay_us{0};
std::atomic<int64_t> g_helper_tasks{0};

// reason: in a process forked from one whose inter-op pool had started, at::launch blocked for ever (the pool's
// threads do not exist in the child; its condition variable was copied mid-use): forked children never launch
// helpers (DataLoader workers run one thread anyway)
std::atomic<bool> g_forked{false};
[[maybe_unused]] const int g_fork_hook = pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });

// The CPU this thread runs on (-1 where unknown).
inline int current_cpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Waits until every task of `phase` is done; only tasks already claimed can be outstanding.
void wait_done(const SplitPhase& phase) {
  // reason: spin briefly (a task is tens of microseconds), then yield: on a busy machine the thread finishing the
  // task may need this core
  for (int spins = 0; phase.done.load(std::memory_order_acquire) < phase.tasks; ++spins) {
    if (spins < 4096) cpu_relax();
    else std::this_thread::yield();
  }
}

// Whether this thread runs on the CPU the caller last claimed a task on (then the caller is not running: a helper
// there leaves, handing the CPU back; see participate_elsewhere).
bool on_the_callers_cpu(const SplitState& s) {
  const int cpu = current_cpu();
  return cpu >= 0 && cpu == s.caller_cpu.load(std::memory_order_relaxed);
}

void participate(SplitState& s, bool helper) {
  for (int p = 0; p < s.count; ++p) {
    SplitPhase& phase = s.phases[p];
    if (helper && on_the_callers_cpu(s)) return;
    if (p > 0) wait_done(s.phases[p - 1]);
    while (true) {
      if (helper && on_the_callers_cpu(s)) return;
      if (!helper) s.caller_cpu.store(current_cpu(), std::memory_order_relaxed);
      const int64_t t = phase.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= phase.tasks) break;
      try {
        s.run(s.context, p, t);
      } catch (...) {
        std::lock_guard<std::mutex> guard(s.error_lock);
        if (!s.error) s.error = std::current_exception();
      }
      if (helper) g_helper_tasks.fetch_add(1, std::memory_order_relaxed);
      phase.done.fetch_add(1, std::memory_order_release);
    }
  }
}

// A helper's share, run off the caller's CPU. reason: the scheduler often woke the helper on the caller's CPU (the
// other one busy, e.g. with OpenMP's idle worker, which spins for milliseconds after ATen's last parallel region); it
// then preempted the caller and ran every task itself (d = 2, batch 1 in benchmarks/linear.py: 2.1 ms, one thread
// alone 1.6 ms). Such a helper moves itself to the other CPUs this thread may use (its affinity, restored after), where
// it runs beside the caller; if it still finds itself on the caller's CPU it leaves before each claim (participate).
void participate_elsewhere(SplitState& s) {
#if defined(__linux__)
  const int caller = s.caller_cpu.load(std::memory_order_relaxed);
  cpu_set_t allowed, others;
  bool moved = false;
  if (caller >= 0 && caller < CPU_SETSIZE && current_cpu() == caller &&
      sched_getaffinity(0, sizeof(allowed), &allowed) == 0 && CPU_ISSET(caller, &allowed) && CPU_COUNT(&allowed) > 1) {
    others = allowed;
    CPU_CLR(caller, &others);
    moved = sched_setaffinity(0, sizeof(others), &others) == 0;
  }
  participate(s, true);
  if (moved) sched_setaffinity(0, sizeof(allowed), &allowed);
#else
  participate(s, true);
#endif
}

// Sleeps for a test hook's delay (us), if one is set.
void hold(const std::atomic<int64_t>& delay_us) {
  const int64_t us = delay_us.load(std::memory_order_relaxed);
  if (us > 0) std::this_thread::sleep_for(std::chrono::microseconds(us));
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Who helps the caller: torch's intra-op team (at::parallel_for) or helpers launched on the inter-op pool. reason: on
// a quiet machine the team is the faster: after any ATen parallel op its OpenMP worker spins on the other core for
// milliseconds (OMP_WAIT_POLICY unset), where a launched helper had to share that core with it (OPT-66b decode: 0.29
// s a token with launched helpers, 0.19-0.21 s with the team). But the team's join waits for every worker to arrive, and a
// worker descheduled by another process costs the caller milliseconds a call; so a call whose join waited longer
// than kTeamLateNs sends the next calls to launched helpers (which the caller never waits for) for a back-off that
// doubles while the team stays late (kTeamBackoffNs up to 32 times that) and is reset by a timely join. A late join
// cost 7-8 ms a call beside another CPU-bound process (a worker left spinning is preempted, and waits its turn), so
// the back-off is long enough that probing the team costs under 1% of a busy machine's time.
constexpr int64_t kTeamLateNs = 200000, kTeamBackoffNs = 100000000;
std::atomic<int> g_split_mode{-1};  // test hook: -1 chosen as above, 0 launched helpers, 1 the team
std::atomic<int64_t> g_team_after{0}, g_team_backoff{kTeamBackoffNs};

bool use_team() {
  const int mode = g_split_mode.load(std::memory_order_relaxed);
  if (mode >= 0) return mode == 1;
  return now_ns() >= g_team_after.load(std::memory_order_relaxed);
}

// Records how long a team call's caller waited at the join after its own last task.
void team_joined(int64_t waited_ns) {
  if (waited_ns <= kTeamLateNs) {
    g_team_backoff.store(kTeamBackoffNs, std::memory_order_relaxed);
    return;
  }
  const int64_t backoff = g_team_backoff.load(std::memory_order_relaxed);
  g_team_after.store(now_ns() + backoff, std::memory_order_relaxed);
  g_team_backoff.store(std::min(backoff * 2, 32 * kTeamBackoffNs), std::memory_order_relaxed);
}

// f(phase, t) for every t < tasks[phase], phase by phase; shared with helpers when `split` and torch has more than
// one thread, else all on this thread. Every result is computed by exactly one task, so who runs it changes no bit.
template <size_t N, typename F>
void split_phases(const std::array<int64_t, N>& tasks, bool split, F&& f) {
  static_assert(N <= SplitState::kMaxPhases);
  const int64_t most = *std::max_element(tasks.begin(), tasks.end());
  const int64_t helpers =
      split && !g_forked.load(std::memory_order_relaxed) ? std::min<int64_t>(at::get_num_threads() - 1, most - 1) : 0;
  if (helpers <= 0) {
    for (size_t p = 0; p < N; ++p)
      for (int64_t t = 0; t < tasks[p]; ++t) f(static_cast<int>(p), t);
    return;
  }
  auto state = std::make_shared<SplitState>();
  state->count = static_cast<int>(N);
  for (size_t p = 0; p < N; ++p) state->phases[p].tasks = tasks[p];
  using Fn = std::remove_reference_t<F>;
  state->run = [](void* context, int p, int64_t t) { (*static_cast<Fn*>(context))(p, t); };
  state->context = const_cast<void*>(static_cast<const void*>(&f));
  const bool held_back = g_caller_delay_us.load(std::memory_order_relaxed) > 0;
  state->caller_cpu.store(held_back ? -1 : current_cpu(), std::memory_order_relaxed);  // -1: held back (test hook)
  if (use_team()) {
    int64_t caller_done = 0;  // read after the region's join
    at::parallel_for(0, helpers + 1, 1, [&](int64_t begin, int64_t end) {
      const bool helper = at::get_thread_num() != 0;  // run inline (inside another parallel region): thread 0
      hold(helper ? g_helper_delay_us : g_caller_delay_us);
      for (int64_t i = begin; i < end; ++i) participate(*state, helper);
      if (!helper) caller_done = now_ns();
    });
    team_joined(now_ns() - caller_done);
    if (state->error) std::rethrow_exception(state->error);
    return;
  }
  for (int64_t h = 0; h < helpers; ++h) {
    at::launch([state] {
      hold(g_helper_delay_us);
      participate_elsewhere(*state);
    });
  }
  hold(g_caller_delay_us);
  participate(*state, false);
  wait_done(state->phases[N - 1]);
  if (state->error) std::rethrow_exception(state->error);
}

// The slices [c0, c0 + cb) of one batch block of x (rows b0 .. b0 + bw of x [B, in], stored as S) as [cb, d, BB] in
// A, zero past the batch: what table_block reads for short slices. reason: built per task, in cache, from x in place;
// a copy of the whole x in this layout (and its zero padding) was a separate parallel op of its own on every call
template <typename A, typename S, int BB>
void transpose_block(const S* __restrict x, int64_t in, int64_t b0, int64_t bw, int64_t c0, int64_t cb, int64_t d,
                     A* __restrict xt) {
  const int64_t len = cb * d;
  for (int64_t j = 0; j < BB; ++j) {
    if (j < bw) {
      const S* __restrict row = x + (b0 + j) * in + c0 * d;
      for (int64_t e = 0; e < len; ++e) xt[e * BB + j] = static_cast<A>(row[e]);
    } else {
      for (int64_t e = 0; e < len; ++e) xt[e * BB + j] = A(0);
    }
  }
}

// y = x W^T (+ bias_p, where not null) for the rows of one dtype combination: x stored as O; for long slices (d >= 16)
// xp and cbe (x and the codebooks [C, K, d], shared ones expanded) stored as T (the products' dtype; ATen's bmm sums
// bfloat16 in float32); the tables kept in A, each output summed in A over the slices in order and stored as O. The work is cut into tasks (a batch block and a band of rows) that the threads
// claim one at a time, so that a thread slowed by a busy machine takes fewer; each task builds its block's table a
// block of slices at a time (kTableBlockBytes) and adds every row of its band from it while it is in cache.
template <typename A, typename T, typename O, typename code_t, int BB>
Tensor forward_impl(const Tensor& x, const Tensor& xp, const Tensor& cbe, const Tensor& codebooks, const Tensor& codes,
                    const O* bias_p, Tensor out) {
  const int64_t B = x.size(0), C = codes.size(0), N = codes.size(1), K = codebooks.size(1), d = codebooks.size(2);
  const bool shared = codebooks.size(0) == 1;
  const int64_t nbb = (B + BB - 1) / BB;
  const int64_t threads = at::get_num_threads();
  const at::ScalarType acc_type = c10::CppTypeToScalarType<A>::value;
  Tensor xblocks, cba, cbt;
  if (d >= 16) {
    // ATen's bmm builds the tables from x's batch blocks as [nbb, C, d, BB] in T, zero past the batch
    const Tensor xpad = B == nbb * BB ? xp : at::constant_pad_nd(xp, {0, 0, 0, nbb * BB - B});
    xblocks = xpad.view({nbb, BB, C, d}).permute({0, 2, 3, 1}).contiguous();
  } else {
    // short slices: summed here from x read in place (transpose_block), in A
    cba = codebooks.to(acc_type).contiguous();
    if (BB == 1 && shared) cbt = cba.transpose(1, 2).contiguous();
  }
  const int64_t slices = std::clamp<int64_t>(kTableBlockBytes / (K * BB * static_cast<int64_t>(sizeof(A))), 1, C);
  // bands: two tasks per thread where the batch blocks are fewer, but never so short that building the task's table
  // (K * d multiply-adds per slice and column) costs much beside its gather (band adds per slice and column), nor so
  // long that its partial sums leave the L2 cache
  const int64_t shortest = std::max<int64_t>(64, BB == 1 ? K * d / 8 : K * d);
  int64_t bands = std::clamp<int64_t>((2 * threads + nbb - 1) / nbb, 1, std::max<int64_t>(1, N / shortest));
  bands = std::max<int64_t>(bands, (N * BB * static_cast<int64_t>(sizeof(A)) + (512 << 10) - 1) / (512 << 10));
  const int64_t band = ((N + bands - 1) / bands + 15) / 16 * 16;
  bands = (N + band - 1) / band;
  const int64_t tasks = nbb * bands;
  const code_t* codes_p = reinterpret_cast<const code_t*>(codes.data_ptr());
  const O* x_p = x.data_ptr<O>();
  const A* cba_p = cba.defined() ? cba.data_ptr<A>() : nullptr;
  const A* cbt_p = cbt.defined() ? cbt.data_ptr<A>() : nullptr;
  O* out_p = out.data_ptr<O>();
  const int64_t table_size = (slices * K + 32) * BB;  // 32 readable values past the end (the AVX-512 permutes)
  // one task: its block's table a block of slices at a time, every row of its band summed from it, written out
  auto run = [&](int64_t t, A* table, A* partial, A* xt) {
    const int64_t bb = t / bands, n0 = (t % bands) * band, nn = std::min(band, N - n0);
    const int64_t b0 = bb * BB, bw = std::min<int64_t>(BB, B - b0);
    const Tensor xb = d >= 16 ? xblocks[bb] : Tensor();
    for (int64_t c0 = 0; c0 < C; c0 += slices) {
      const int64_t cb = std::min(slices, C - c0);
      if (d < 16) transpose_block<A, O, BB>(x_p, C * d, b0, bw, c0, cb, d, xt);
      table_block<A, T, BB>(table, cbe, xb, xt, cbt_p, cba_p, shared, K, d, c0, cb);
      gather_rows<A, code_t, BB>(table, K, codes_p + c0 * N + n0, N, cb, nn, partial, c0 == 0);
    }
    // each output rounded to O, then the bias added as out.add_(bias) would (in A, rounded to O once more)
    for (int64_t j = 0; j < bw; ++j) {
      O* __restrict o = out_p + (b0 + j) * N + n0;
      if (bias_p != nullptr) {
        const O* __restrict bias_n = bias_p + n0;
        for (int64_t i = 0; i < nn; ++i)
          o[i] = static_cast<O>(static_cast<A>(static_cast<O>(partial[i * BB + j])) + static_cast<A>(bias_n[i]));
      } else {
        for (int64_t i = 0; i < nn; ++i) o[i] = static_cast<O>(partial[i * BB + j]);
      }
    }
  };
  // reason: at::parallel_for, not split_phases: inside a model the OpenMP worker is still spinning from the ATen op
  // before (layer norm, GELU, attention) and takes its task at once, where a helper woken from the inter-op pool
  // came late and fought that worker for the second core (all-MiniLM-L6-v2, 2 threads, benchmarks/model_speed.py
  // --quick --models minilm, two runs each: batch 1 1.26-1.33x dense with split_phases, 0.74-0.97x with this; batch
  // 32 1.03-1.05x against 0.84-0.92x); and d >= 16's tasks call ATen's bmm, which must run inside the region.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    at::NoGradGuard no_grad;  // reason: grad mode is per thread; worker threads start with it on
    // reason: reused by the thread's next call (a fresh 256 KiB table costs page faults); each thread its own, one
    // instance per template instantiation
    thread_local std::vector<A> table, partial, xt;
    if (table.size() < static_cast<size_t>(table_size)) table.resize(table_size);
    if (partial.size() < static_cast<size_t>(band * BB)) partial.resize(band * BB);
    if (d < 16 && xt.size() < static_cast<size_t>(slices * d * BB)) xt.resize(slices * d * BB);
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) run(t, table.data(), partial.data(), xt.data());
  });
  return out;
}

// grad stored as G; the scatter S summed in T, then cast to x's dtype for ATen's bmms against x and cbe (which
// sum in float32 for bfloat16).
template <typename T, typename G, typename code_t, int BB>
std::tuple<Tensor, Tensor> backward_impl(const Tensor& grad, const Tensor& x, const Tensor& cbe, const Tensor& codes,
                                         int64_t groups, bool need_x, bool need_cb, Tensor grad_x) {
  const int64_t B = grad.size(0), C = codes.size(0), N = codes.size(1), K = cbe.size(1), d = cbe.size(2);
  const int64_t nbb = (B + BB - 1) / BB;
  const int64_t threads = at::get_num_threads();
  // S as [C, K, ld], ld >= B padded so that rows never sit a large power of two apart (cache sets)
  int64_t ld = nbb * BB;
  if (ld >= 64 && (ld * static_cast<int64_t>(sizeof(T))) % 512 == 0) ld += 16;
  Tensor S = at::zeros({C, K, ld}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
  const code_t* codes_p = reinterpret_cast<const code_t*>(codes.data_ptr());
  const G* grad_p = grad.data_ptr<G>();
  T* S_p = S.data_ptr<T>();
  const int64_t c_chunks = std::min<int64_t>(C, std::max<int64_t>(1, (2 * threads + nbb - 1) / nbb));
  const int64_t c_step = (C + c_chunks - 1) / c_chunks;
  at::parallel_for(0, nbb * c_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bb = t / c_chunks, c0 = (t % c_chunks) * c_step;
      const int64_t b0 = bb * BB, bw = std::min<int64_t>(BB, B - b0);
      if (c0 < C)
        scatter_block<T, G, code_t, BB>(grad_p + b0 * N, N, bw, codes_p, N, K, c0, std::min(C, c0 + c_step),
                                     S_p + b0, ld);
    }
  });
  Tensor St = S.narrow(2, 0, B).to(x.scalar_type());  // [C, K, B]
  Tensor grad_cb;
  // The two small-inner-dimension bmms, shared out over the codebooks.
  const int64_t parts = std::min<int64_t>(C, threads);
  const int64_t step = (C + parts - 1) / parts;
  Tensor full_cb;
  if (need_cb) full_cb = at::empty({C, K, d}, x.options());
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // reason: grad mode is per thread; worker threads start with it on
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c0 = p * step, cn = std::min(C, c0 + step) - c0;
      if (cn <= 0) continue;
      Tensor Sp = St.narrow(0, c0, cn);
      if (need_x) {
        Tensor gx = at::bmm(Sp.transpose(1, 2), cbe.narrow(0, c0, cn));  // [cn, B, d]
        grad_x.view({B, C, d}).narrow(1, c0, cn).copy_(gx.transpose(0, 1));
      }
      if (need_cb) {
        Tensor part = full_cb.narrow(0, c0, cn);
        at::bmm_out(part, Sp, x.view({B, C, d}).narrow(1, c0, cn).transpose(0, 1));
      }
    }
  });
  if (need_cb) grad_cb = groups == 1 ? full_cb.sum(0, true) : full_cb;
  return {grad_x, grad_cb};
}

int64_t block_width(int64_t B) {
  if (B <= 1) return 1;
  if (B <= 2) return 2;
  if (B <= 4) return 4;
  if (B <= 8) return 8;
  if (B <= 16) return 16;
  return 32;
}

template <typename A, typename T, typename O, typename code_t>
Tensor forward_bb(const Tensor& x, const Tensor& xp, const Tensor& cbe, const Tensor& codebooks, const Tensor& codes,
                  const O* bias, const Tensor& out) {
  switch (block_width(x.size(0))) {
    case 1: return forward_impl<A, T, O, code_t, 1>(x, xp, cbe, codebooks, codes, bias, out);
    case 2: return forward_impl<A, T, O, code_t, 2>(x, xp, cbe, codebooks, codes, bias, out);
    case 4: return forward_impl<A, T, O, code_t, 4>(x, xp, cbe, codebooks, codes, bias, out);
    case 8: return forward_impl<A, T, O, code_t, 8>(x, xp, cbe, codebooks, codes, bias, out);
    case 16: return forward_impl<A, T, O, code_t, 16>(x, xp, cbe, codebooks, codes, bias, out);
    default: return forward_impl<A, T, O, code_t, 32>(x, xp, cbe, codebooks, codes, bias, out);
  }
}

template <typename T, typename G, typename code_t>
std::tuple<Tensor, Tensor> backward_bb(const Tensor& grad, const Tensor& x, const Tensor& cbe, const Tensor& codes,
                                       int64_t groups, bool need_x, bool need_cb, const Tensor& gx) {
  switch (block_width(grad.size(0))) {
    case 1: return backward_impl<T, G, code_t, 1>(grad, x, cbe, codes, groups, need_x, need_cb, gx);
    case 2: return backward_impl<T, G, code_t, 2>(grad, x, cbe, codes, groups, need_x, need_cb, gx);
    case 4: return backward_impl<T, G, code_t, 4>(grad, x, cbe, codes, groups, need_x, need_cb, gx);
    case 8: return backward_impl<T, G, code_t, 8>(grad, x, cbe, codes, groups, need_x, need_cb, gx);
    case 16: return backward_impl<T, G, code_t, 16>(grad, x, cbe, codes, groups, need_x, need_cb, gx);
    default: return backward_impl<T, G, code_t, 32>(grad, x, cbe, codes, groups, need_x, need_cb, gx);
  }
}

// Shapes, dtypes and devices of the compressed-domain linear; the codes' range is checked once they are contiguous.
void check(const Tensor& x, const Tensor& codebooks, const Tensor& codes, const char* what) {
  check_cpu(x, "x", what);
  check_cpu(codebooks, "codebooks", what);
  check_cpu(codes, "codes", what);
  TORCH_CHECK(x.dim() == 2 && codebooks.dim() == 3 && codes.dim() == 2, what, ": x [B, in], codebooks [G, K, d], codes [C, N]");
  TORCH_CHECK(x.size(1) == codes.size(0) * codebooks.size(2), what, ": x has ", x.size(1), " features, codes and codebooks make ",
              codes.size(0) * codebooks.size(2));
  check_groups(codebooks.size(0), codes.size(0), what);
}

// The dtypes the hand-written loops take (x, codebooks and grad alike, one dtype): float32 and float64, and
// bfloat16 / float16, whose sums the loops keep in float32. Others go through stock ATen ops.
bool fast_dtypes(std::initializer_list<at::ScalarType> types) {
  const at::ScalarType first = *types.begin();
  if (first != at::kFloat && first != at::kDouble && first != at::kBFloat16 && first != at::kHalf) return false;
  for (at::ScalarType t : types)
    if (t != first) return false;
  return true;
}

// The type the loops keep sums in for a fast dtype: float32 for the 16-bit floats.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Whether ATen's bfloat16 bmm is fast here (oneDNN on AVX512-BF16 or AMX-BF16); elsewhere the products run in float32.
bool fast_bf16_products() {
  static const bool fast = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    for (const char* key : {"avx512_bf16", "amx_bf16"}) {
      auto it = caps.find(key);
      if (it != caps.end() && it->second.isBool() && it->second.toBool()) return true;
    }
    return false;
  }();
  return fast;
}

// The dtype of the products (ATen's bmm) for values stored as `stored`: float16's run in float32 (ATen's CPU
// float16 bmm was 35x slower than float32 in the backward), bfloat16's where fast_bf16_products().
at::ScalarType product_type(at::ScalarType stored) {
  if (stored == at::kHalf || (stored == at::kBFloat16 && !fast_bf16_products())) return at::kFloat;
  return stored;
}

// f(A{}, P{}, S{}, code_t{}): sums kept in A, products in P (product_type), values stored as S, codes as code_t.
template <typename F>
decltype(auto) dispatch_types(at::ScalarType stored, const Tensor& codes, F&& f) {
  auto with_codes = [&](auto a, auto p, auto s) -> decltype(auto) {
    if (codes.scalar_type() == at::kShort) return f(a, p, s, uint16_t{});
    return f(a, p, s, uint8_t{});
  };
  switch (stored) {
    case at::kDouble: return with_codes(double{}, double{}, double{});
    case at::kBFloat16:
      if (product_type(stored) == at::kBFloat16) return with_codes(float{}, at::BFloat16{}, at::BFloat16{});
      return with_codes(float{}, float{}, at::BFloat16{});
    case at::kHalf: return with_codes(float{}, float{}, at::Half{});
    default: return with_codes(float{}, float{}, float{});
  }
}

Tensor expanded_codebooks(const Tensor& codebooks, int64_t C) {
  Tensor cb = codebooks.contiguous();
  return cb.size(0) == 1 && C > 1 ? cb.expand({C, cb.size(1), cb.size(2)}) : cb;
}

// W[n, c*d:(c+1)*d] = codebooks[g(c), codes[c, n]], d values of E bytes each (any dtype of that size).
// A block of rows at a time, each row of W written front to back, its codes read in place: the block's C cache lines
// of codes stay in L1 across its rows. reason: the codes were first gathered into a table of offsets [rows, C]
// written column by column; with C = 384 (a 1536-wide row at d = 4) those scattered writes made the expansion 3.5x
// slower per value than at C = 96 (389 us against 104 for 590K values, one thread)
template <typename E, typename code_t, int D>
void expand_rows(const E* __restrict cb, const code_t* __restrict codes, E* __restrict out, int64_t C, int64_t N,
                 int64_t K, int64_t d, int64_t groups) {
  constexpr int64_t NB = 64;
  const int64_t dim = D > 0 ? D : d;
  const int64_t row_len = C * dim;
  const int64_t slice_step = groups == 1 ? 0 : K * dim;  // codebook c starts at c * slice_step
  at::parallel_for(0, (N + NB - 1) / NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin * NB; n < std::min(N, end * NB); ++n) {
      E* __restrict row = out + n * row_len;
      const code_t* __restrict cc = codes + n;
      for (int64_t c = 0; c < C; ++c) {
        const E* __restrict src = cb + c * slice_step + static_cast<int64_t>(cc[c * N]) * dim;
        E* __restrict dst = row + c * dim;
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) dst[j] = src[j];
      }
    }
  });
}

template <typename E, typename code_t>
void expand_dispatch(const E* cb, const code_t* codes, E* out, int64_t C, int64_t N, int64_t K, int64_t d,
                     int64_t groups) {
  switch (d) {  // reason: a compile-time row length turns the short copies into a few vector moves
    case 1: return expand_rows<E, code_t, 1>(cb, codes, out, C, N, K, d, groups);
    case 2: return expand_rows<E, code_t, 2>(cb, codes, out, C, N, K, d, groups);
    case 4: return expand_rows<E, code_t, 4>(cb, codes, out, C, N, K, d, groups);
    case 8: return expand_rows<E, code_t, 8>(cb, codes, out, C, N, K, d, groups);
    case 16: return expand_rows<E, code_t, 16>(cb, codes, out, C, N, K, d, groups);
    default: return expand_rows<E, code_t, 0>(cb, codes, out, C, N, K, d, groups);
  }
}

template <typename E>
void expand_typed(const Tensor& cb, const Tensor& codes, Tensor& out) {
  const int64_t G = cb.size(0), K = cb.size(1), d = cb.size(2), C = codes.size(0), N = codes.size(1);
  const E* cb_p = reinterpret_cast<const E*>(cb.data_ptr());
  E* out_p = reinterpret_cast<E*>(out.data_ptr());
  if (codes.scalar_type() == at::kShort)
    expand_dispatch<E, uint16_t>(cb_p, reinterpret_cast<const uint16_t*>(codes.data_ptr()), out_p, C, N, K, d, G);
  else
    expand_dispatch<E, uint8_t>(cb_p, codes.data_ptr<uint8_t>(), out_p, C, N, K, d, G);
}

// grad_codebooks[g(c), codes[c, n]] += grad_W[n, c*d:(c+1)*d]: the transpose of expand_rows.
// Each task owns a band of codebooks and reads its contiguous band of every row of grad_W; with one
// shared codebook each task sums into its own [K, d] copy, added up at the end. grad stored as G, summed in T.
template <typename T, typename G, typename code_t>
void expand_backward_rows(const G* __restrict grad, const code_t* __restrict codes, T* __restrict out, int64_t C,
                          int64_t N, int64_t K, int64_t d, int64_t groups) {
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::min<int64_t>(C, threads);
  const int64_t step = (C + parts - 1) / parts;
  std::vector<std::vector<T>> partial(groups == 1 ? parts : 0);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c0 = p * step, c1 = std::min(C, c0 + step);
      T* acc = out;
      if (groups == 1) {
        partial[p].assign(K * d, T(0));
        acc = partial[p].data();
      }
      for (int64_t n = 0; n < N; ++n) {
        const G* __restrict row = grad + n * C * d;
        for (int64_t c = c0; c < c1; ++c) {
          T* __restrict dst = acc + ((groups == 1 ? 0 : c * K) + static_cast<int64_t>(codes[c * N + n])) * d;
          const G* __restrict src = row + c * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) dst[j] += static_cast<T>(src[j]);
        }
      }
    }
  });
  for (const auto& part : partial)
    for (int64_t i = 0; i < K * d; ++i) out[i] += part[i];
}

// ------------------------------------------------------------------ stock ATen paths for the other dtypes
// The same ops, in the same order, as rpq_fx/ops/stock.py: results equal to the bit.

// Row of codebooks.view(G*K, d) for every (n, c), laid out [N, C] (int32, as index_select / index_add_ take).
Tensor flat_index(const Tensor& codes, int64_t groups, int64_t num_codes) {
  Tensor index = codes.t().to(at::kInt);
  if (codes.scalar_type() == at::kShort) index = index.bitwise_and(0xFFFF);
  if (groups > 1) index = index + at::arange(codes.size(0), codes.options().dtype(at::kInt)) * num_codes;
  return index.reshape(-1);
}

// Codes as int64 row numbers, int16 read as unsigned.
Tensor unsigned_index(const Tensor& codes) {
  Tensor index = codes.to(at::kLong);
  return codes.scalar_type() == at::kShort ? index.bitwise_and(0xFFFF) : index;
}

void linear_forward_aten(const Tensor& x, const Tensor& codebooks, const Tensor& codes, Tensor& out) {
  const int64_t B = x.size(0), C = codes.size(0), N = codes.size(1);
  const int64_t G = codebooks.size(0), K = codebooks.size(1), d = codebooks.size(2);
  Tensor cb = G == 1 ? codebooks.expand({C, K, d}) : codebooks;
  Tensor table = at::bmm(cb, x.reshape({B, C, d}).permute({1, 2, 0}));  // [C, K, B]
  Tensor offsets = at::arange(C, codes.options().dtype(at::kLong)) * K;
  Tensor index = (unsigned_index(codes) + offsets.unsqueeze(1)).t().reshape(-1);  // bag n picks row c*K + codes[c, n]
  Tensor bags = at::arange(0, N * C, C, index.options());
  out.copy_(std::get<0>(at::embedding_bag(table.reshape({C * K, B}), index, bags, false, 0)).t());
}

Tensor linear_backward_aten(const Tensor& grad, const Tensor& x, const Tensor& codebooks, const Tensor& codes,
                            bool need_x, bool need_cb, Tensor& grad_x) {
  const int64_t B = x.size(0), C = codes.size(0);
  const int64_t G = codebooks.size(0), K = codebooks.size(1), d = codebooks.size(2);
  Tensor index = unsigned_index(codes);
  Tensor grad_t = grad.t().contiguous();  // [N, B]
  Tensor scattered = at::zeros({C, K, B}, grad.options());
  for (int64_t c = 0; c < C; ++c) scattered[c].index_add_(0, index[c], grad_t);
  if (need_x) {
    Tensor cb = G == 1 ? codebooks.expand({C, K, d}) : codebooks;
    grad_x.view({B, C, d}).copy_(at::bmm(scattered.transpose(1, 2), cb).transpose(0, 1));
  }
  if (!need_cb) return Tensor();
  Tensor grad_cb = at::bmm(scattered, x.reshape({B, C, d}).transpose(0, 1));
  return G == 1 ? grad_cb.sum(0, true) : grad_cb;
}

// grad_codebooks [G, K, d] of expand, from grad_W [N, C*d]; added into `out` when given.
Tensor expand_backward(const Tensor& grad_in, const Tensor& codes_in, int64_t groups, int64_t num_codes,
                       const c10::optional<Tensor>& out_in) {
  const char* what = "rpq_fx expand_backward";
  check_cpu(grad_in, "grad", what);
  check_cpu(codes_in, "codes", what);
  TORCH_CHECK(grad_in.dim() == 2 && codes_in.dim() == 2 && codes_in.size(0) > 0 && grad_in.size(0) == codes_in.size(1) &&
              grad_in.size(1) % codes_in.size(0) == 0, what, ": grad [N, C*d] and codes [C, N], got grad ",
              grad_in.sizes(), " and codes ", codes_in.sizes());
  check_groups(groups, codes_in.size(0), what);
  TORCH_CHECK(num_codes > 0, what, ": num_codes must be positive, got ", num_codes);
  at::NoGradGuard no_grad;
  Tensor grad = grad_in.contiguous(), codes = codes_in.contiguous();
  check_codes(codes, num_codes, what);
  const int64_t C = codes.size(0), N = codes.size(1), d = grad.size(1) / C;
  Tensor out;
  if (out_in.has_value() && out_in->defined()) {
    out = *out_in;
    check_cpu(out, "out", what);
    TORCH_CHECK(out.is_contiguous() && out.dim() == 3 && out.size(0) == groups && out.size(1) == num_codes &&
                out.size(2) == d && out.scalar_type() == grad.scalar_type(),
                what, ": out must be a contiguous [G, K, d] tensor of grad's dtype");
  } else {
    out = at::zeros({groups, num_codes, d}, grad.options());
  }
  if (grad.numel() == 0) return out;
  if (!fast_dtypes({grad.scalar_type()})) {
    out.view({groups * num_codes, d}).index_add_(0, flat_index(codes, groups, num_codes), grad.reshape({N * C, d}));
    return out;
  }
  // a 16-bit out is summed into a float32 copy and rounded once
  Tensor acc = out.scalar_type() == compute_type(out.scalar_type()) ? out : out.to(compute_type(out.scalar_type()));
  dispatch_types(grad.scalar_type(), codes, [&](auto t, auto, auto g, auto c) {
    using T = decltype(t);
    using G = decltype(g);
    using code_t = decltype(c);
    expand_backward_rows<T, G, code_t>(reinterpret_cast<const G*>(grad.data_ptr()),
                                       reinterpret_cast<const code_t*>(codes.data_ptr()), acc.data_ptr<T>(), C, N,
                                       num_codes, d, groups);
  });
  if (!acc.is_same(out)) out.copy_(acc);
  return out;
}

// W [N, C*d] from codebooks [G, K, d] and codes [C, N] (uint8, or int16 read as uint16), any dtype.
Tensor expand(const Tensor& codebooks_in, const Tensor& codes_in) {
  const char* what = "rpq_fx expand";
  check_cpu(codebooks_in, "codebooks", what);
  check_cpu(codes_in, "codes", what);
  TORCH_CHECK(codebooks_in.dim() == 3 && codes_in.dim() == 2, what, ": codebooks must be [G, K, d] and codes must be [C, N], got ",
              codebooks_in.sizes(), " and ", codes_in.sizes());
  check_groups(codebooks_in.size(0), codes_in.size(0), what);
  at::NoGradGuard no_grad;
  Tensor cb = codebooks_in.contiguous(), codes = codes_in.contiguous();
  check_codes(codes, cb.size(1), what);
  Tensor out = at::empty({codes.size(1), codes.size(0) * cb.size(2)}, cb.options());
  if (out.numel() == 0) return out;
  switch (cb.element_size()) {
    case 1: expand_typed<uint8_t>(cb, codes, out); break;
    case 2: expand_typed<uint16_t>(cb, codes, out); break;
    case 4: expand_typed<uint32_t>(cb, codes, out); break;
    case 8: expand_typed<uint64_t>(cb, codes, out); break;
    default:  // reason: no loop for 16-byte values (complex128): the stock gather
      return cb.reshape({cb.size(0) * cb.size(1), cb.size(2)})
          .index_select(0, flat_index(codes, cb.size(0), cb.size(1)))
          .view({codes.size(1), codes.size(0) * cb.size(2)});
  }
  return out;
}

// Where a result goes: `given` (a contiguous [rows, cols] tensor of the right dtype), or a new one.
Tensor result_buffer(const c10::optional<Tensor>& given, int64_t rows, int64_t cols, const Tensor& like,
                     const char* what) {
  if (!given.has_value() || !given->defined()) return at::empty({rows, cols}, like.options());
  const Tensor& out = *given;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.size(1) == cols && out.is_contiguous() &&
              out.scalar_type() == like.scalar_type() && out.device() == like.device(),
              what, ": out must be a contiguous [", rows, ", ", cols, "] tensor like the input");
  return out;
}

// ------------------------------------------------------------------ quantised lookup tables (small batches)
// One batch row at a time (T-MAC, faiss fast-scan): the row's table T[c, k] = codebooks[g(c), k] . x[c-th slice]
// (float32) is quantised per group of kLutGroup slices to unsigned fixed point of 8 * P bits around each slice's centre,
//   T[c, k] ~= m[c] + s * (q[c, k] - h),   m[c] = (min_k T[c, k] + max_k T[c, k]) / 2,   h = 2^(8P - 1),
// s = the group's largest range / (2^(8P) - 2), q stored as P byte planes of 256 entries (most significant first).
// Then per output row n
//   y[n] = sum_groups s * (sum_{c in group} q[c, codes[c, n]] - h * slices) + sum_c m[c]
// the group sums exact integers (the planes summed in 16-bit lanes, then words of two planes in 32 bits), each word
// added by one fused multiply-add in double, groups in order, then the centres (summed in double over c ascending),
// rounded to float32 once. (In float32 these sums lost up to 2.4e-5 of max|y| on MiniLM's layer-0 output
// projection: its shared codebook's outlier codewords put every slice's centre far from the values picked, so the two
// sums cancel; double keeps them exact enough.) Each lookup is off by at most s / 2, s set by the widest table of the
// group: P = 4 (32 bits) is as close as float32's own tables (benchmarks/lut_error.py) and is the automatic path;
// P = 1 and 2 (8-
// and 16-bit tables) are what `path="lut8"` / `"lut16"` ask. With AVX-512 VBMI a slice's table plane sits in four
// registers and `vpermi2b` looks up 64 codes at once (a mask on the code's top bit picks the half); elsewhere a scalar
// loop computes the same integers and the same float operations, so both give the same bits.
constexpr int64_t kLutGroup = 64;  // slices per scale; 255 * 64 fits the 16-bit lane sums
constexpr int64_t kLutMaxRows = 2;  // batches up to this many rows take the 32-bit tables (policy.py's _LUT_AUTO_ROWS)
constexpr int64_t kLutAutoBits = 32;

bool has_vbmi() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw");
  return yes;
#else
  return false;
#endif
}

// Quantise the table of one batch row's group of slices: T rows at T + c * tc (K floats), planes into q [cg, P, 256]
// (entries past K are zero), the slices' centres into lo [cg]; returns the group's scale. A slice with a value that is
// not finite gets a NaN centre, so that every output of the row is NaN (the float32 path gives NaN or inf there).
template <int P>
struct LutLevels {
  static constexpr double levels = double((uint64_t(1) << (8 * P)) - 1);
  static constexpr int64_t half = int64_t(1) << (8 * P - 1);
  static constexpr int E0 = P < 2 ? P : 2;  // planes in the first word (the second holds the rest)
  // scale and its inverse (in double: a 32-bit code needs more than float32's 24 bits) for a group's largest range
  static std::pair<float, double> scale(float range) {
    return {static_cast<float>(range / (levels - 1)), range > 0.0f ? (levels - 1) / range : 0.0};
  }
};

template <int P>
float lut_quantise_scalar(const float* __restrict T, int64_t tc, int64_t cg, int64_t K, uint8_t* __restrict q,
                          float* __restrict lo) {
  using L = LutLevels<P>;
  float range = 0.0f;
  for (int64_t c = 0; c < cg; ++c) {
    const float* __restrict t = T + c * tc;
    float mn = t[0], mx = t[0];
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      mn = std::min(mn, t[k]);
      mx = std::max(mx, t[k]);
      finite = finite && std::fabs(t[k]) <= std::numeric_limits<float>::max();
    }
    lo[c] = finite ? 0.5f * (mn + mx) : std::numeric_limits<float>::quiet_NaN();
    if (finite) range = std::max(range, mx - mn);
  }
  const auto [scale, inv] = L::scale(range);
  for (int64_t c = 0; c < cg; ++c) {
    const float* __restrict t = T + c * tc;
    uint8_t* __restrict qc = q + c * P * 256;
    for (int64_t k = 0; k < 256; ++k) {
      int64_t r = 0;  // the code less h, clamped to [-h, h - 1] (the centre is rounded), then rounded to nearest even
      if (k < K && !std::isnan(lo[c]))
        r = static_cast<int64_t>(std::nearbyint(std::clamp((double(t[k]) - double(lo[c])) * inv, -double(L::half),
                                                           double(L::half - 1))));
      const uint32_t v = static_cast<uint32_t>(r + L::half);
      for (int p = 0; p < P; ++p) qc[p * 256 + k] = static_cast<uint8_t>(v >> (8 * (P - 1 - p)));
    }
  }
  return scale;
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same with AVX-512 (the same operations in the same precision).
template <int P>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
float lut_quantise_avx512(const float* __restrict T, int64_t tc, int64_t cg, int64_t K, uint8_t* __restrict q,
                          float* __restrict lo) {
  using L = LutLevels<P>;
  const __m512 huge = _mm512_set1_ps(std::numeric_limits<float>::max());
  float range = 0.0f;
  for (int64_t c = 0; c < cg; ++c) {
    const float* t = T + c * tc;
    __m512 mn = _mm512_set1_ps(t[0]), mx = mn;
    __mmask16 finite = 0xFFFF;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(m, t + k);
      mn = _mm512_mask_min_ps(mn, m, mn, v);
      mx = _mm512_mask_max_ps(mx, m, mx, v);
      finite &= _mm512_cmp_ps_mask(_mm512_abs_ps(v), huge, _CMP_LE_OQ) | __mmask16(~m);
    }
    const float a = _mm512_reduce_min_ps(mn), b = _mm512_reduce_max_ps(mx);
    const bool ok = finite == 0xFFFF;
    lo[c] = ok ? 0.5f * (a + b) : std::numeric_limits<float>::quiet_NaN();
    if (ok) range = std::max(range, b - a);
  }
  const auto [scale, inv] = L::scale(range);
  const __m512d vinv = _mm512_set1_pd(inv);
  // clamped to [-h, h - 1] before cvtpd2dq (out of int32's range it gives INT32_MIN), then + h as unsigned
  const __m512d low = _mm512_set1_pd(-double(L::half)), high = _mm512_set1_pd(double(L::half - 1));
  const __m512i half = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(L::half)));
  for (int64_t c = 0; c < cg; ++c) {
    const float* t = T + c * tc;
    uint8_t* qc = q + c * P * 256;
    const __m512d centre = _mm512_set1_pd(double(lo[c]));
    const bool ok = !std::isnan(lo[c]);
    for (int64_t k = 0; k < 256; k += 16) {
      const __mmask16 m = !ok || k >= K ? __mmask16(0) : K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(m, t + k);
      const __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d d1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      const __m256i r0 = _mm512_cvtpd_epi32(
          _mm512_min_pd(_mm512_max_pd(_mm512_mul_pd(_mm512_sub_pd(d0, centre), vinv), low), high));
      const __m256i r1 = _mm512_cvtpd_epi32(
          _mm512_min_pd(_mm512_max_pd(_mm512_mul_pd(_mm512_sub_pd(d1, centre), vinv), low), high));
      __m512i r = _mm512_maskz_mov_epi32(m, _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1));  // past K, or a non-finite slice: the code h (r = 0)
      r = _mm512_add_epi32(r, half);
      for (int p = 0; p < P; ++p)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qc + p * 256 + k),
                         _mm512_cvtepi32_epi8(_mm512_srli_epi32(r, 8 * (P - 1 - p))));
    }
  }
  return scale;
}
#endif

template <int P>
float lut_quantise(const float* T, int64_t tc, int64_t cg, int64_t K, uint8_t* q, float* lo, bool vector) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (vector && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return lut_quantise_avx512<P>(T, tc, cg, K, q, lo);
#endif
  return lut_quantise_scalar<P>(T, tc, cg, K, q, lo);
}

// acc[i] (+)= the group's sums for rows i < nn, scalar: per word of planes (the first centred by h * cg), an exact
// int32 sum, added by acc = fma(scale * weight, sum, acc), the first word first.
template <int P>
void lut_group_scalar(const uint8_t* __restrict q, const uint8_t* __restrict codes, int64_t N, int64_t cg,
                      int64_t nn, float scale, double* __restrict acc) {
  constexpr int E0 = LutLevels<P>::E0;
  const double s0 = std::ldexp(double(scale), 8 * (P - E0));
  for (int64_t i = 0; i < nn; ++i) {
    int32_t w0 = -static_cast<int32_t>(cg << (8 * E0 - 1)), w1 = 0;
    for (int64_t c = 0; c < cg; ++c) {
      const uint8_t* qc = q + c * P * 256 + codes[c * N + i];
      for (int p = 0; p < P; ++p) {
        if (p < E0) w0 += static_cast<int32_t>(qc[p * 256]) << (8 * (E0 - 1 - p));
        else w1 += static_cast<int32_t>(qc[p * 256]) << (8 * (P - 1 - p));
      }
    }
    double a = std::fma(s0, static_cast<double>(w0), acc[i]);
    if (P > E0) a = std::fma(double(scale), static_cast<double>(w1), a);
    acc[i] = a;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same for nn rows, nn a multiple of 64: R blocks of 64 rows at a time, their sums in registers over the group.
template <int P, int R, int KW>  // KW: registers per table plane (1: K <= 64, 2: K <= 128, 4: K <= 256)
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")))
void lut_blocks_vbmi(const uint8_t* __restrict q, const uint8_t* __restrict codes, int64_t N, int64_t cg,
                     float scale, double* __restrict acc) {
  __m512i lo16[R][P], hi16[R][P];  // 16-bit lanes: lane j sums (even row) + 256 * (odd row), and the odd row
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) lo16[r][p] = hi16[r][p] = _mm512_setzero_si512();
  for (int64_t c = 0; c < cg; ++c) {
    const uint8_t* qc = q + c * P * 256;
    __m512i t[P][KW];
    for (int p = 0; p < P; ++p)
      for (int w = 0; w < KW; ++w) t[p][w] = _mm512_loadu_si512(qc + p * 256 + w * 64);
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_loadu_si512(codes + c * N + r * 64);
      __mmask64 upper = 0;
      if constexpr (KW == 4) upper = _mm512_movepi8_mask(v);
      for (int p = 0; p < P; ++p) {
        __m512i sel;
        if constexpr (KW == 1) {
          sel = _mm512_permutexvar_epi8(v, t[p][0]);
        } else if constexpr (KW == 2) {
          sel = _mm512_permutex2var_epi8(t[p][0], v, t[p][1]);
        } else {
          sel = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(t[p][0], v, t[p][1]),
                                       _mm512_permutex2var_epi8(t[p][2], v, t[p][3]));
        }
        lo16[r][p] = _mm512_add_epi16(lo16[r][p], sel);
        hi16[r][p] = _mm512_add_epi16(hi16[r][p], _mm512_srli_epi16(sel, 8));
      }
    }
  }
  constexpr int E0 = LutLevels<P>::E0, words = P > E0 ? 2 : 1;
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512d weight[2] = {_mm512_set1_pd(std::ldexp(double(scale), 8 * (P - E0))), _mm512_set1_pd(scale)};
  const __m512i centre = _mm512_set1_epi32(-static_cast<int32_t>(cg << (8 * E0 - 1)));
  for (int r = 0; r < R; ++r) {
    // even[w][h] holds word w of rows 32h + 2j, odd[w][h] of rows 32h + 2j + 1 (j < 16)
    __m512i even[2][2], odd[2][2];
    for (int w = 0; w < 2; ++w)
      for (int h = 0; h < 2; ++h) even[w][h] = odd[w][h] = w == 0 ? centre : _mm512_setzero_si512();
    for (int p = 0; p < P; ++p) {
      const __m512i e = _mm512_sub_epi16(lo16[r][p], _mm512_slli_epi16(hi16[r][p], 8));
      const int w = p < E0 ? 0 : 1, shift = 8 * ((w == 0 ? E0 : P) - 1 - p);
      for (int h = 0; h < 2; ++h) {
        const __m256i eh = h ? _mm512_extracti64x4_epi64(e, 1) : _mm512_castsi512_si256(e);
        const __m256i oh = h ? _mm512_extracti64x4_epi64(hi16[r][p], 1) : _mm512_castsi512_si256(hi16[r][p]);
        even[w][h] = _mm512_add_epi32(even[w][h], _mm512_slli_epi32(_mm512_cvtepu16_epi32(eh), shift));
        odd[w][h] = _mm512_add_epi32(odd[w][h], _mm512_slli_epi32(_mm512_cvtepu16_epi32(oh), shift));
      }
    }
    // interleaved back into row order, each word added by one fused multiply-add in double, the first word first
    for (int h = 0; h < 2; ++h) {
      double* a = acc + r * 64 + h * 32;
      __m512d part[4] = {_mm512_loadu_pd(a), _mm512_loadu_pd(a + 8), _mm512_loadu_pd(a + 16), _mm512_loadu_pd(a + 24)};
      for (int w = 0; w < words; ++w) {
        const __m512i v[2] = {_mm512_permutex2var_epi32(even[w][h], first, odd[w][h]),
                              _mm512_permutex2var_epi32(even[w][h], second, odd[w][h])};
        for (int j = 0; j < 4; ++j) {
          const __m256i half8 = j % 2 ? _mm512_extracti64x4_epi64(v[j / 2], 1) : _mm512_castsi512_si256(v[j / 2]);
          part[j] = _mm512_fmadd_pd(weight[w], _mm512_cvtepi32_pd(half8), part[j]);
        }
      }
      for (int j = 0; j < 4; ++j) _mm512_storeu_pd(a + 8 * j, part[j]);
    }
  }
}

template <int P, int KW>
void lut_group_vbmi(const uint8_t* q, const uint8_t* codes, int64_t N, int64_t cg, int64_t nn, float scale,
                    double* acc) {
  constexpr int R = P == 1 ? 4 : 2;
  int64_t i = 0;
  for (; i + 64 * R <= nn; i += 64 * R) lut_blocks_vbmi<P, R, KW>(q, codes + i, N, cg, scale, acc + i);
  for (; i + 64 <= nn; i += 64) lut_blocks_vbmi<P, 1, KW>(q, codes + i, N, cg, scale, acc + i);
  lut_group_scalar<P>(q, codes + i, N, cg, nn - i, scale, acc + i);
}
#endif

// acc (+)= the group's sums for rows [0, nn) of codes (row stride N), by VBMI permutes where `vector` and the CPU has
// them, else the scalar loop: the same bits either way.
template <int P>
void lut_group(const uint8_t* q, const uint8_t* codes, int64_t N, int64_t cg, int64_t K, int64_t nn, float scale,
               double* acc, bool vector) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (vector && has_vbmi()) {
    if (K <= 64) return lut_group_vbmi<P, 1>(q, codes, N, cg, nn, scale, acc);
    if (K <= 128) return lut_group_vbmi<P, 2>(q, codes, N, cg, nn, scale, acc);
    return lut_group_vbmi<P, 4>(q, codes, N, cg, nn, scale, acc);
  }
#endif
  lut_group_scalar<P>(q, codes, N, cg, nn, scale, acc);
}

// What a row's float32 tables are made of: x [B, C * d], the codebooks [G, K, d] and, for one shared codebook, it
// transposed [d, K].
struct LutInputs {
  const float* x;
  const float* codebooks;
  const float* shared_t;  // null for one codebook per slice
  int64_t d, row_len;
};

#if defined(__AVX512F__)
// t[k] = w[k] . xs for the K rows of one slice's codebook w [K, d], d a multiple of 16: four rows at a time, so four
// chains of multiply-adds run at once and the call streams w at the memory's rate (one row at a time waited on each
// add's latency: one thread built OPT-66b's tables at 24 GB/s)
void slice_tables_avx512(const float* __restrict w, const float* __restrict xs, int64_t K, int64_t d,
                         float* __restrict t) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const float* __restrict r = w + k * d;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
      const __m512 v = _mm512_loadu_ps(xs + j);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + j), v, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r + d + j), v, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(r + 2 * d + j), v, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(r + 3 * d + j), v, a3);
    }
    t[k] = _mm512_reduce_add_ps(a0);
    t[k + 1] = _mm512_reduce_add_ps(a1);
    t[k + 2] = _mm512_reduce_add_ps(a2);
    t[k + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; k < K; ++k) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(w + k * d + j), _mm512_loadu_ps(xs + j), a);
    t[k] = _mm512_reduce_add_ps(a);
  }
}
#endif

// T[c - c0, k] = codebooks[g(c), k] . x[b, c-th slice] for the slices [c0, c0 + cg), in float32 over the slice in
// order. reason: computed here, not by ATen's mm: its parallel region's join waited on a descheduled thread on a busy
// machine (split_phases shares these loops out instead)
void lut_tables(const LutInputs& in, int64_t b, int64_t c0, int64_t cg, int64_t K, float* __restrict T) {
  const int64_t d = in.d;
  for (int64_t c = c0; c < c0 + cg; ++c) {
    float* __restrict t = T + (c - c0) * K;
    const float* __restrict xs = in.x + b * in.row_len + c * d;
    if (in.shared_t != nullptr) {
      const float x0 = xs[0];
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) t[k] = in.shared_t[k] * x0;
      for (int64_t j = 1; j < d; ++j) {
        const float v = xs[j];
        const float* __restrict row = in.shared_t + j * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) t[k] += row[k] * v;
      }
    } else {
      const float* __restrict w = in.codebooks + c * K * d;
#if defined(__AVX512F__)
      if (d % 16 == 0) {
        slice_tables_avx512(w, xs, K, d, t);
        continue;
      }
#endif
      for (int64_t k = 0; k < K; ++k) {
        float a = 0.0f;
#pragma omp simd reduction(+ : a)
        for (int64_t j = 0; j < d; ++j) a += w[k * d + j] * xs[j];
        t[k] = a;
      }
    }
  }
}

// One thread's cost (ns) of the lookup-table forward's parts, for the decision to share a call out and the size of
// its table tasks: per multiply-add of a table (shared codebooks are read from cache; one codebook per slice streams
// from memory), per table entry quantised, per lookup of one byte plane (2-core AVX-512 VBMI machine, 4096x4096 at
// d = 4 shared and OPT-66b's 9216-wide layers at d = 128 and 512 per slice, medians of a quiet machine).
constexpr double kLutSharedMacNs = 0.03, kLutSliceMacNs = 0.13, kLutEntryNs = 0.32, kLutPlaneLookupNs = 0.035;
// A table task builds about this much work's worth of slices (ns): enough to pay for claiming it, small enough that
// waiting for the last one claimed costs little.
constexpr double kTableTaskNs = 16000;

// y [B, N] (float32) from each row's tables (built and quantised per group of slices) and uint8 codes [C, N], through
// P-byte tables, in three phases that the calling thread shares with a helper when the call is big enough
// (split_phases): (0) the tables, (1) their quantisation per group, (2) the lookups, a band of rows per task. Where a
// group's tables are cheap (shared codebooks, short slices) phase 0 builds and quantises a group per task, and phase
// 1 is empty; else phase 0 builds a few slices per task (one codebook per slice: streaming them is most of the call,
// and one core cannot stream what two can) into a table of the whole row.
template <int P>
void lut_forward(const LutInputs& in, int64_t B, int64_t C, int64_t K, const uint8_t* codes, int64_t N, float* y,
                 const float* bias, bool vector) {
  const int64_t groups = (C + kLutGroup - 1) / kLutGroup;
  const double mac_ns = in.shared_t != nullptr ? kLutSharedMacNs : kLutSliceMacNs;
  const int64_t slices = std::clamp<int64_t>(static_cast<int64_t>(kTableTaskNs / (mac_ns * K * in.d)), 1, kLutGroup);
  const bool fused = slices == kLutGroup;  // a group's tables built and quantised by one task
  const int64_t chunks = (C + slices - 1) / slices;
  // reason: reused by the thread's next call: a fresh buffer of this size (1 MiB at C = 1024, 32 bits) is a fresh
  // mapping whose page faults cost as much as the quantisation
  thread_local std::vector<uint8_t> q_buffer;
  thread_local std::vector<float> lo_buffer, scale_buffer, table_buffer;
  if (q_buffer.size() < static_cast<size_t>(B * C * P * 256)) q_buffer.resize(B * C * P * 256);
  if (lo_buffer.size() < static_cast<size_t>(B * C)) lo_buffer.resize(B * C);
  if (scale_buffer.size() < static_cast<size_t>(B * groups)) scale_buffer.resize(B * groups);
  if (!fused && table_buffer.size() < static_cast<size_t>(B * C * K)) table_buffer.resize(B * C * K);
  // reason: the helpers must see this thread's buffers, not their own thread_locals
  uint8_t* q = q_buffer.data();
  float* lo = lo_buffer.data();
  float* scale = scale_buffer.data();
  float* tables = table_buffer.data();
  // bands of rows, whole blocks of 64 (the lookups' width), about eight per thread, at least 256 rows (each band
  // reads every slice's table planes once from L2)
  const int64_t threads = at::get_num_threads();
  const int64_t band = std::max<int64_t>(256, (N / std::max<int64_t>(1, 8 * threads / B) + 63) / 64 * 64);
  const int64_t bands = (N + band - 1) / band;
  const double work_ns = static_cast<double>(B * C) * (mac_ns * K * in.d + kLutEntryNs * K + kLutPlaneLookupNs * P * N);
  const int64_t least = g_split_min_ns.load(std::memory_order_relaxed);
  const bool split = work_ns >= static_cast<double>(least < 0 ? kSplitMinNs : least);
  const std::array<int64_t, 3> tasks{B * (fused ? groups : chunks), fused ? 0 : B * groups, B * bands};
  split_phases(tasks, split, [&](int phase, int64_t t) {
    if (phase == 0 && fused) {
      const int64_t b = t / groups, c0 = (t % groups) * kLutGroup, cg = std::min(kLutGroup, C - c0);
      thread_local std::vector<float> table;
      table.resize(kLutGroup * K);
      lut_tables(in, b, c0, cg, K, table.data());
      scale[t] = lut_quantise<P>(table.data(), K, cg, K, q + (b * C + c0) * P * 256, lo + b * C + c0, vector);
    } else if (phase == 0) {
      const int64_t b = t / chunks, c0 = (t % chunks) * slices;
      lut_tables(in, b, c0, std::min(slices, C - c0), K, tables + (b * C + c0) * K);
    } else if (phase == 1) {
      const int64_t b = t / groups, c0 = (t % groups) * kLutGroup, cg = std::min(kLutGroup, C - c0);
      scale[t] = lut_quantise<P>(tables + (b * C + c0) * K, K, cg, K, q + (b * C + c0) * P * 256, lo + b * C + c0,
                                 vector);
    } else {
      thread_local std::vector<double> acc;
      acc.assign(band, 0.0);
      const int64_t b = t / bands, n0 = (t % bands) * band, nn = std::min(band, N - n0);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = g * kLutGroup;
        lut_group<P>(q + (b * C + c0) * P * 256, codes + c0 * N + n0, N, std::min(kLutGroup, C - c0), K, nn,
                     scale[b * groups + g], acc.data(), vector);
      }
      double offset = 0.0;
      for (int64_t c = 0; c < C; ++c) offset += lo[b * C + c];
      float* __restrict out = y + b * N + n0;
      if (bias == nullptr) {
        for (int64_t i = 0; i < nn; ++i) out[i] = static_cast<float>(acc[i] + offset);
      } else {  // rounded as out.add_(bias) would: the sum stored as float32 first
        for (int64_t i = 0; i < nn; ++i) out[i] = static_cast<float>(acc[i] + offset) + bias[n0 + i];
      }
    }
  });
}

// Whether the quantised-table kernel takes this call: uint8 codes, at most 256 codewords, float32 or bfloat16.
bool lut_supports(const Tensor& x, const Tensor& codebooks, const Tensor& codes) {
  return codes.scalar_type() == at::kByte && codebooks.size(1) <= 256 &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
         codebooks.scalar_type() == x.scalar_type();
}

// y [B, N] = x W^T through bits-bit tables (8, 16, 24 or 32), into `out` (x's dtype): x [B, in], codes contiguous and
// checked. The tables are built in float32 whatever x's dtype.
void lut_linear(const Tensor& x, const Tensor& codebooks, const Tensor& codes, int64_t bits, bool vector, Tensor& out,
                const float* bias = nullptr) {
  const int64_t B = x.size(0), C = codes.size(0), N = codes.size(1);
  const int64_t G = codebooks.size(0), K = codebooks.size(1), d = codebooks.size(2);
  const Tensor xf = x.to(at::kFloat).contiguous(), cbf = codebooks.to(at::kFloat).contiguous();
  const Tensor cbt = G == 1 ? cbf[0].t().contiguous() : Tensor();  // [d, K]
  const LutInputs in{xf.data_ptr<float>(), cbf.data_ptr<float>(), G == 1 ? cbt.data_ptr<float>() : nullptr, d, C * d};
  Tensor y = out.scalar_type() == at::kFloat && out.is_contiguous() ? out : at::empty({B, N}, xf.options());
  TORCH_INTERNAL_ASSERT(bias == nullptr || y.is_same(out), "rpq_fx lut_linear: a bias is added only into out");
  const uint8_t* codes_p = codes.data_ptr<uint8_t>();
  switch (bits) {
    case 8: lut_forward<1>(in, B, C, K, codes_p, N, y.data_ptr<float>(), bias, vector); break;
    case 16: lut_forward<2>(in, B, C, K, codes_p, N, y.data_ptr<float>(), bias, vector); break;
    case 24: lut_forward<3>(in, B, C, K, codes_p, N, y.data_ptr<float>(), bias, vector); break;
    default: lut_forward<4>(in, B, C, K, codes_p, N, y.data_ptr<float>(), bias, vector); break;
  }
  if (!y.is_same(out)) out.copy_(y);
}

// y [B, N] = x [B, in] @ W^T (+ bias [N] where defined), W never built; written into `out` when given.
Tensor linear_forward(const Tensor& x_in, const Tensor& codebooks, const Tensor& codes_in, const Tensor& bias_in,
                      const c10::optional<Tensor>& out_in) {
  const char* what = "rpq_fx linear_forward";
  check(x_in, codebooks, codes_in, what);
  if (bias_in.defined()) {
    check_cpu(bias_in, "bias", what);
    TORCH_CHECK(bias_in.dim() == 1 && bias_in.size(0) == codes_in.size(1), what, ": bias must be [",
                codes_in.size(1), "], got ", bias_in.sizes());
  }
  at::NoGradGuard no_grad;  // reason: the callers' autograd formulas differentiate this; its inner ops must not record
  Tensor x = x_in.contiguous(), codes = codes_in.contiguous();
  check_codes(codes, codebooks.size(1), what);
  Tensor out = result_buffer(out_in, x.size(0), codes.size(1), x, what);
  // the bias is added in the output's write where it has x's dtype and the hand-written loops compute; else after
  const bool fast = fast_dtypes({x.scalar_type(), codebooks.scalar_type()});
  const bool lut = fast && x.size(0) <= kLutMaxRows && codebooks.size(1) > 32 && has_vbmi() &&
                   lut_supports(x, codebooks, codes);
  const bool fold = bias_in.defined() && fast && bias_in.scalar_type() == x.scalar_type() &&
                    (!lut || (x.scalar_type() == at::kFloat && out.is_contiguous()));
  if (!fast) {
    linear_forward_aten(x, codebooks, codes, out);
  } else if (lut) {
    // one or two rows, K beyond the one-register permutes: 32-bit tables in registers (as close as float32), the work
    // shared by split_phases (see lut_forward)
    const Tensor bias = fold ? bias_in.contiguous() : Tensor();
    lut_linear(x, codebooks, codes, kLutAutoBits, true, out, fold ? bias.data_ptr<float>() : nullptr);
  } else {
    const Tensor bias = fold ? bias_in.contiguous() : Tensor();
    // ATen's bmm builds the tables of long slices, in the products' dtype; short ones are summed from x in place
    Tensor xp, cbe;
    if (codebooks.size(2) >= 16) {
      const at::ScalarType products = product_type(x.scalar_type());
      xp = x.to(products);
      cbe = expanded_codebooks(codebooks.to(products), codes.size(0));
    }
    dispatch_types(x.scalar_type(), codes, [&](auto a, auto p, auto s, auto c) {
      using S = decltype(s);
      return forward_bb<decltype(a), decltype(p), S, decltype(c)>(
          x, xp, cbe, codebooks, codes, fold ? reinterpret_cast<const S*>(bias.data_ptr()) : nullptr, out);
    });
  }
  if (bias_in.defined() && !fold) out.add_(bias_in);
  return out;
}

// (grad_x [B, in] or undefined, grad_codebooks [G, K, d] or undefined) of linear_forward; grad_x is
// written into `grad_x_out` when given.
std::tuple<Tensor, Tensor> linear_backward(const Tensor& grad_in, const Tensor& x_in, const Tensor& codebooks,
                                           const Tensor& codes_in, bool need_x, bool need_cb,
                                           const c10::optional<Tensor>& grad_x_out) {
  check(x_in, codebooks, codes_in, "rpq_fx linear_backward");
  at::NoGradGuard no_grad;
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == x_in.size(0) && grad_in.size(1) == codes_in.size(1),
              "rpq_fx linear_backward: grad must be [B, N]");
  check_cpu(grad_in, "grad", "rpq_fx linear_backward");
  Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), codes = codes_in.contiguous();
  check_codes(codes, codebooks.size(1), "rpq_fx linear_backward");
  const int64_t groups = codebooks.size(0);
  Tensor gx = need_x ? result_buffer(grad_x_out, x.size(0), x.size(1), x, "rpq_fx linear_backward") : Tensor();
  if (!fast_dtypes({grad.scalar_type(), x.scalar_type(), codebooks.scalar_type()}))
    return {gx, linear_backward_aten(grad, x, codebooks, codes, need_x, need_cb, gx)};
  const at::ScalarType products = product_type(x.scalar_type());
  Tensor xp = x.to(products), cbe = expanded_codebooks(codebooks.to(products), codes.size(0));
  auto result = dispatch_types(grad.scalar_type(), codes, [&](auto a, auto, auto g, auto c) {
    return backward_bb<decltype(a), decltype(g), decltype(c)>(grad, xp, cbe, codes, groups, need_x, need_cb, gx);
  });
  Tensor& grad_cb = std::get<1>(result);
  if (grad_cb.defined()) grad_cb = grad_cb.to(codebooks.scalar_type());  // from the products' dtype
  return result;
}

// k-means assignment: for x [B, M, d] and centroids [B, K, d], each point's nearest centroid and its
// squared distance. Per point, |c|^2 - 2 x.c for all K centroids is built in a K-long accumulator
// from the centroids stored [B, d, K] (contiguous over K, so the d updates vectorise), then its
// minimum taken: no [M, K] distance matrix is ever written.
template <typename T>
void nearest_impl(const Tensor& x, const Tensor& ct, const Tensor& cn, Tensor& index, Tensor& dist) {
  const int64_t B = x.size(0), M = x.size(1), d = x.size(2), K = ct.size(2);
  const T* __restrict xs = x.data_ptr<T>();
  const T* __restrict cts = ct.data_ptr<T>();
  const T* __restrict cns = cn.data_ptr<T>();
  int64_t* __restrict out_index = index.data_ptr<int64_t>();
  T* __restrict out_dist = dist.data_ptr<T>();
  at::parallel_for(0, B * M, 64, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(K);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / M;
      const T* __restrict xp = xs + p * d;
      const T* __restrict ctb = cts + b * d * K;
      const T* __restrict cnb = cns + b * K;
      T norm = 0;
      for (int64_t k = 0; k < K; ++k) acc[k] = cnb[k];
      for (int64_t j = 0; j < d; ++j) {
        const T v = -2 * xp[j];
        const T* __restrict row = ctb + j * K;
        T* __restrict a = acc.data();
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) a[k] += v * row[k];
        norm += xp[j] * xp[j];
      }
      int64_t best = 0;
      for (int64_t k = 1; k < K; ++k)
        if (acc[k] < acc[best]) best = k;
      out_index[p] = best;
      out_dist[p] = std::max(acc[best] + norm, T(0));
    }
  });
}

std::tuple<Tensor, Tensor> nearest(const Tensor& x_in, const Tensor& centroids) {
  check_cpu(x_in, "x", "rpq_fx nearest");
  check_cpu(centroids, "centroids", "rpq_fx nearest");
  TORCH_CHECK(x_in.dim() == 3 && centroids.dim() == 3 && x_in.size(0) == centroids.size(0) &&
              x_in.size(2) == centroids.size(2), "rpq_fx nearest: x [B, M, d] and centroids [B, K, d]");
  TORCH_CHECK(x_in.scalar_type() == centroids.scalar_type() &&
              (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble),
              "rpq_fx nearest: float32 or float64, one dtype");
  TORCH_CHECK(centroids.size(1) > 0, "rpq_fx nearest: no centroids");
  const Tensor x = x_in.contiguous();
  const Tensor ct = centroids.transpose(1, 2).contiguous();
  const Tensor cn = centroids.square().sum(-1).contiguous();
  Tensor index = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kLong));
  Tensor dist = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == at::kFloat) nearest_impl<float>(x, ct, cn, index, dist);
  else nearest_impl<double>(x, ct, cn, index, dist);
  return {index, dist};
}

}  // namespace

// ------------------------------------------------------------------ the ops' CPU kernels (dispatcher entry points)
// rpq_fx/ops/library.py defines every schema; these are their CPU implementations.

// rpq_fx::_expand_backward_add(Tensor(a!) out, Tensor grad, Tensor codes): out [G, K, d] += the expansion's
// transpose applied to grad [N, C*d].
void expand_backward_add_op(at::Tensor& out, const Tensor& grad, const Tensor& codes) {
  TORCH_CHECK(out.dim() == 3, "rpq_fx expand_backward: out must be [G, K, d], got ", out.sizes());
  expand_backward(grad, codes, out.size(0), out.size(1), out);
}

// rpq_fx::_linear_compressed(Tensor x, Tensor codebooks, Tensor codes, Tensor? bias=None) -> Tensor: x [..., in] ->
// y [..., N], plus bias [N] where given.
Tensor linear_compressed_op(const Tensor& x, const Tensor& codebooks, const Tensor& codes,
                            const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && codes.dim() == 2, "rpq_fx linear: x [..., in] and codes [C, N]");
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = codes.size(1);
  Tensor out = at::empty(shape, x.options());
  Tensor out_2d = out.view({-1, codes.size(1)});
  if (out_2d.size(0) > 0)
    linear_forward(x.reshape({-1, x.size(-1)}), codebooks, codes, bias.has_value() ? *bias : Tensor(), out_2d);
  return out;
}

// rpq_fx::_linear_compressed_backward(grad, x, codebooks, codes, need_input, need_codebooks) -> (grad_x, grad_cb):
// grad_x shaped like x, grad_cb like codebooks; one not asked for is empty.
std::tuple<Tensor, Tensor> linear_compressed_backward_op(const Tensor& grad, const Tensor& x, const Tensor& codebooks,
                                                         const Tensor& codes, bool need_x, bool need_cb) {
  TORCH_CHECK(x.dim() >= 1 && codes.dim() == 2, "rpq_fx linear_backward: x [..., in] and codes [C, N]");
  Tensor grad_x = at::empty(need_x ? x.sizes() : at::IntArrayRef{0}, x.options());
  Tensor x_2d = x.reshape({-1, x.size(-1)});
  auto result = linear_backward(grad.reshape({-1, codes.size(1)}), x_2d, codebooks, codes, need_x, need_cb,
                                need_x ? std::optional<Tensor>(grad_x.view(x_2d.sizes())) : std::nullopt);
  return {grad_x, need_cb ? std::get<1>(result) : at::empty({0}, codebooks.options())};
}

// rpq_fx::_linear_lut(Tensor x, Tensor codebooks, Tensor codes, int bits, bool vectorized) -> Tensor: x [..., in] ->
// y [..., N] through `bits`-bit lookup tables (8, 16, 24 or 32); `vectorized=False` runs the scalar loop (the tests
// compare the two). uint8 codes, K <= 256, float32 or bfloat16 only.
Tensor linear_lut_op(const Tensor& x, const Tensor& codebooks, const Tensor& codes_in, int64_t bits, bool vectorized) {
  const char* what = "rpq_fx linear_lut";
  TORCH_CHECK(x.dim() >= 1 && codes_in.dim() == 2, what, ": x [..., in] and codes [C, N]");
  Tensor x_2d = x.reshape({-1, x.size(-1)});
  check(x_2d, codebooks, codes_in, what);
  TORCH_CHECK(bits == 8 || bits == 16 || bits == 24 || bits == 32, what, ": bits must be 8, 16, 24 or 32, got ", bits);
  TORCH_CHECK(lut_supports(x_2d, codebooks, codes_in), what, ": takes uint8 codes, at most 256 codewords and "
              "float32 or bfloat16 x and codebooks (one dtype), got codes ", codes_in.scalar_type(), ", ",
              codebooks.size(1), " codewords, x ", x.scalar_type(), " and codebooks ", codebooks.scalar_type());
  at::NoGradGuard no_grad;
  Tensor codes = codes_in.contiguous();
  check_codes(codes, codebooks.size(1), what);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = codes.size(1);
  Tensor out = at::empty(shape, x.options());
  Tensor out_2d = out.view({-1, codes.size(1)});
  if (out_2d.numel() > 0) lut_linear(x_2d, codebooks, codes, bits, vectorized, out_2d);
  return out;
}

// rpq_fx::_lut_split_hooks(int min_ns, int helper_delay_us, int caller_delay_us, int mode) -> int[]: TESTS ONLY,
// process-wide. Sets the least estimated work (ns) the lookup-table forward shares with helpers (-1: the default), a
// delay before each helper starts and one before the caller starts its share (us; 0: none; the latter lets helpers
// take tasks of tiny calls) and who helps (-1: chosen per call, 0: launched helpers, 1: the intra-op team; changing it
// forgets a team's lateness); returns the previous three, the number of tasks helpers have run so far, the
// previous mode and whether the next chosen call would go to the team.
std::vector<int64_t> lut_split_hooks(int64_t min_ns, int64_t helper_delay_us, int64_t caller_delay_us, int64_t mode) {
  TORCH_CHECK(min_ns >= -1 && helper_delay_us >= 0 && caller_delay_us >= 0 && mode >= -1 && mode <= 1,
              "rpq_fx _lut_split_hooks: min_ns >= -1, delays >= 0, mode -1, 0 or 1");
  const bool team_next = now_ns() >= g_team_after.load();
  std::vector<int64_t> previous{g_split_min_ns.exchange(min_ns), g_helper_delay_us.exchange(helper_delay_us),
                                g_caller_delay_us.exchange(caller_delay_us), g_helper_tasks.load(),
                                g_split_mode.exchange(static_cast<int>(mode)), team_next};
  if (previous[4] != mode) {
    g_team_after.store(0);
    g_team_backoff.store(kTeamBackoffNs);
  }
  return previous;
}

// rpq_fx::_linear_lut_in_region(Tensor x, Tensor codebooks, Tensor codes) -> Tensor[]: TESTS ONLY. The 32-bit
// lookup-table forward called by each thread of a two-thread at::parallel_for region (one result per thread that
// ran): what a caller already inside a parallel region, whose thread number may be nonzero, gets.
std::vector<Tensor> linear_lut_in_region(const Tensor& x, const Tensor& codebooks, const Tensor& codes) {
  std::vector<Tensor> results(2);
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) results[i] = linear_lut_op(x, codebooks, codes, 32, true);
  });
  return results;
}

TORCH_LIBRARY_FRAGMENT(rpq_fx, m) {
  m.def("_linear_lut_in_region(Tensor x, Tensor codebooks, Tensor codes) -> Tensor[]", &linear_lut_in_region);
  m.def("_lut_split_hooks(int min_ns, int helper_delay_us, int caller_delay_us, int mode=-1) -> int[]",
        &lut_split_hooks);
  m.def("_nearest(Tensor x, Tensor centroids) -> (Tensor, Tensor)");  // k-means assignment (rpq_fx.fit), CPU only
  m.def("_linear_lut(Tensor x, Tensor codebooks, Tensor codes, int bits, bool vectorized=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(rpq_fx, CPU, m) {
  m.impl("expand", &expand);
  m.impl("_expand_backward_add", &expand_backward_add_op);
  m.impl("_linear_compressed", &linear_compressed_op);
  m.impl("_linear_compressed_backward", &linear_compressed_backward_op);
  m.impl("_nearest", &nearest);
  m.impl("_linear_lut", &linear_lut_op);
}
