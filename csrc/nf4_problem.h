// Host side, shared by the CPU (dequant_merge_nf4.cpp) and CUDA (dequant_merge_nf4.cu) entry points: the
// argument checks and the nf4::Problem both kernels run, built from the raw pointers pyprefopt/nf4.py passes.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "nf4.h"

namespace nf4 {

inline int log2_exact(int64_t n, const char* what) {
    if (n <= 0 || (n & (n - 1)) != 0) throw std::invalid_argument(std::string(what) + " must be a power of two");
    int log2 = 0;
    while ((int64_t{1} << log2) != n) ++log2;
    return log2;
}

inline void require(bool ok, const char* message) {
    if (!ok) throw std::invalid_argument(message);
}

// Checks the arguments (std::invalid_argument, a ValueError in Python) and returns the Problem; an empty
// output (rows or cols 0) needs no pointers and comes back with nothing to do.
inline Problem make_problem(uintptr_t codes, uintptr_t absmax, bool nested, uintptr_t nested_absmax,
                            uintptr_t nested_code, float nested_offset, int64_t nested_blocksize, int64_t rows,
                            int64_t cols, int64_t blocksize, uintptr_t lora_A, uintptr_t lora_B, int64_t rank,
                            float scale, uintptr_t out, int out_dtype) {
    require(rows >= 0 && cols >= 0 && rank >= 0, "rows, cols and rank must be non-negative");
    require(blocksize >= 32 && blocksize <= 4096, "blocksize must be in [32, 4096]");
    require(out_dtype >= kFloat32 && out_dtype <= kFloat16, "out_dtype must be 0 (fp32), 1 (bf16) or 2 (fp16)");
    Problem p{};
    p.blocksize_log2 = log2_exact(blocksize, "blocksize");
    p.nested_blocksize_log2 = nested ? log2_exact(nested_blocksize, "nested_blocksize") : 0;
    p.rows = rows;
    p.cols = cols;
    if (rows == 0 || cols == 0) return p;
    require(codes && absmax && out, "codes, absmax and out must be non-null");
    require(!nested || (nested_absmax && nested_code), "nested needs nested_absmax and nested_code");
    require(rank == 0 || (lora_A && lora_B), "rank > 0 needs lora_A and lora_B");
    p.codes = reinterpret_cast<const uint8_t*>(codes);
    p.absmax = reinterpret_cast<const void*>(absmax);
    p.nested = nested;
    p.nested_absmax = reinterpret_cast<const float*>(nested_absmax);
    p.nested_code = reinterpret_cast<const float*>(nested_code);
    p.nested_offset = nested_offset;
    p.lora_A = reinterpret_cast<const float*>(lora_A);
    p.lora_B = reinterpret_cast<const float*>(lora_B);
    p.rank = rank;
    p.scale = scale;
    p.out = reinterpret_cast<void*>(out);
    p.out_dtype = out_dtype;
    return p;
}

}  // namespace nf4
