/*
 * demo: the default guest embedded in the VMM. Every vCPU touches one word per
 * 4 KiB page of its share of a RAM region, verifies it (and the next vCPU's share),
 * and vCPU 0 prints a summary. See ../README.md.
 */
#include "../common/lib.h"

#define PAGE 4096UL

static struct barrier bar;
static u64 cpu_errors[GUEST_MAX_CPUS];

void guest_main(unsigned long cpu, unsigned long ncpus, unsigned long memsize,
                const char *cmdline)
{
    struct region r;
    u64 first, count, nfirst, ncount, sum, errors;

    check_ncpus(cpu, ncpus);
    region_setup(&r, cpu, "demo", cmdline, memsize, 16UL << 20, 32UL << 20, PAGE, 0);
    u64 seed = cmdline_u64(cmdline, "seed", 1);

    region_share(&r, cpu, ncpus, &first, &count);
    u64 start = r.base + first * PAGE;

    pattern_fill(start, count, PAGE, seed);
    barrier_wait(&bar, ncpus);

    errors = pattern_verify(start, count, PAGE, seed, &sum, "demo", cpu);
    if (ncpus > 1) {
        region_share(&r, (cpu + 1) % ncpus, ncpus, &nfirst, &ncount);
        errors += pattern_verify(r.base + nfirst * PAGE, ncount, PAGE, seed, &sum,
                                 "demo", cpu);
    }
    cpu_errors[cpu] = errors;
    if (errors)
        printk("demo cpu=%lu pages=%lu errors=%lu\n", cpu, count, errors);
    else
        printk("demo cpu=%lu pages=%lu ok\n", cpu, count);

    barrier_wait(&bar, ncpus);
    if (cpu != 0)
        return;

    u64 total = 0;
    for (u64 i = 0; i < ncpus; i++)
        total += cpu_errors[i];
    if (total == 0) {
        printk("demo: %lu vCPUs touched %lu pages (%lu MiB) of guest RAM, all verified\n",
               ncpus, r.nwords, r.nwords * PAGE >> 20);
        exit_vm(0);
    }
    printk("demo: FAIL errors=%lu\n", total);
    exit_vm(1);
}
