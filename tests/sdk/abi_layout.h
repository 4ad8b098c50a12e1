/* The ABI 1.x layout of conflux/plugin.h, pinned: included by abi_c11.c (C11) and abi_cxx.cc
   (C++17 and C++20) so that a field moved, retyped or inserted anywhere but at the end of a struct
   fails the build, and C and C++ are proved to agree. Appending a field at the end (a minor ABI
   bump) only changes the sizeof lines: update them with the new CFX_ABI_MINOR. */
#ifndef CONFLUX_TEST_ABI_LAYOUT_H
#define CONFLUX_TEST_ABI_LAYOUT_H

#include <conflux/plugin.h>

#ifdef __cplusplus
#define CFX_TEST_ASSERT(cond) static_assert(cond, #cond)
#else
#define CFX_TEST_ASSERT(cond) _Static_assert(cond, #cond)
#endif

/* Everywhere: every struct starts with its size. */
CFX_TEST_ASSERT(offsetof(cfx_param_spec, struct_size) == 0);
CFX_TEST_ASSERT(offsetof(cfx_param_value, struct_size) == 0);
CFX_TEST_ASSERT(offsetof(cfx_tensor, struct_size) == 0);
CFX_TEST_ASSERT(offsetof(cfx_chunk, struct_size) == 0);
CFX_TEST_ASSERT(offsetof(cfx_job, struct_size) == 0);
CFX_TEST_ASSERT(offsetof(cfx_pass, struct_size) == 0);
CFX_TEST_ASSERT(offsetof(cfx_plugin, struct_size) == 0);
CFX_TEST_ASSERT(offsetof(cfx_host, struct_size) == 0);
CFX_TEST_ASSERT(offsetof(cfx_plugin, abi_major) == 4 && offsetof(cfx_plugin, abi_minor) == 6);
CFX_TEST_ASSERT(offsetof(cfx_host, abi_major) == 4 && offsetof(cfx_host, abi_minor) == 6);
CFX_TEST_ASSERT(CFX_ABI_MAJOR == 1);

/* LP64 (x86-64 and AArch64 Linux): the whole ABI 1.4 layout. */
#if defined(__LP64__)
CFX_TEST_ASSERT(sizeof(cfx_param_spec) == 72);
CFX_TEST_ASSERT(offsetof(cfx_param_spec, name) == 16);
CFX_TEST_ASSERT(offsetof(cfx_param_spec, default_number) == 32);
CFX_TEST_ASSERT(offsetof(cfx_param_spec, default_string) == 40);
CFX_TEST_ASSERT(offsetof(cfx_param_spec, min) == 48);
CFX_TEST_ASSERT(offsetof(cfx_param_spec, choices) == 64);
CFX_TEST_ASSERT(sizeof(cfx_param_value) == 40);
CFX_TEST_ASSERT(offsetof(cfx_param_value, number) == 8);
CFX_TEST_ASSERT(offsetof(cfx_param_value, list_length) == 32);
CFX_TEST_ASSERT(sizeof(cfx_tensor) == 56); /* 48 in ABI 1.0 */
CFX_TEST_ASSERT(offsetof(cfx_tensor, in_precision) == 48 && offsetof(cfx_tensor, out_precision) == 52);
CFX_TEST_ASSERT(offsetof(cfx_tensor, index) == 8);
CFX_TEST_ASSERT(offsetof(cfx_tensor, shape) == 24);
CFX_TEST_ASSERT(offsetof(cfx_tensor, row_length) == 40);
CFX_TEST_ASSERT(sizeof(cfx_chunk) == 80); /* 48 in ABI 1.0 and 1.1, 64 in 1.2 */
CFX_TEST_ASSERT(offsetof(cfx_chunk, out) == 64 && offsetof(cfx_chunk, out_written) == 72);
CFX_TEST_ASSERT(offsetof(cfx_chunk, bf16_models) == 48 && offsetof(cfx_chunk, bf16_base) == 56);
CFX_TEST_ASSERT(offsetof(cfx_chunk, tensor) == 8);
CFX_TEST_ASSERT(offsetof(cfx_chunk, begin) == 16);
CFX_TEST_ASSERT(offsetof(cfx_chunk, models) == 32);
CFX_TEST_ASSERT(offsetof(cfx_chunk, base) == 40);
CFX_TEST_ASSERT(sizeof(cfx_job) == 72);
CFX_TEST_ASSERT(offsetof(cfx_job, host) == 8);
CFX_TEST_ASSERT(offsetof(cfx_job, has_base) == 24);
CFX_TEST_ASSERT(offsetof(cfx_job, params) == 32);
CFX_TEST_ASSERT(offsetof(cfx_job, seed) == 40);
CFX_TEST_ASSERT(offsetof(cfx_job, model_names) == 64);
CFX_TEST_ASSERT(sizeof(cfx_pass) == 80); /* 72 before ABI 1.4 */
CFX_TEST_ASSERT(offsetof(cfx_pass, stats_size) == 16);
CFX_TEST_ASSERT(offsetof(cfx_pass, reduce) == 24);
CFX_TEST_ASSERT(offsetof(cfx_pass, combine) == 32);
CFX_TEST_ASSERT(offsetof(cfx_pass, reduce_done) == 40);
CFX_TEST_ASSERT(offsetof(cfx_pass, map) == 48);
CFX_TEST_ASSERT(offsetof(cfx_pass, instance_stats_size) == 56);
CFX_TEST_ASSERT(offsetof(cfx_pass, enabled) == 64);
CFX_TEST_ASSERT(offsetof(cfx_pass, instance_stats_unzeroed) == 72);
CFX_TEST_ASSERT(sizeof(cfx_plugin) == 96);
CFX_TEST_ASSERT(offsetof(cfx_plugin, id) == 8);
CFX_TEST_ASSERT(offsetof(cfx_plugin, param_count) == 32);
CFX_TEST_ASSERT(offsetof(cfx_plugin, params) == 40);
CFX_TEST_ASSERT(offsetof(cfx_plugin, passes) == 48);
CFX_TEST_ASSERT(offsetof(cfx_plugin, min_models) == 56);
CFX_TEST_ASSERT(offsetof(cfx_plugin, base) == 64);
CFX_TEST_ASSERT(offsetof(cfx_plugin, create) == 72);
CFX_TEST_ASSERT(offsetof(cfx_plugin, destroy) == 88);
CFX_TEST_ASSERT(sizeof(cfx_host) == 72);
CFX_TEST_ASSERT(offsetof(cfx_host, log) == 8);
CFX_TEST_ASSERT(offsetof(cfx_host, fail) == 16);
CFX_TEST_ASSERT(offsetof(cfx_host, set_report) == 24);
CFX_TEST_ASSERT(offsetof(cfx_host, random_key) == 32);
CFX_TEST_ASSERT(offsetof(cfx_host, random_uniform) == 40);
CFX_TEST_ASSERT(offsetof(cfx_host, axpy) == 48);
CFX_TEST_ASSERT(offsetof(cfx_host, scale) == 56);
CFX_TEST_ASSERT(offsetof(cfx_host, dot) == 64);
#endif

#endif /* CONFLUX_TEST_ABI_LAYOUT_H */
