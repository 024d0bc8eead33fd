/*
 * wset: the restore benchmark's guest. Phase 1 writes one word per page over
 * a region (the memory a snapshot will hold), marks 1, and waits on the host
 * signal port; once the host writes 1 there (after a snapshot and restore,
 * or at once for the in-memory baseline) phase 2 touches a working set, a
 * contiguous part of the region, reading and checking each page's word in
 * sequential or seeded random order, and marks 2 when every vCPU is done.
 * See ../README.md for keys and output.
 */
#include "../common/lib.h"

#define SIGNAL_PORT 0x503
#define MMIO_GAP    0xc0000000UL    /* RAM past 3 GiB continues at 4 GiB */

static struct barrier bar;
static u64 bad_total;

static u64 value(u64 a, u64 seed) { return pattern_value(a, seed) | 1; }

void guest_main(unsigned long cpu, unsigned long ncpus, unsigned long memsize,
                const char *cmdline)
{
    struct region r, w;
    u64 first, count;

    check_ncpus(cpu, ncpus);
    /* The region is RAM below the MMIO gap (a 4 GiB guest's last GiB is at
     * 4 GiB+ and stays untouched: holes in its snapshot). */
    u64 top = memsize > MMIO_GAP ? MMIO_GAP : memsize;
    region_setup(&r, cpu, "wset", cmdline, top, 0x1000000, top, 4096, 0);
    u64 seed = cmdline_u64(cmdline, "seed", 1);
    u64 ws_bytes = cmdline_u64(cmdline, "ws", 256UL << 20);
    u64 random_order = cmdline_u64(cmdline, "random", 0);
    if (ws_bytes > r.bytes)
        ws_bytes = r.bytes;

    /* Phase 1: populate. */
    region_share(&r, cpu, ncpus, &first, &count);
    for (u64 i = 0; i < count; i++) {
        u64 a = r.base + (first + i) * r.stride;
        *(u64 *)a = value(a, seed);
    }
    barrier_wait(&bar, ncpus);
    if (cpu == 0) {
        printk("wset: populated bytes=%lu\n", r.bytes);
        marker(1);
        while (inl(SIGNAL_PORT) != 1)
            cpu_relax();
    }
    barrier_wait(&bar, ncpus);

    /* Phase 2: the working set, the first ws_bytes of the region. */
    w = r;
    w.bytes = ws_bytes;
    w.nwords = ws_bytes / r.stride;
    region_share(&w, cpu, ncpus, &first, &count);
    u64 step = random_order ? coprime_step(count, seed + cpu) : 1;
    u64 i = 0, bad = 0;
    for (u64 j = 0; j < count; j++) {
        u64 a = w.base + (first + i) * w.stride;
        if (*(volatile u64 *)a != value(a, seed))
            bad++;
        i += step;
        if (i >= count)
            i -= count;
    }
    __asm__ volatile("lock xaddq %0, %1" : "+r"(bad), "+m"(bad_total) :: "memory");
    barrier_wait(&bar, ncpus);
    if (cpu != 0)
        halt_forever();
    marker(2);
    printk("wset: done pages=%lu bad=%lu\n", w.nwords, bad_total);
    exit_vm(bad_total ? 1 : 0);
}
