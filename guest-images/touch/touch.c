/*
 * touch: write a pattern over a RAM region split between all vCPUs, then verify it
 * (own share and the next vCPU's share). See ../README.md for keys and output.
 */
#include "../common/lib.h"

static struct barrier bar;
static u64 cpu_errors[GUEST_MAX_CPUS];
static u64 cpu_sums[GUEST_MAX_CPUS];

void guest_main(unsigned long cpu, unsigned long ncpus, unsigned long memsize,
                const char *cmdline)
{
    struct region r;
    u64 first, count, nfirst, ncount, sum, dummy, errors;

    check_ncpus(cpu, ncpus);
    region_setup(&r, cpu, "touch", cmdline, memsize, 0x1000000, 0x200000, 8, 1);
    u64 seed = cmdline_u64(cmdline, "seed", 1);

    region_share(&r, cpu, ncpus, &first, &count);
    u64 start = r.base + first * r.stride;

    pattern_fill(start, count, r.stride, seed);
    barrier_wait(&bar, ncpus);

    errors = pattern_verify(start, count, r.stride, seed, &sum, "touch", cpu);
    if (ncpus > 1) {
        u64 next = (cpu + 1) % ncpus;
        region_share(&r, next, ncpus, &nfirst, &ncount);
        errors += pattern_verify(r.base + nfirst * r.stride, ncount, r.stride, seed,
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
        printk("touch: OK bytes=%lu vcpus=%lu checksum=0x%016lx\n", r.bytes, ncpus, checksum);
        exit_vm(0);
    }
    printk("touch: FAIL errors=%lu\n", total);
    exit_vm(1);
}
