/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Reading kernel structures through pointers the program holds as plain numbers, in one of two ways chosen when the
 * object is built (the Makefile builds both; kwatch/capture/bpf.py loads the first one the kernel accepts):
 *
 * - default: typed views made by the bpf_rdonly_cast() kfunc (Linux 6.2+): a field is a plain load guarded by the
 *   exception table (BPF_PROBE_MEM), a fault reads as 0; the verifier turns the kfunc call itself into a register
 *   move. A few times cheaper per field than a helper call.
 * - KW_PROBE_READ: one bpf_probe_read_kernel() per field (CO-RE relocated, BPF_CORE_READ), for kernels without that
 *   kfunc: Debian 12's 6.1 refuses the default object with "extern (func ksym) 'bpf_rdonly_cast': not found".
 *
 * KP(type, p) types the number p; KR(ptr, a, b...) reads ptr->a->b...; KR_INTO(dst, ptr, a...) copies ptr->a...
 * (a whole struct) into *dst. With KW_PROBE_READ a KP() pointer must only ever be read through KR()/KR_INTO().
 */
#ifndef KW_KREAD_H
#define KW_KREAD_H

#include <bpf/bpf_core_read.h>

#ifdef KW_PROBE_READ
#define KP(type, p) ((type *)(p))
#define KR(ptr, ...) BPF_CORE_READ(ptr, __VA_ARGS__)
#define KR_INTO(dst, ptr, ...) BPF_CORE_READ_INTO(dst, ptr, __VA_ARGS__)
#else
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;
#define KP(type, p) ((type *)bpf_rdonly_cast((const void *)(p), bpf_core_type_id_kernel(type)))
/* ___arrow(a, b, c) is libbpf's a->b->c (bpf_core_read.h) */
#define KR(ptr, ...) ((ptr)->___arrow(__VA_ARGS__))
#define KR_INTO(dst, ptr, ...) bpf_probe_read_kernel(dst, sizeof(*(dst)), &(ptr)->___arrow(__VA_ARGS__))
#endif

#endif
