// Hand-written CUDA kernels for torchmatgrad::linear and its backward (to come).
#include <torch/library.h>
