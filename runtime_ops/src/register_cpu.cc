// Entry point of libmqc_ops_cpu.so: onnxruntime calls RegisterCustomOps from register_custom_ops_library.
#include "ops.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api) {
  return mqc::register_domain(options, api, /*add_more=*/nullptr);
}
