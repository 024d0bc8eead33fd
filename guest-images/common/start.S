/*
 * Entry stub shared by all guests.
 *
 * The VMM starts every vCPU here at the same time, in 64-bit long mode,
 * CPL 0, interrupts disabled, identity-mapped paging, no IDT, no stack:
 *   RDI = vCPU index, RSI = number of vCPUs, RDX = guest RAM size in bytes,
 *   RCX = guest-physical address of the NUL-terminated command line (or 0).
 * Those are exactly the first four SysV arguments of
 *   void guest_main(unsigned long cpu, unsigned long ncpus,
 *                   unsigned long memsize, const char *cmdline);
 * so they are passed through untouched.
 */
#define GUEST_MAX_CPUS    64
#define GUEST_STACK_SHIFT 14            /* 16 KiB per vCPU */
#define EXIT_PORT         0x501
#define EXIT_TOO_MANY     0x7f

        .section .text.start, "ax", @progbits
        .globl  _start
        .type   _start, @function
_start:
        cld
        cmp     $GUEST_MAX_CPUS, %rdi
        jae     .Ltoo_many
        lea     1(%rdi), %rax
        shl     $GUEST_STACK_SHIFT, %rax        /* (cpu + 1) * stack size */
        lea     guest_stacks(%rip), %rsp
        add     %rax, %rsp                      /* top of this vCPU's stack, 16-aligned */
        xor     %ebp, %ebp
        call    guest_main
.Lhalt:
        cli
        hlt
        jmp     .Lhalt
.Ltoo_many:
        mov     $EXIT_TOO_MANY, %eax
        mov     $EXIT_PORT, %edx
        outl    %eax, %dx
        jmp     .Lhalt
        .size   _start, . - _start

        .section .bss.stacks, "aw", @nobits
        .balign 4096
        .globl  guest_stacks
        .type   guest_stacks, @object
guest_stacks:
        .skip   GUEST_MAX_CPUS << GUEST_STACK_SHIFT
        .size   guest_stacks, . - guest_stacks

        .section .note.GNU-stack, "", @progbits
