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
#include "nf4_problem.h"

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

void dequant_merge_nf4(uintptr_t codes, uintptr_t absmax, bool nested, uintptr_t nested_absmax, uintptr_t nested_code,
                       float nested_offset, int64_t nested_blocksize, int64_t rows, int64_t cols, int64_t blocksize,
                       uintptr_t lora_A, uintptr_t lora_B, int64_t rank, float scale, uintptr_t out, int out_dtype,
                       uintptr_t stream) {
    const nf4::Problem p = nf4::make_problem(codes, absmax, nested, nested_absmax, nested_code, nested_offset,
                                             nested_blocksize, rows, cols, blocksize, lora_A, lora_B, rank, scale,
                                             out, out_dtype);
    if (rows == 0 || cols == 0) return;
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
