/*
 * touch: write a pattern over a RAM region split between all vCPUs, then verify it
 * (own share and the next vCPU's share). See ../README.md for keys and output.
 *
 * holds=N: the first pass stops N times on the way (after each N+1-th of every
 * share) until the host sends a byte on the serial port, so a test acts on a
 * region written exactly that far, whatever the speed of the host.
 * loop=1: after the first pass, passes that check every word still holds the
 * previous pass's value and write the next one, until the host sends a byte;
 * then every word is verified against the last pass. The guest never ends on its
 * own: a test decides when it has written enough (e.g. after a migration).
 */
#include "../common/lib.h"

#define MAX_REPORTS 4                   /* mismatches printed per vCPU per pass */

static struct barrier bar;
static u64 cpu_errors[GUEST_MAX_CPUS];
static u64 cpu_sums[GUEST_MAX_CPUS];
static u32 stop;                        /* loop=1: vCPU 0 saw the host's byte */

/* One rewrite pass over words a = start + i*stride, i < n: each must hold
 * pattern(a, prev) (what the last pass wrote), then gets pattern(a, prev + 1).
 * Returns the mismatches; the first MAX_REPORTS are printed. */
static u64 rewrite(u64 start, u64 n, u64 stride, u64 prev, u64 cpu, u64 pass)
{
    const u64 K = PATTERN_MUL;
    u64 next = prev + 1, errors = 0;

    for (u64 a = start, end = start + n * stride; a != end; a += stride) {
        u64 want = (a ^ prev) * K;
        u64 got = *(volatile u64 *)a;
        if (unlikely(got != want)) {
            if (errors < MAX_REPORTS)
                printk("touch cpu=%lu pass=%lu mismatch addr=0x%lx got=0x%016lx "
                       "want=0x%016lx\n", cpu, pass, a, got, want);
            errors++;
        }
        *(volatile u64 *)a = (a ^ next) * K;
    }
    return errors;
}

/* Words of the whole region written when every vCPU has done `k` of its
 * `parts` stages (for the hold lines). */
static u64 written(const struct region *r, u64 ncpus, u64 k, u64 parts)
{
    u64 total = 0, first, count;
    for (u64 c = 0; c < ncpus; c++) {
        region_share(r, c, ncpus, &first, &count);
        total += count * k / parts;
    }
    return total;
}

void guest_main(unsigned long cpu, unsigned long ncpus, unsigned long memsize,
                const char *cmdline)
{
    struct region r;
    u64 first, count, nfirst, ncount, sum, dummy, errors = 0;

    check_ncpus(cpu, ncpus);
    region_setup(&r, cpu, "touch", cmdline, memsize, 0x1000000, 0x200000, 8, 1);
    u64 seed = cmdline_u64(cmdline, "seed", 1);
    u64 holds = cmdline_u64(cmdline, "holds", 0);
    u64 loop = cmdline_u64(cmdline, "loop", 0);
    if (holds > 1000) {
        if (cpu != 0)
            halt_forever();
        printk("touch: error: holds=%lu must be at most 1000\n", holds);
        exit_vm(2);
    }

    region_share(&r, cpu, ncpus, &first, &count);
    u64 start = r.base + first * r.stride;

    /* The first pass, in holds + 1 stages. */
    u64 done = 0;
    for (u64 k = 1;; k++) {
        u64 upto = count * k / (holds + 1);
        pattern_fill(start + done * r.stride, upto - done, r.stride, seed);
        done = upto;
        if (k > holds)
            break;
        barrier_wait(&bar, ncpus);
        if (cpu == 0) {
            printk("touch: hold %lu/%lu words=%lu\n", k, holds,
                   written(&r, ncpus, k, holds + 1));
            serial_wait_byte();
        }
        barrier_wait(&bar, ncpus);
    }

    /* loop=1: pass after pass until the host's byte; `last` is the seed of the
     * last pass written. */
    u64 last = seed, passes = 1;
    while (loop) {
        barrier_wait(&bar, ncpus);
        if (cpu == 0 && serial_take_byte())
            __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
        barrier_wait(&bar, ncpus);
        if (__atomic_load_n(&stop, __ATOMIC_RELAXED))
            break;
        passes++;
        errors += rewrite(start, count, r.stride, last, cpu, passes);
        last++;
    }
    barrier_wait(&bar, ncpus);

    errors += pattern_verify(start, count, r.stride, last, &sum, "touch", cpu);
    if (ncpus > 1) {
        u64 next = (cpu + 1) % ncpus;
        region_share(&r, next, ncpus, &nfirst, &ncount);
        errors += pattern_verify(r.base + nfirst * r.stride, ncount, r.stride, last,
                                 &dummy, "touch", cpu);
    }
    cpu_errors[cpu] = errors;
    cpu_sums[cpu] = sum;
    printk("touch cpu=%lu words=%lu errors=%lu sum=0x%016lx\n", cpu, count, errors, sum);

    barrier_wait(&bar, ncpus);
    if (cpu != 0)
        return;

    u64 total = 0, checksum = 0;
    for (u64 i = 0; i < ncpus; i++) {
        total += cpu_errors[i];
        checksum ^= cpu_sums[i];
    }
    if (total == 0) {
        if (loop)
            printk("touch: OK bytes=%lu vcpus=%lu checksum=0x%016lx passes=%lu\n",
                   r.bytes, ncpus, checksum, passes);
        else
            printk("touch: OK bytes=%lu vcpus=%lu checksum=0x%016lx\n", r.bytes, ncpus,
                   checksum);
        exit_vm(0);
    }
    printk("touch: FAIL errors=%lu\n", total);
    exit_vm(1);
}
