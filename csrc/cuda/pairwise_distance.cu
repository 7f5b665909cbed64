// CUDA kernels of fastmeta::pairwise_distance and its backward (see similarity_kernels.cuh).
#include "similarity_kernels.cuh"

namespace fastmeta::cuda {

template void launch_similarity_forward<SimilarityOp::PairwiseDistance>(const SimilarityArgs&, void*, void*,
                                                              cudaStream_t);
template void launch_similarity_backward<SimilarityOp::PairwiseDistance>(const SimilarityArgs&,
                                                               const SimilarityGrads&, cudaStream_t);

}  // namespace fastmeta::cuda
