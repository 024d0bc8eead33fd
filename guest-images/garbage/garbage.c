/*
 * garbage: pokes every I/O port and a spread of MMIO addresses that no device
 * claims, with reads and writes of every size, then reports it survived.
 * The VMM must log (rate-limited) and ignore all of it.
 *
 * With "crash" on the command line, vCPU 0 executes ud2 instead: there is no
 * IDT, so the exception escalates to a triple fault the VMM must report.
 */
#include "../common/lib.h"

static struct barrier done;

static int has_word(const char *s, const char *w)
{
    for (; s && *s; s++) {
        const char *a = s, *b = w;
        while (*b && *a == *b) { a++; b++; }
        if (!*b && (*a == 0 || *a == ' '))
            return 1;
        while (*s && *s != ' ') s++;
        if (!*s) break;
    }
    return 0;
}

/* Ports a device legitimately owns: writing garbage there is not "unclaimed"
 * (and 0x64/0x501 would end the VM). */
static int skip_port(u32 p)
{
    return (p >= 0x3f8 && p <= 0x3ff) || (p >= 0x60 && p <= 0x64) ||
           (p >= 0x501 && p <= 0x504) || (p >= 0x20 && p <= 0x21) ||
           (p >= 0xa0 && p <= 0xa1) || (p >= 0x40 && p <= 0x43) ||
           (p >= 0x4d0 && p <= 0x4d1) || p == 0x80;
}

void guest_main(unsigned long cpu, unsigned long ncpus, unsigned long memsize,
                const char *cmdline)
{
    check_ncpus(cpu, ncpus);
    if (cpu == 0 && has_word(cmdline, "crash")) {
        printk("garbage: crashing on purpose\n");
        __asm__ volatile("ud2");
    }
    u32 sink = 0;
    for (u32 p = cpu; p < 0x10000; p += ncpus) {
        if (skip_port(p))
            continue;
        switch (p & 3) {
        case 0: outb(p, (u8)p); sink += inb(p); break;
        case 1: outw(p, (u16)p); sink += inw(p); break;
        default: outl(p, p * 0x9e3779b9u); sink += inl(p); break;
        }
    }
    /* MMIO: the 32-bit hole below 4 GiB, and guest-physical space past the
     * end of RAM (identity mapped, but no memslot). */
    u64 addrs[] = { 0xc0000000UL, 0xd0000000UL, 0xfec10000UL, 0xffc00000UL,
                    memsize, memsize + 0x1234, 0xbffff000UL };
    for (u64 i = cpu; i < sizeof(addrs) / sizeof(addrs[0]); i += ncpus) {
        if (addrs[i] < memsize)
            continue;
        for (u64 off = 0; off < 64 * 4096; off += 4096) {
            volatile u8 *b = (volatile u8 *)(addrs[i] + off);
            volatile u64 *q = (volatile u64 *)(addrs[i] + off + 8);
            volatile u32 *d = (volatile u32 *)(addrs[i] + off + 16);
            *b = 0xa5; sink += *b;
            *q = 0xdeadbeefcafef00dUL; sink += (u32)*q;
            *d = 0x12345678; sink += *d;
        }
    }
    barrier_wait(&done, ncpus);
    if (cpu != 0)
        halt_forever();
    printk("garbage: survived (%u)\n", sink & 1);
    exit_vm(0);
}
