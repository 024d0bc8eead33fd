/*
 * ymmcheck: do two processes' AVX (YMM) registers survive each other?
 * Guest user code runs natively on PVM hosts and can use the host's AVX,
 * while a `noxsave` guest kernel saves only the FXSAVE part (XMM, the low
 * 128 bits) on a task switch. Two processes fill ymm0..ymm15 with their own
 * pattern, make a sched_yield system call (the other one runs), and check
 * all 256 bits, many times. Freestanding (sys.h).
 *
 *   ymmcheck ROUNDS
 * prints, per process, then for the pair:
 *   VMM-YMM: pid=<p> rounds=<n> bad=<lanes>
 *   VMM-YMM: result ok|corrupted (rounds=<n> osxsave=<0|1>)
 *          | skipped (no AVX) | faulted (AVX raises #UD: signal <n>)
 * (with xcr0=<XCR0 seen by XGETBV> when CPUID says OSXSAVE)
 */
#include "sys.h"

/* XCR0 as this process runs with it (XGETBV needs CR4.OSXSAVE). */
static u64 xcr0(void)
{
    u32 lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((u64)hi << 32) | lo;
}

static void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

__attribute__((target("avx"))) static u64 round_trip(u64 v)
{
    u64 out[16][4] __attribute__((aligned(32)));
    u64 in[4] __attribute__((aligned(32))) = { v, v ^ 1, v ^ 2, v ^ 3 };
    long nr = SYS_sched_yield;
    __asm__ volatile(
        "vmovdqa (%1), %%ymm0\n vmovdqa (%1), %%ymm1\n vmovdqa (%1), %%ymm2\n vmovdqa (%1), %%ymm3\n"
        "vmovdqa (%1), %%ymm4\n vmovdqa (%1), %%ymm5\n vmovdqa (%1), %%ymm6\n vmovdqa (%1), %%ymm7\n"
        "vmovdqa (%1), %%ymm8\n vmovdqa (%1), %%ymm9\n vmovdqa (%1), %%ymm10\n vmovdqa (%1), %%ymm11\n"
        "vmovdqa (%1), %%ymm12\n vmovdqa (%1), %%ymm13\n vmovdqa (%1), %%ymm14\n vmovdqa (%1), %%ymm15\n"
        "syscall\n"
        "vmovdqa %%ymm0, 0(%2)\n vmovdqa %%ymm1, 32(%2)\n vmovdqa %%ymm2, 64(%2)\n"
        "vmovdqa %%ymm3, 96(%2)\n vmovdqa %%ymm4, 128(%2)\n vmovdqa %%ymm5, 160(%2)\n"
        "vmovdqa %%ymm6, 192(%2)\n vmovdqa %%ymm7, 224(%2)\n vmovdqa %%ymm8, 256(%2)\n"
        "vmovdqa %%ymm9, 288(%2)\n vmovdqa %%ymm10, 320(%2)\n vmovdqa %%ymm11, 352(%2)\n"
        "vmovdqa %%ymm12, 384(%2)\n vmovdqa %%ymm13, 416(%2)\n vmovdqa %%ymm14, 448(%2)\n"
        "vmovdqa %%ymm15, 480(%2)\n"
        : "+a"(nr)
        : "r"(in), "r"(out)
        : "rcx", "r11", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
          "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    u64 bad = 0;
    for (int r = 0; r < 16; r++)
        for (int l = 0; l < 4; l++)
            bad += out[r][l] != in[l];
    return bad;
}

static int child(u64 seed, u64 rounds)
{
    u64 bad = 0;
    for (u64 i = 0; i < rounds; i++)
        bad += round_trip(seed * 0x9E3779B97F4A7C15UL + i);
    struct line l = { .n = 0 };
    put(&l, "VMM-YMM: pid=");
    put_u(&l, (u64)sys3(SYS_getpid, 0, 0, 0));
    put(&l, " rounds=");
    put_u(&l, rounds);
    put(&l, " bad=");
    put_u(&l, bad);
    flush_line(&l);
    return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
    u64 rounds = argc > 1 ? parse_u(argv[1]) : 1000;
    u32 a, b, c, d;
    struct line l = { .n = 0 };
    cpuid(1, &a, &b, &c, &d);
    u32 osxsave = (c >> 27) & 1;
    if (!((c >> 28) & 1)) {
        put(&l, "VMM-YMM: result skipped (no AVX)");
        flush_line(&l);
        return 0;
    }
    i64 kids[2];
    for (int k = 0; k < 2; k++) {
        kids[k] = sys3(SYS_fork, 0, 0, 0);
        if (kids[k] == 0)
            sys_exit(child((u64)k + 1, rounds));
    }
    int bad = 0, sig = 0;
    for (int k = 0; k < 2; k++) {
        int st = 0;
        sys6(SYS_wait4, kids[k], (i64)&st, 0, 0, 0, 0);
        if (st & 0x7f)
            sig = st & 0x7f; /* killed by a signal */
        else
            bad += ((st >> 8) & 0xff) != 0;
    }
    if (sig) {
        put(&l, "VMM-YMM: result faulted (AVX raises #UD: signal ");
        put_u(&l, (u64)sig);
        put(&l, ")");
    } else {
        put(&l, bad ? "VMM-YMM: result corrupted (rounds=" : "VMM-YMM: result ok (rounds=");
        put_u(&l, rounds);
        put(&l, " osxsave=");
        put_u(&l, osxsave);
        if (osxsave) {
            put(&l, " xcr0=");
            put_hex(&l, xcr0());
        }
        put(&l, ")");
    }
    flush_line(&l);
    return bad != 0 || sig;
}
