// pyprefopt._C_cuda: the CUDA NF4 dequant-merge, the same element maths as the CPU kernel (nf4.h).
//
// One thread per output element, grid-stride: decode, add the rank-r delta (lora_A rows are read coalesced
// across a warp, the lora_B row is a broadcast), store once. Launched from raw device pointers on the caller's
// stream (an integer handle, torch.cuda.current_stream().cuda_stream), so no libtorch headers are needed;
// pyprefopt/nf4.py validates dtypes, sizes, devices and contiguity first. setup.py builds it only when nvcc
// and a CUDA torch are present; tests/test_dequant_merge_nf4.py compiles it with nvcc everywhere.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "nf4.h"

namespace py = pybind11;

namespace {

__constant__ float kNF4Code[16] = {NF4_CODE_VALUES};

constexpr int kThreadsPerBlock = 256;
constexpr int64_t kMaxBlocks = 65535;

__global__ void dequant_merge_nf4_kernel(nf4::Problem p) {
    const int64_t numel = p.rows * p.cols;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride)
        nf4::merge_element(p, kNF4Code, e / p.cols, e % p.cols);
}

int log2_exact(int64_t n, const char* what) {
    if (n <= 0 || (n & (n - 1)) != 0) throw std::invalid_argument(std::string(what) + " must be a power of two");
    int log2 = 0;
    while ((int64_t{1} << log2) != n) ++log2;
    return log2;
}

void dequant_merge_nf4(uintptr_t codes, uintptr_t absmax, bool nested, uintptr_t nested_absmax, uintptr_t nested_code,
                       float nested_offset, int64_t nested_blocksize, int64_t rows, int64_t cols, int64_t blocksize,
                       uintptr_t lora_A, uintptr_t lora_B, int64_t rank, float scale, uintptr_t out, int out_dtype,
                       uintptr_t stream) {
    if (rows < 0 || cols < 0 || rank < 0) throw std::invalid_argument("rows, cols and rank must be non-negative");
    if (out_dtype < nf4::kFloat32 || out_dtype > nf4::kFloat16)
        throw std::invalid_argument("out_dtype must be 0 (fp32), 1 (bf16) or 2 (fp16)");
    nf4::Problem p{};
    p.blocksize_log2 = log2_exact(blocksize, "blocksize");
    p.nested_blocksize_log2 = nested ? log2_exact(nested_blocksize, "nested_blocksize") : 0;
    if (rows == 0 || cols == 0) return;
    if (!codes || !absmax || !out) throw std::invalid_argument("codes, absmax and out must be non-null");
    if (nested && (!nested_absmax || !nested_code)) throw std::invalid_argument("nested needs nested_absmax and nested_code");
    if (rank > 0 && (!lora_A || !lora_B)) throw std::invalid_argument("rank > 0 needs lora_A and lora_B");
    p.codes = reinterpret_cast<const uint8_t*>(codes);
    p.absmax = reinterpret_cast<const void*>(absmax);
    p.nested = nested;
    p.nested_absmax = reinterpret_cast<const float*>(nested_absmax);
    p.nested_code = reinterpret_cast<const float*>(nested_code);
    p.nested_offset = nested_offset;
    p.rows = rows;
    p.cols = cols;
    p.lora_A = reinterpret_cast<const float*>(lora_A);
    p.lora_B = reinterpret_cast<const float*>(lora_B);
    p.rank = rank;
    p.scale = scale;
    p.out = reinterpret_cast<void*>(out);
    p.out_dtype = out_dtype;
    const int64_t blocks = std::min(kMaxBlocks, (rows * cols + kThreadsPerBlock - 1) / kThreadsPerBlock);
    dequant_merge_nf4_kernel<<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) throw std::runtime_error(std::string("dequant_merge_nf4 launch: ") + cudaGetErrorString(status));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
    m.doc() = "pyprefopt CUDA kernels: NF4 dequantisation fused with the LoRA merge (see pyprefopt/nf4.py)";
    m.def("dequant_merge_nf4", &dequant_merge_nf4, py::kw_only(), py::arg("codes"), py::arg("absmax"),
          py::arg("nested"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("nested_offset"),
          py::arg("nested_blocksize"), py::arg("rows"), py::arg("cols"), py::arg("blocksize"), py::arg("lora_A"),
          py::arg("lora_B"), py::arg("rank"), py::arg("scale"), py::arg("out"), py::arg("out_dtype"),
          py::arg("stream"),
          "out[rows, cols] = NF4-decoded weight + scale * lora_B @ lora_A on `stream`, from raw device pointers.");
}
