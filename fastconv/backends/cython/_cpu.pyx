# CPU features that choose the variant of the compiled kernels (``_variant.load``).
#
# Compiled for the baseline (no -march), so that it imports on every CPU; the queries use the
# GCC/Clang builtins, which also check that the OS saves the vector registers (XGETBV). On
# other compilers or CPUs every query answers False and the baseline variant runs.

cdef extern from *:
    """
    #if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    #define FASTCONV_X86 1
    #if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
    static int fastconv_x86_64_v3(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("x86-64-v3");
    }
    static int fastconv_x86_64_v4(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("x86-64-v4");
    }
    #else
    static int fastconv_x86_64_v3(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")
            && __builtin_cpu_supports("f16c");
    }
    static int fastconv_x86_64_v4(void) {
        return fastconv_x86_64_v3() && __builtin_cpu_supports("avx512f")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd")
            && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    }
    #endif
    #else
    #define FASTCONV_X86 0
    static int fastconv_x86_64_v3(void) { return 0; }
    static int fastconv_x86_64_v4(void) { return 0; }
    #endif
    """
    int FASTCONV_X86
    int fastconv_x86_64_v3() noexcept nogil
    int fastconv_x86_64_v4() noexcept nogil


def cpu_features():
    """The instruction-set levels this CPU (and OS) runs, as a dict of bools:
    ``x86`` (an x86 build with the GCC/Clang feature builtins), ``avx2`` (x86-64-v3: AVX2,
    FMA, BMI1/2, F16C), ``avx512`` (x86-64-v4: AVX-512 F, BW, CD, DQ, VL)."""
    return dict(x86=bool(FASTCONV_X86), avx2=bool(fastconv_x86_64_v3()),
                avx512=bool(fastconv_x86_64_v4()))
