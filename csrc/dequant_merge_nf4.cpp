// pyprefopt._C: the CPU NF4 dequant-merge. One pass over memory: read the packed NF4 codes and block scales,
// decode, add the LoRA delta scale * B @ A tile by tile from registers, write bf16 / fp16 / fp32 once.
//
// Pure pybind11 over raw data pointers (pyprefopt/nf4.py validates dtypes, sizes and contiguity first), so the
// build needs no torch. Rows are split between std::threads; within a thread the work runs on the widest
// instruction set the CPU has (AVX-512, AVX2+FMA+F16C, or portable scalar code), chosen at run time. All
// paths accumulate the rank-r dot product in the same order with fused multiply-adds, so they agree bit for
// bit. Built with -ffp-contract=off: see nf4.h.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "nf4.h"
#include "nf4_problem.h"

// The SIMD paths use GCC's per-function target pragmas; other compilers and CPUs build the scalar path.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define NF4_X86 1
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

const float kNF4Code[16] = {NF4_CODE_VALUES};

// Fewer elements than this per thread cost more in thread start-up than they save.
constexpr int64_t kMinElementsPerThread = 1 << 16;

// Narrowest first; each needs the ones before it. avx512 is AVX-512 F+BW+DQ (Skylake-SP and later), avx512bf16
// adds AVX512-BF16's conversion for bf16 outputs and AVX512-VBMI's byte shifts for decoding (Sapphire Rapids,
// Zen 4 and later; Cooper Lake has BF16 without VBMI and runs avx512).
enum class Isa { kScalar, kAvx2, kAvx512, kAvx512Bf16 };
constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16};

// Outputs at least this large are written with non-temporal stores: they outgrow a core's caches anyway, and a
// plain store first reads each line it writes, so streaming stores roughly double the fill bandwidth.
constexpr int64_t kStreamMinBytes = 8 << 20;

int64_t out_element_bytes(const nf4::Problem& p) { return p.out_dtype == nf4::kFloat32 ? 4 : 2; }

// Whole cache lines only: the output is 64-byte aligned and so is every row.
bool stream_output(const nf4::Problem& p) {
    const int64_t row_bytes = p.cols * out_element_bytes(p);
    return reinterpret_cast<uintptr_t>(p.out) % 64 == 0 && row_bytes % 64 == 0 && row_bytes * p.rows >= kStreamMinBytes;
}

// The decoded block scales of a few rows (nf4::block_scale, once per block): the SIMD tiles then take a chunk's
// scale with one broadcast load instead of decoding it for every vector.
class RowScales {
   public:
    RowScales(const nf4::Problem& p, int64_t max_rows)
        : values_(static_cast<size_t>(((max_rows * p.cols) >> p.blocksize_log2) + 2)) {}

    void decode(const nf4::Problem& p, int64_t row0, int64_t rows) {
        first_block_ = (row0 * p.cols) >> p.blocksize_log2;
        const int64_t end_block = (((row0 + rows) * p.cols - 1) >> p.blocksize_log2) + 1;
        for (int64_t block = first_block_; block < end_block; ++block)
            values_[block - first_block_] = nf4::block_scale(p, block);
    }

    // The scale of element e, which must lie in the decoded rows.
    float of(const nf4::Problem& p, int64_t e) const { return values_[(e >> p.blocksize_log2) - first_block_]; }

   private:
    std::vector<float> values_;
    int64_t first_block_ = 0;
};

// Split the rows between threads in whole groups of `granule` rows.
using RowsFn = void (*)(const nf4::Problem&, int64_t, int64_t);

void run_threads(const nf4::Problem& p, RowsFn fn, int granule, int num_threads) {
    const int64_t groups = (p.rows + granule - 1) / granule;
    const int64_t by_work = std::max<int64_t>(1, p.rows * p.cols / kMinElementsPerThread);
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({num_threads, groups, by_work}));
    std::vector<std::thread> workers;
    workers.reserve(threads - 1);
    auto range = [&](int64_t t) {
        const int64_t begin = std::min(p.rows, groups * t / threads * granule);
        const int64_t end = std::min(p.rows, groups * (t + 1) / threads * granule);
        return std::pair<int64_t, int64_t>(begin, end);
    };
    for (int64_t t = 1; t < threads; ++t) {
        const auto [begin, end] = range(t);
        workers.emplace_back(fn, std::cref(p), begin, end);
    }
    const auto [begin, end] = range(0);
    fn(p, begin, end);
    for (auto& worker : workers) worker.join();
}

namespace scalar {

void merge_rows(const nf4::Problem& p, int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row)
        for (int64_t col = 0; col < p.cols; ++col) nf4::merge_element(p, kNF4Code, row, col);
}

void merge(const nf4::Problem& p, int num_threads) { run_threads(p, merge_rows, 1, num_threads); }

// Scalar multiply-adds in 12 chains (the SIMD namespaces' fma_chains, one lane wide).
float fma_chains(int64_t iterations) {
    float acc[12];
    for (int c = 0; c < 12; ++c) acc[c] = static_cast<float>(c);
    for (int64_t i = 0; i < iterations; ++i)
        for (float& x : acc) x = x * 0.999f + 1e-3f;
    float sum = 0;
    for (float x : acc) sum += x;
    return sum;
}

}  // namespace scalar

#if NF4_X86

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

struct Ops {
    using V = __m256;
    static constexpr int W = 8;
    // 4 rows x 2 vectors: 8 accumulators + 2 lora_A vectors + 1 broadcast fit the 16 ymm registers.
    static constexpr int R = 4;

    // The 16-entry table as two 8-lane halves; bit 3 of the code picks the half.
    struct Table {
        __m256 low, high;
        explicit Table(const float* code) : low(_mm256_loadu_ps(code)), high(_mm256_loadu_ps(code + 8)) {}
        Table(__m256 low_values, __m256 high_values) : low(low_values), high(high_values) {}
        Table scaled(float s) const {
            const __m256 by = _mm256_set1_ps(s);
            return Table(_mm256_mul_ps(low, by), _mm256_mul_ps(high, by));
        }
    };

    static V zero() { return _mm256_setzero_ps(); }
    static V set1(float x) { return _mm256_set1_ps(x); }
    static V loadu(const float* x) { return _mm256_loadu_ps(x); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }

    // The table entries at the low 4 bits of each lane: permutevar8x32 reads bits 0-2 and bit 3 reaches the sign
    // bit after the shift by 28; bits above the nibble are shifted out or ignored.
    static V lookup(__m256i idx, const Table& table) {
        const __m256 low = _mm256_permutevar8x32_ps(table.low, idx);
        const __m256 high = _mm256_permutevar8x32_ps(table.high, idx);
        return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }

    // 8 elements from 4 bytes, high nibble first.
    static V decode(const uint8_t* bytes, const Table& table) {
        int32_t word;
        std::memcpy(&word, bytes, sizeof word);
        const __m128i doubled = _mm_unpacklo_epi8(_mm_cvtsi32_si128(word), _mm_cvtsi32_si128(word));
        // Lane l holds byte l / 2: shift the even lanes' high nibble down.
        const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
        return lookup(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(doubled), shifts), table);
    }

    // A pair's vectors are de-interleaved: lane j of the first holds element 2j of the pair, of the second element
    // 2j + 1, so both nibbles of byte j stay in lane j. That spares decode's unpack and variable shift, and the
    // bf16 store packs a pair with one word blend (measured 2 instructions per vector fewer than in order).
    static constexpr int pair_column(int vector, int lane) { return 2 * lane + vector; }

    // Elements [e, e + 16) from 8 bytes in pair_column order, [e, e + 8) scaled by `first`'s block scale and
    // [e + 8, e + 16) by `second`'s; one_block: they are the same table.
    static void decode_pair(const uint8_t* bytes, const Table& first, const Table& second, bool one_block, V& even,
                            V& odd) {
        const __m256i lanes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
        const __m256i high_nibbles = _mm256_srli_epi32(lanes, 4);
        even = lookup(high_nibbles, first);
        odd = lookup(lanes, first);
        if (!one_block) {  // lanes 4-7 hold elements 8-15
            even = _mm256_blend_ps(even, lookup(high_nibbles, second), 0xF0);
            odd = _mm256_blend_ps(odd, lookup(lanes, second), 0xF0);
        }
    }

    // fp32 -> bf16 bits by round to nearest even (nf4::bf16_bits), left in the high half of each 32-bit lane,
    // for lanes that are not NaN.
    static __m256i bf16_rounded_high_finite(V v) {
        const __m256i bits = _mm256_castps_si256(v);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        return _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd);
    }

    // The same for any lane: NaN lanes become 0x7FC0.
    static __m256i bf16_rounded_high(V v) {
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        return _mm256_blendv_epi8(bf16_rounded_high_finite(v), _mm256_set1_epi32(0x7FC00000), nan);
    }

    // 8 fp32 lanes -> 8 16-bit values of the output dtype.
    template <int Dt>
    static __m128i to_16bit(V v) {
        if (Dt == nf4::kFloat16) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        // packus packs within 128-bit lanes; the permute brings the two halves' results together.
        const __m256i rounded = _mm256_srli_epi32(bf16_rounded_high(v), 16);
        return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8));
    }

    template <int Dt>
    static void store(const nf4::Problem& p, int64_t e, V v) {
        if (Dt == nf4::kFloat32)
            _mm256_storeu_ps(static_cast<float*>(p.out) + e, v);
        else
            _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p.out) + e), to_16bit<Dt>(v));
    }

    // A pair (pair_column order) to elements [e, e + 16); Stream needs them 32-byte aligned (stream_output's
    // whole rows of lines).
    template <int Dt, bool Stream>
    static void store_pair(const nf4::Problem& p, int64_t e, V even, V odd) {
        if (Dt == nf4::kFloat32) {
            // unpack interleaves within 128-bit halves: elements 0-3 | 8-11, then 4-7 | 12-15.
            const V low = _mm256_unpacklo_ps(even, odd), high = _mm256_unpackhi_ps(even, odd);
            const V a = _mm256_permute2f128_ps(low, high, 0x20), b = _mm256_permute2f128_ps(low, high, 0x31);
            float* out = static_cast<float*>(p.out) + e;
            if (Stream) {
                _mm256_stream_ps(out, a);
                _mm256_stream_ps(out + W, b);
            } else {
                _mm256_storeu_ps(out, a);
                _mm256_storeu_ps(out + W, b);
            }
            return;
        }
        __m256i packed;
        if (Dt == nf4::kFloat16) {
            const __m128i a = to_16bit<Dt>(even), b = to_16bit<Dt>(odd);
            packed = _mm256_set_m128i(_mm_unpackhi_epi16(a, b), _mm_unpacklo_epi16(a, b));
        } else if (_mm256_testz_ps(_mm256_cmp_ps(even, odd, _CMP_UNORD_Q),
                                   _mm256_castsi256_ps(_mm256_set1_epi32(-1)))) {
            // No NaN in the pair (one compare for both vectors): round without bf16_rounded_high's NaN blend. 32-bit
            // lane j takes element 2j's bf16 in its low word and element 2j + 1's in its high word.
            packed = _mm256_blend_epi16(_mm256_srli_epi32(bf16_rounded_high_finite(even), 16),
                                        bf16_rounded_high_finite(odd), 0xAA);
        } else {
            packed = _mm256_blend_epi16(_mm256_srli_epi32(bf16_rounded_high(even), 16), bf16_rounded_high(odd), 0xAA);
        }
        __m256i* out = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p.out) + e);
        if (Stream)
            _mm256_stream_si256(out, packed);
        else
            _mm256_storeu_si256(out, packed);
    }
};

#include "nf4_cpu_tiles.inc"

}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx2,fma,f16c")
namespace avx512 {
constexpr bool kHardwareBf16 = false;
constexpr bool kVbmi = false;
#include "nf4_cpu_ops_avx512.inc"
#include "nf4_cpu_tiles.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512bf16,avx512vbmi,avx2,fma,f16c")
namespace avx512bf16 {
constexpr bool kHardwareBf16 = true;
constexpr bool kVbmi = true;
#include "nf4_cpu_ops_avx512.inc"
#include "nf4_cpu_tiles.inc"
}  // namespace avx512bf16
#pragma GCC pop_options

#endif  // NF4_X86

bool cpu_supports(Isa isa) {
    switch (isa) {
        case Isa::kScalar: return true;
#if NF4_X86
        case Isa::kAvx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        case Isa::kAvx512:
            return cpu_supports(Isa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512dq");
        case Isa::kAvx512Bf16:
            return cpu_supports(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16") &&
                   __builtin_cpu_supports("avx512vbmi");
#endif
        default: return false;
    }
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::kAvx2: return "avx2";
        case Isa::kAvx512: return "avx512";
        case Isa::kAvx512Bf16: return "avx512bf16";
        default: return "scalar";
    }
}

int vector_width(Isa isa) {
    switch (isa) {
        case Isa::kAvx2: return 8;
        case Isa::kAvx512:
        case Isa::kAvx512Bf16: return 16;
        default: return 1;
    }
}

std::vector<std::string> supported_isas() {
    std::vector<std::string> names;
    for (Isa isa : kAllIsas)
        if (cpu_supports(isa)) names.push_back(isa_name(isa));
    return names;
}

Isa parse_isa(const std::string& name) {
    for (Isa isa : kAllIsas)
        if (name == isa_name(isa)) {
            if (!cpu_supports(isa)) throw std::invalid_argument("this CPU does not support isa '" + name + "'");
            return isa;
        }
    throw std::invalid_argument("unknown isa '" + name + "': expected 'auto', 'scalar', 'avx2', 'avx512' or 'avx512bf16'");
}

// The widest supported instruction set at most `limit` whose vector width divides cols; scalar otherwise.
Isa pick_isa(Isa limit, int64_t cols) {
    for (Isa isa : {Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2})
        if (isa <= limit && cpu_supports(isa) && cols % vector_width(isa) == 0) return isa;
    return Isa::kScalar;
}

using MergeFn = void (*)(const nf4::Problem&, int);

MergeFn merge_fn(Isa isa) {
    switch (isa) {
#if NF4_X86
        case Isa::kAvx2: return avx2::merge;
        case Isa::kAvx512: return avx512::merge;
        case Isa::kAvx512Bf16: return avx512bf16::merge;
#endif
        default: return scalar::merge;
    }
}

using FmaChainsFn = float (*)(int64_t);

FmaChainsFn fma_chains_fn(Isa isa) {
    switch (isa) {
#if NF4_X86
        case Isa::kAvx2: return avx2::fma_chains;
        case Isa::kAvx512: return avx512::fma_chains;
        case Isa::kAvx512Bf16: return avx512bf16::fma_chains;
#endif
        default: return scalar::fma_chains;
    }
}

// fp32 FMAs per second that `num_threads` threads sustain from registers on instruction set `isa`: the compute
// ceiling of the benchmark's FMA floor (a torch GEMM's rate understates it, by about half on AMD CPUs).
double peak_fma_rate(const std::string& isa, int num_threads) {
    nf4::require(num_threads >= 1, "num_threads must be positive");
    const Isa chosen = isa == "auto" ? pick_isa(Isa::kAvx512Bf16, 0) : parse_isa(isa);
    const FmaChainsFn chains = fma_chains_fn(chosen);
    constexpr int64_t kIterations = 1 << 22;
    py::gil_scoped_release release;
    double best = 0;
    for (int round = 0; round < 3; ++round) {
        std::vector<float> sums(num_threads);
        const auto start = std::chrono::steady_clock::now();
        std::vector<std::thread> workers;
        for (int t = 1; t < num_threads; ++t) workers.emplace_back([&, t] { sums[t] = chains(kIterations); });
        sums[0] = chains(kIterations);
        for (auto& worker : workers) worker.join();
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        best = std::max(best, 12.0 * vector_width(chosen) * kIterations * num_threads / seconds);
    }
    return best;
}

void dequant_merge_nf4(uintptr_t codes, uintptr_t absmax, bool nested, uintptr_t nested_absmax, uintptr_t nested_code,
                       float nested_offset, int64_t nested_blocksize, int64_t rows, int64_t cols, int64_t blocksize,
                       uintptr_t lora_A, uintptr_t lora_B, int64_t rank, float scale, uintptr_t out, int out_dtype,
                       int num_threads, const std::string& isa) {
    nf4::require(num_threads >= 1, "num_threads must be positive");
    const Isa limit = isa == "auto" ? Isa::kAvx512Bf16 : parse_isa(isa);
    const nf4::Problem p = nf4::make_problem(codes, absmax, nested, nested_absmax, nested_code, nested_offset,
                                             nested_blocksize, rows, cols, blocksize, lora_A, lora_B, rank, scale,
                                             out, out_dtype);
    if (rows == 0 || cols == 0) return;
    const Isa chosen = pick_isa(limit, cols);
    py::gil_scoped_release release;
    merge_fn(chosen)(p, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "pyprefopt C++ kernels: NF4 dequantisation fused with the LoRA merge (see pyprefopt/nf4.py)";
    m.def("dequant_merge_nf4", &dequant_merge_nf4, py::kw_only(), py::arg("codes"), py::arg("absmax"),
          py::arg("nested"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("nested_offset"),
          py::arg("nested_blocksize"), py::arg("rows"), py::arg("cols"), py::arg("blocksize"), py::arg("lora_A"),
          py::arg("lora_B"), py::arg("rank"), py::arg("scale"), py::arg("out"), py::arg("out_dtype"),
          py::arg("num_threads"), py::arg("isa") = "auto",
          "out[rows, cols] = NF4-decoded weight + scale * lora_B @ lora_A, from raw data pointers. The caller "
          "guarantees sizes, dtypes and contiguity (pyprefopt.nf4 checks them). isa: 'auto' (the widest the CPU "
          "has), or the widest allowed of 'scalar', 'avx2', 'avx512', 'avx512bf16'.");
    m.def("peak_fma_rate", &peak_fma_rate, py::kw_only(), py::arg("isa") = "auto", py::arg("num_threads") = 1,
          "fp32 FMAs per second that num_threads threads sustain from registers on isa ('auto': the widest).");
    m.def("supported_isas", &supported_isas, "The instruction sets this CPU can run, narrowest first.");
    m.def("nf4_code", [] { return std::vector<float>(kNF4Code, kNF4Code + 16); }, "The kernels' NF4 table.");
}
