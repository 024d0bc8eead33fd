/* hello: vCPU 0 prints one line and ends the VM with status 0; other vCPUs halt. */
#include "../common/lib.h"

void guest_main(unsigned long cpu, unsigned long ncpus, unsigned long memsize,
                const char *cmdline)
{
    (void)ncpus;
    (void)memsize;
    (void)cmdline;
    check_ncpus(cpu, ncpus);
    if (cpu != 0)
        halt_forever();
    serial_puts("hello from vmm guest\n");
    exit_vm(0);
}
