// CUDA kernels of fastmeta::similarity_cross_entropy and its backward (see similarity_kernels.cuh).
#include "similarity_kernels.cuh"

namespace fastmeta::cuda {

template void launch_similarity_forward<SimilarityOp::CrossEntropy>(const SimilarityArgs&, void*, void*,
                                                              cudaStream_t);
template void launch_similarity_backward<SimilarityOp::CrossEntropy>(const SimilarityArgs&,
                                                               const SimilarityGrads&, cudaStream_t);

}  // namespace fastmeta::cuda
