/*
 * init80: a freestanding 32-bit /init whose system calls are `int $0x80`
 * (no libc: glibc's i386 start-up dispatches on CPUID, and under PVM the
 * guest sees host CPUID bits, e.g. AVX without OS support, and faults).
 * Same protocol and pattern as init.c.
 */
typedef unsigned int u32;
typedef unsigned long long u64;

static int sys1(int nr, int a) { int r; __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a) : "memory"); return r; }
static int sys3(int nr, int a, int b, int c) { int r; __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory"); return r; }
static int sys4(int nr, int a, int b, int c, int d) { int r; __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c), "S"(d) : "memory"); return r; }

static u32 len(const char *s) { u32 n = 0; while (s[n]) n++; return n; }
static void say(const char *s) { sys3(4, 1, (int)s, (int)len(s)); sys3(4, 1, (int)"\n", 1); }
static void hex(char *out, u64 v) { for (int i = 15; i >= 0; i--) { out[i] = "0123456789abcdef"[v & 15]; v >>= 4; } out[16] = 0; }

#define WORDS (8u << 20)            /* 64 MiB of u64 */

void start(void)
{
    say("VMM-INIT-MARKER: /init started");
    u32 base = (u32)sys1(45, 0);            /* brk(0): current break */
    u32 want = base + WORDS * 8u;
    if ((u32)sys1(45, (int)want) < want) {
        say("VMM-INIT-ERROR: brk failed");
    } else {
        volatile u64 *w = (volatile u64 *)base;
        for (u32 i = 0; i < WORDS; i++)
            w[i] = ((u64)i ^ 0x5eedULL) * 0x9e3779b97f4a7c15ULL;
        u64 sum = 0; u32 errors = 0;
        for (u32 i = 0; i < WORDS; i++) {
            u64 v = w[i];
            if (v != (((u64)i ^ 0x5eedULL) * 0x9e3779b97f4a7c15ULL)) errors++;
            sum ^= v;
        }
        char line[96] = "VMM-INIT-CHECKSUM: ok words=8388608 checksum=0x";
        if (errors) {
            say("VMM-INIT-CHECKSUM: FAIL");
        } else {
            hex(line + len(line), sum);
            say(line);
        }
    }
    say("VMM-INIT-MARKER: rebooting");
    sys1(36, 0);                                            /* sync */
    sys4(88, 0xfee1dead, 672274793, 0x01234567, 0);         /* reboot(RB_AUTOBOOT) */
    for (;;) sys1(29, 0);                                   /* pause */
}
