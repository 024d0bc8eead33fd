/*
 * memstress: RAM pattern/image checks around VMM phase markers (port 0x502), for
 * page discards, image-backed RAM and memslot churn. See ../README.md for keys,
 * modes and output.
 *
 * Every vCPU works on its contiguous share of the words base + k*stride; vCPU 0
 * sends the markers between barriers, so no vCPU touches the region while the VMM
 * acts on a marker.
 */
#include "../common/lib.h"

#define IMG_XOR     0x1badb002UL        /* img(o) = (o ^ IMG_XOR) * PATTERN_MUL */
#define MAX_REPORTS 4                   /* bad words printed per vCPU per pass */
#define ALWAYS_INLINE inline __attribute__((always_inline))

enum { MODE_PATTERN = 0, MODE_IMAGE = 1, MODE_WRITE_VERIFY = 2 };

static struct barrier bar;
/* Totals of the current pass: vCPUs add into them between two barriers; vCPU 0 reads
 * and clears them after the second one, before the barrier that opens the next pass. */
static u64 tot_ok, tot_zero, tot_bad;

struct counts {
    u64 zero;
    u64 bad;
};

static void atomic_add(u64 *p, u64 v)
{
    __asm__ volatile("lock xaddq %0, %1" : "+r"(v), "+m"(*p) :: "memory");
}

/* Words a = start + i*stride, i < n, get ((a ^ s) * K) | 1: 5 instructions per word
 * plus 3 per 4 words (unrolled x4). */
static void fill(u64 start, u64 n, u64 stride, u64 s)
{
    const u64 K = PATTERN_MUL;
    u64 a = start;
    u64 end4 = start + (n & ~3UL) * stride;
    u64 stride3 = stride * 3;

    for (; a != end4; a += 4 * stride) {
        *(u64 *)a = ((a ^ s) * K) | 1;
        *(u64 *)(a + stride) = (((a + stride) ^ s) * K) | 1;
        *(u64 *)(a + 2 * stride) = (((a + 2 * stride) ^ s) * K) | 1;
        *(u64 *)(a + stride3) = (((a + stride3) ^ s) * K) | 1;
    }
    for (u64 end = a + (n & 3) * stride; a != end; a += stride)
        *(u64 *)a = ((a ^ s) * K) | 1;
}

/* order=random: before fill(), store the same values in a seeded permutation
 * of the words (word j*step mod n, step coprime with n and far from 1), so
 * the first touch of each page comes in an order no sequential detector
 * follows. fill() then rewrites present pages. */
static void scatter(u64 start, u64 n, u64 stride, u64 s, u64 seed)
{
    const u64 K = PATTERN_MUL;
    if (n < 2)
        return;
    u64 step = coprime_step(n, seed);
    u64 i = 0;
    for (u64 j = 0; j < n; j++) {
        u64 a = start + i * stride;
        *(u64 *)a = ((a ^ s) * K) | 1;
        i += step;
        if (i >= n)
            i -= n;
    }
}

/* Slow path for a word that does not hold the expected value. */
__attribute__((noinline, cold))
static void odd_word(u64 addr, u64 want, int zero_ok, struct counts *c, u64 cpu)
{
    u64 got = *(volatile u64 *)addr;
    if (got == 0 && zero_ok) {
        c->zero++;
        return;
    }
    if (c->bad < MAX_REPORTS)
        printk("memstress cpu=%lu bad addr=0x%lx got=0x%016lx want=0x%016lx\n",
               cpu, addr, got, want);
    c->bad++;
}

/* Fast path: lea/xor/imul/[or]/cmp-mem/jne = 5-6 instructions per word. */
#define CHECK_WORD(addr)                                                     \
    do {                                                                     \
        u64 a_ = (addr);                                                     \
        u64 w_ = ((a_ ^ s) * K) | orbit;                                     \
        if (unlikely(*(const u64 *)a_ != w_))                                \
            odd_word(a_, w_, zero_ok, c, cpu);                               \
    } while (0)

/* Compares each word with ((a ^ s) * K) | orbit; counts zero words (if zero_ok) and
 * bad ones into *c. Instantiated with constant orbit/zero_ok by the wrappers below. */
static ALWAYS_INLINE void check(u64 start, u64 n, u64 stride, u64 s, u64 orbit,
                                int zero_ok, struct counts *c, u64 cpu)
{
    const u64 K = PATTERN_MUL;
    u64 a = start;
    u64 end4 = start + (n & ~3UL) * stride;
    u64 stride3 = stride * 3;

    for (; a != end4; a += 4 * stride) {
        CHECK_WORD(a);
        CHECK_WORD(a + stride);
        CHECK_WORD(a + 2 * stride);
        CHECK_WORD(a + stride3);
    }
    for (u64 end = a + (n & 3) * stride; a != end; a += stride)
        CHECK_WORD(a);
}

/* mode 0: pattern, zero or bad */
static void check_pattern(u64 start, u64 n, u64 stride, u64 s, struct counts *c, u64 cpu)
{
    check(start, n, stride, s, 1, 1, c, cpu);
}

/* mode 2: anything but the pattern (zero included) is bad */
static void check_pattern_strict(u64 start, u64 n, u64 stride, u64 s, struct counts *c,
                                 u64 cpu)
{
    check(start, n, stride, s, 1, 0, c, cpu);
}

/* mode 1: image word, zero or bad */
static void check_image(u64 start, u64 n, u64 stride, struct counts *c, u64 cpu)
{
    check(start, n, stride, IMG_XOR, 0, 1, c, cpu);
}

/* Adds this vCPU's counts to the totals and waits for all vCPUs. */
static void publish(const struct counts *c, u64 n, u64 ncpus)
{
    atomic_add(&tot_ok, n - c->zero - c->bad);
    atomic_add(&tot_zero, c->zero);
    atomic_add(&tot_bad, c->bad);
    barrier_wait(&bar, ncpus);
}

/* vCPU 0 only, after publish(): takes the totals and clears them for the next pass. */
static void take_totals(u64 *ok, u64 *zero, u64 *bad)
{
    *ok = tot_ok;
    *zero = tot_zero;
    *bad = tot_bad;
    tot_ok = tot_zero = tot_bad = 0;
}

/* hold=1 on the command line: do not end the VM after the done line, so a
 * test can scrape the VMM's metrics of a finished but live guest. */
static u64 hold;

static NORETURN void finish(u64 cpu, u64 rounds, u64 words, u64 bad)
{
    if (cpu != 0)
        halt_forever();
    printk("memstress: done rounds=%lu words=%lu bad=%lu\n", rounds, words, bad);
    if (hold)
        halt_forever();
    exit_vm(bad ? 1 : 0);
}

void guest_main(unsigned long cpu, unsigned long ncpus, unsigned long memsize,
                const char *cmdline)
{
    struct region r;
    u64 first, count, ok, zero, bad, failed = 0;

    check_ncpus(cpu, ncpus);
    region_setup(&r, cpu, "memstress", cmdline, memsize, 0x1000000, 16UL << 20, 4096, 1);
    u64 rounds = cmdline_u64(cmdline, "rounds", 1);
    u64 mode = cmdline_u64(cmdline, "mode", MODE_PATTERN);
    u64 seed = cmdline_u64(cmdline, "seed", 1);
    hold = cmdline_u64(cmdline, "hold", 0);
    u64 check = cmdline_u64(cmdline, "check", 1);
    u64 random_order = cmdline_u64(cmdline, "random", 0);
    /* wait_after=R: after round R, vCPU 0 waits for a byte on the serial port
     * (the host's stdin) while the others wait at the barrier: a test acts on
     * a guest in the middle of its rounds, whatever the speed of the host. */
    u64 wait_after = cmdline_u64(cmdline, "wait_after", 0);

    if (mode > MODE_WRITE_VERIFY || (rounds == 0 && mode != MODE_IMAGE)) {
        if (cpu != 0)
            halt_forever();
        if (mode > MODE_WRITE_VERIFY)
            printk("memstress: error: mode=%lu must be 0, 1 or 2\n", mode);
        else
            printk("memstress: error: rounds=0 must be >= 1\n");
        exit_vm(2);
    }
    if (mode == MODE_IMAGE)
        rounds = 1;
    if (cpu == 0)
        printk("memstress: mode=%lu base=0x%lx bytes=%lu stride=%lu rounds=%lu "
               "vcpus=%lu words=%lu\n", mode, r.base, r.bytes, r.stride, rounds,
               ncpus, r.nwords);

    region_share(&r, cpu, ncpus, &first, &count);
    u64 start = r.base + first * r.stride;

    if (mode == MODE_IMAGE) {
        struct counts c = { 0, 0 };
        check_image(start, count, r.stride, &c, cpu);
        publish(&c, count, ncpus);
        if (cpu == 0) {
            take_totals(&ok, &zero, &bad);
            failed = zero + bad;
            printk("memstress image pass=1 ok=%lu zero=%lu bad=%lu\n", ok, zero, bad);
            marker(1);
        }
        barrier_wait(&bar, ncpus);

        c.zero = c.bad = 0;
        check_image(start, count, r.stride, &c, cpu);
        publish(&c, count, ncpus);
        if (cpu == 0) {
            take_totals(&ok, &zero, &bad);
            failed += bad;
            printk("memstress image pass=2 ok=%lu zero=%lu bad=%lu\n", ok, zero, bad);
        }
        finish(cpu, rounds, r.nwords, failed);
    }

    for (u64 round = 1; round <= rounds; round++) {
        struct counts c = { 0, 0 };
        u64 s = seed + round;

        if (random_order && round == 1)
            scatter(start, count, r.stride, s, seed + cpu);
        fill(start, count, r.stride, s);
        barrier_wait(&bar, ncpus);
        if (!check) {
            /* A steady writer (dirty-log benchmarks): fill again at once. */
            if (cpu == 0)
                printk("memstress round=%lu filled\n", round);
            continue;
        }
        if (mode == MODE_PATTERN) {
            if (cpu == 0)
                marker((u32)round);
            barrier_wait(&bar, ncpus);
            check_pattern(start, count, r.stride, s, &c, cpu);
        } else {
            check_pattern_strict(start, count, r.stride, s, &c, cpu);
        }
        publish(&c, count, ncpus);
        if (cpu == 0) {
            take_totals(&ok, &zero, &bad);
            failed += bad;
            printk("memstress round=%lu pattern=%lu zero=%lu bad=%lu\n",
                   round, ok, zero, bad);
        }
        if (round == wait_after && round < rounds) {
            if (cpu == 0) {
                printk("memstress: waiting after round=%lu\n", round);
                serial_wait_byte();
            }
            barrier_wait(&bar, ncpus);
        }
    }
    finish(cpu, rounds, r.nwords, failed);
}
