// Host/device qualifiers shared by the CPU (g++) and CUDA (nvcc) builds.
//
// Every per-element function in csrc/include/deltaops is written once, marked
// DELTAOPS_HD, and compiled both into the CPU kernels and into the CUDA
// kernels, so the CPU test suite exercises the arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define DELTAOPS_HD __host__ __device__ __forceinline__
#else
#define DELTAOPS_HD inline __attribute__((always_inline))
#endif
