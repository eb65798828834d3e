// Schemas of the loss-aggregation ops in the `fastweight` namespace.
//
// A FRAGMENT, so that the Python layer may define more ops in the same namespace with
// torch.library.custom_op. Kernels: aggregation.cpp (CPU), aggregation_cuda_ops.cpp (CUDA).
// The ops are called only inside fastweight's Python custom ops (fastweight/aggregation), so
// they need no fake (meta) kernels and no autograd of their own.

#include <torch/library.h>

#include <string>

// The build passes a hash of the sources and the torch version as a bare token:
// -DFASTWEIGHT_BUILD_KEY=k0123abcd... (see fastweight/extension/build.py: build_key).
#define FASTWEIGHT_STR2(x) #x
#define FASTWEIGHT_STR(x) FASTWEIGHT_STR2(x)
#ifdef FASTWEIGHT_BUILD_KEY
#define FASTWEIGHT_BUILD_KEY_STR FASTWEIGHT_STR(FASTWEIGHT_BUILD_KEY)
#else
#define FASTWEIGHT_BUILD_KEY_STR "unknown"
#endif

// The marker lets the loader check the key in the shared object without loading it; `used` and
// external linkage keep the whole string in .rodata.
extern "C" __attribute__((used, visibility("default"))) const char fastweight_build_key_marker[] =
    "fastweight-build-key:" FASTWEIGHT_BUILD_KEY_STR ";";

namespace fastweight {
namespace {

std::string ext_info() {
  std::string s = "devices=cpu";
#ifdef FASTWEIGHT_WITH_CUDA
  s += ",cuda";
#endif
#ifdef _OPENMP
  s += " openmp=1";
#else
  s += " openmp=0";
#endif
  s += " ";
  s += fastweight_build_key_marker;
  return s;
}

}  // namespace
}  // namespace fastweight

TORCH_LIBRARY_FRAGMENT(fastweight, m) {
  m.def(
      "agg_coefficients(Tensor valid, Tensor cu_seqlens, Tensor? sample_weights, Tensor? token_weights, "
      "bool per_sample_mean) -> (Tensor, Tensor)");
  m.def("agg_segment_mean(Tensor values, Tensor cu_seqlens, Tensor valid) -> (Tensor, Tensor)");
  m.def("agg_segment_mean_backward(Tensor grad_means, Tensor cu_seqlens, Tensor counts, Tensor valid) -> Tensor");
  m.def("agg_ext_info() -> str", &fastweight::ext_info);
}

// When built by setup.py as the Python module fastweight._C, `import fastweight._C` loads the
// ops; the module itself is empty. (The JIT build is loaded with torch.ops.load_library.)
#ifdef FASTWEIGHT_PYTHON_MODULE
#include <Python.h>

static struct PyModuleDef fastweight_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                                 "fastweight loss-aggregation ops (torch.ops.fastweight.agg_*)",
                                                 -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastweight_c_module); }
#endif
