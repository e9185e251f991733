// TASKMOE_MULTIVERSION: build a hot loop twice (target_clones), an x86-64-v3 (AVX2/FMA/F16C) version and the
// baseline, and let the loader pick one per machine, so bf16/fp16 conversions vectorize where the CPU allows while
// the extension still runs everywhere. Only the marked bodies (and what the compiler inlines into them) get AVX2
// code; anything they call out of line keeps the baseline ISA.
#pragma once

// GCC >= 12 dispatches "arch=x86-64-v3" clones on the CPU's features (AVX2, FMA, F16C, ...), not its model.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define TASKMOE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#ifndef TASKMOE_MULTIVERSION
#define TASKMOE_MULTIVERSION
#endif
