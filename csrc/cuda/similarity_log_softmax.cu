// CUDA kernels of fastmeta::similarity_log_softmax and its backward (see similarity_kernels.cuh).
#include "similarity_kernels.cuh"

namespace fastmeta::cuda {

template void launch_similarity_forward<SimilarityOp::LogSoftmax>(const SimilarityArgs&, void*, void*,
                                                              cudaStream_t);
template void launch_similarity_backward<SimilarityOp::LogSoftmax>(const SimilarityArgs&,
                                                               const SimilarityGrads&, cudaStream_t);

}  // namespace fastmeta::cuda
