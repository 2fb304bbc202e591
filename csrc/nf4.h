// Element maths of the NF4 dequant-merge, shared by the CPU kernel (dequant_merge_nf4.cpp) and the CUDA
// kernel (dequant_merge_nf4.cu), so the two cannot drift apart.
//
// bitsandbytes' NF4 format: the weight is flattened row-major and cut into blocks of `blocksize` elements
// (the last block may be short); element e is the 4-bit code in byte e / 2, high nibble for even e. Its value
// is NF4[code] * scale[e / blocksize], one fp32 multiply. The block scale is an fp32 absmax, or with double
// quantisation ("nested") a uint8 index decoded as nested_code[u8] * nested_absmax[block / nested_blocksize]
// + offset: an fp32 multiply, then an fp32 add. Bit-exactness with bitsandbytes needs exactly these
// roundings: no fused multiply-add may be contracted from them (host builds use -ffp-contract=off; device
// code spells the roundings out with __fmul_rn / __fadd_rn).
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define NF4_HD __host__ __device__ __forceinline__
#else
#define NF4_HD inline
#endif

namespace nf4 {

// bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), indexed by the 4-bit code.
#define NF4_CODE_VALUES                                                                               \
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, \
        -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f, \
        0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,          \
        0.7229568362236023f, 1.0f

// Output dtype codes; pyprefopt/nf4.py passes the same numbers.
enum OutDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Everything one merge reads and writes. absmax is float32[n_blocks], or uint8[n_blocks] when nested.
// lora_A is float32 [rank, cols] and lora_B float32 [rows, rank], both row-major; rank 0 means no delta.
struct Problem {
    const uint8_t* codes;
    const void* absmax;
    bool nested;
    const float* nested_absmax;
    const float* nested_code;
    float nested_offset;
    int nested_blocksize_log2;  // bitsandbytes' block sizes are powers of two: shifts, not divisions
    int64_t rows;
    int64_t cols;
    int blocksize_log2;
    const float* lora_A;
    const float* lora_B;
    int64_t rank;
    float scale;
    void* out;
    int out_dtype;
};

NF4_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

NF4_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

// The 4-bit code of element e: high nibble first.
NF4_HD unsigned nibble(const uint8_t* codes, int64_t e) {
    return (codes[e >> 1] >> ((e & 1) ? 0 : 4)) & 0xFu;
}

// The fp32 scale of block `block`, decoded exactly as bitsandbytes does.
NF4_HD float block_scale(const Problem& p, int64_t block) {
    if (!p.nested) return static_cast<const float*>(p.absmax)[block];
    const uint8_t q = static_cast<const uint8_t*>(p.absmax)[block];
    return add_rn(mul_rn(p.nested_code[q], p.nested_absmax[block >> p.nested_blocksize_log2]), p.nested_offset);
}

// The scaled rank-r delta lora_B[row, :] . (scale * lora_A[:, col]) as a chain of fused multiply-adds in k order
// from zero, each lora_A element scaled first: one fp32 rounding, exact when scale is a power of two (LoRA's usual
// alpha / r), and it lets the CPU tiles take lora_A pre-scaled once per call instead of multiplying every
// output element. Every path (scalar, AVX2, AVX-512, CUDA) computes it so, and they agree bit for bit.
NF4_HD float lora_delta(const Problem& p, int64_t row, int64_t col) {
    float acc = 0.0f;
    for (int64_t k = 0; k < p.rank; ++k)
        acc = fmaf(p.lora_B[row * p.rank + k], mul_rn(p.scale, p.lora_A[k * p.cols + col]), acc);
    return acc;
}

NF4_HD uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

// fp32 -> bf16 with round-to-nearest-even; NaN becomes the quiet NaN 0x7FC0 (torch's `.to(torch.bfloat16)`).
NF4_HD uint16_t bf16_bits(float f) {
    const uint32_t u = float_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// fp32 -> IEEE fp16 with round-to-nearest-even, overflow to infinity, subnormals kept (what F16C's
// vcvtps2ph and torch's `.to(torch.float16)` do).
NF4_HD uint16_t fp16_bits(float f) {
    const uint32_t u = float_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t mag = u & 0x7FFFFFFFu;
    if (mag > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);
    if (mag >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to infinity
    if (mag >= 0x38800000u) {                                               // normal in fp16: rebias 127 -> 15
        const uint32_t rebiased = mag - (112u << 23);
        return static_cast<uint16_t>(sign | ((rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13));
    }
    if (mag < 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25: rounds to (signed) zero
    // Subnormal in fp16: the value in units of 2^-24 is mantissa * 2^(exponent - 126), exponent in [102, 112].
    const uint32_t exponent = mag >> 23;
    const uint32_t mantissa = (mag & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exponent;
    uint32_t q = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
}

// Store the fp32 value of element e in the output dtype.
NF4_HD void store(const Problem& p, int64_t e, float v) {
    switch (p.out_dtype) {
        case kFloat32: static_cast<float*>(p.out)[e] = v; break;
        case kBFloat16: static_cast<uint16_t*>(p.out)[e] = bf16_bits(v); break;
        default: static_cast<uint16_t*>(p.out)[e] = fp16_bits(v); break;
    }
}

// One output element from scratch: decode, add the delta when there is one, store.
NF4_HD void merge_element(const Problem& p, const float* nf4_code, int64_t row, int64_t col) {
    const int64_t e = row * p.cols + col;
    float v = mul_rn(nf4_code[nibble(p.codes, e)], block_scale(p, e >> p.blocksize_log2));
    if (p.rank > 0) v = add_rn(v, lora_delta(p, row, col));
    store(p, e, v);
}

}  // namespace nf4
