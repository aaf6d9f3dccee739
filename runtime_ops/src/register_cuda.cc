// Entry point of libmqc_ops_cuda.so: the CPU kernels of every op plus the CUDA execution-provider kernels.
#include "ops.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api) {
  return mqc::register_domain(options, api, &mqc::add_cuda_ops);
}
