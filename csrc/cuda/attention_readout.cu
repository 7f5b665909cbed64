// CUDA kernels of fastmeta::attention_readout and its backward (see similarity_kernels.cuh).
#include "similarity_kernels.cuh"

namespace fastmeta::cuda {

template void launch_similarity_forward<SimilarityOp::AttentionReadout>(const SimilarityArgs&, void*, void*,
                                                              cudaStream_t);
template void launch_similarity_backward<SimilarityOp::AttentionReadout>(const SimilarityArgs&,
                                                               const SimilarityGrads&, cudaStream_t);

}  // namespace fastmeta::cuda
