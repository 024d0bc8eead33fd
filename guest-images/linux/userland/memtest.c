/*
 * memtest: a userland workload for the VMM's Linux tests (freestanding, raw
 * system calls: sys.h). Reads /proc/meminfo, writes and verifies N MiB of
 * its own memory with a pattern (every page first-touched: guest #PFs and,
 * below them, stage-2 faults in the VMM), and prints a checksum the test
 * computes itself. With a second argument, also times a native user-mode
 * loop of that many million iterations (what the guest's emulated timer
 * tick leaves to user code).
 *
 *   memtest MIB [SPIN_MILLIONS]
 * prints:
 *   VMM-MEMTEST: MemTotal=<kB> MemFree=<kB>
 *   VMM-MEMTEST: ok mib=<N> words=<W> checksum=0x<16 hex> ms=<write+verify ms>
 *     (or: VMM-MEMTEST: bad=<n> mib=<N>)
 *   VMM-SPIN: millions=<M> ms=<ms>
 * Word i holds (i ^ 0x5EED) * 0x9E3779B97F4A7C15 (mod 2^64); the checksum
 * is the XOR of all words.
 */
#include "sys.h"

#define K 0x9E3779B97F4A7C15UL
#define SYS_clock_gettime 228
#define CLOCK_MONOTONIC 1

static u64 now_ms(void)
{
    struct {
        i64 sec, nsec;
    } ts = { 0, 0 };
    sys3(SYS_clock_gettime, CLOCK_MONOTONIC, &ts, 0);
    return (u64)ts.sec * 1000 + (u64)ts.nsec / 1000000;
}

/* The number after `key` in `text`, 0 if absent. */
static u64 field(const char *text, const char *key)
{
    u64 kl = slen(key);
    for (const char *p = text; *p; p++) {
        u64 i = 0;
        while (i < kl && p[i] == key[i])
            i++;
        if (i == kl) {
            p += kl;
            while (*p == ' ')
                p++;
            return parse_u(p);
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    u64 mib = argc > 1 ? parse_u(argv[1]) : 8;
    u64 spin = argc > 2 ? parse_u(argv[2]) : 0;
    static char info[4096];
    struct line l = { .n = 0 };
    i64 fd = sys3(SYS_open, "/proc/meminfo", 0, 0);
    i64 got = fd >= 0 ? sys3(SYS_read, fd, info, sizeof info - 1) : 0;
    info[got > 0 ? got : 0] = 0;
    if (fd >= 0)
        sys3(SYS_close, fd, 0, 0);
    put(&l, "VMM-MEMTEST: MemTotal=");
    put_u(&l, field(info, "MemTotal:"));
    put(&l, " MemFree=");
    put_u(&l, field(info, "MemFree:"));
    flush_line(&l);

    u64 words = mib * 1024 * 1024 / 8;
    /* PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS */
    i64 m = sys6(SYS_mmap, 0, (i64)(words * 8), 3, 0x22, -1, 0);
    if (m < 0 && m > -4096) {
        put(&l, "VMM-MEMTEST: mmap failed mib=");
        put_u(&l, mib);
        flush_line(&l);
        return 1;
    }
    volatile u64 *p = (volatile u64 *)m;
    u64 t0 = now_ms();
    for (u64 i = 0; i < words; i++)
        p[i] = (i ^ 0x5EED) * K;
    u64 sum = 0, bad = 0;
    for (u64 i = 0; i < words; i++) {
        u64 v = p[i];
        bad += v != (i ^ 0x5EED) * K;
        sum ^= v;
    }
    u64 ms = now_ms() - t0;
    if (bad) {
        put(&l, "VMM-MEMTEST: bad=");
        put_u(&l, bad);
        put(&l, " mib=");
        put_u(&l, mib);
    } else {
        put(&l, "VMM-MEMTEST: ok mib=");
        put_u(&l, mib);
        put(&l, " words=");
        put_u(&l, words);
        put(&l, " checksum=");
        put_hex(&l, sum);
        put(&l, " ms=");
        put_u(&l, ms);
    }
    flush_line(&l);
    if (spin) {
        u64 t1 = now_ms();
        volatile u64 x = 0;
        for (u64 i = 0; i < spin * 1000000; i++)
            x += i;
        put(&l, "VMM-SPIN: millions=");
        put_u(&l, spin);
        put(&l, " ms=");
        put_u(&l, now_ms() - t1);
        flush_line(&l);
    }
    return bad != 0;
}
