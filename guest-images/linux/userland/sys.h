/*
 * sys.h: the little of a C library the userland test programs need, as raw
 * x86-64 Linux system calls. The programs are built freestanding
 * (-nostdlib -static): a static glibc binary is ~0.8 MB, and every byte of
 * the initramfs is unpacked by the guest kernel, whose code the PVM host
 * emulates (~1 us per instruction).
 */
#ifndef USERLAND_SYS_H
#define USERLAND_SYS_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef long i64;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_mmap 9
#define SYS_sched_yield 24
#define SYS_getpid 39
#define SYS_fork 57
#define SYS_exit 60
#define SYS_wait4 61

static inline i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f)
{
    register i64 r10 __asm__("r10") = d;
    register i64 r8 __asm__("r8") = e;
    register i64 r9 __asm__("r9") = f;
    i64 ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define sys3(n, a, b, c) sys6(n, (i64)(a), (i64)(b), (i64)(c), 0, 0, 0)

static inline __attribute__((noreturn)) void sys_exit(int code)
{
    for (;;)
        sys6(SYS_exit, code, 0, 0, 0, 0, 0);
}

static __attribute__((unused)) u64 slen(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    return n;
}

/* A line buffer: text and numbers appended, written out with one write(2). */
struct line {
    char b[256];
    u64 n;
};

static void put(struct line *l, const char *s)
{
    while (*s && l->n < sizeof l->b - 1)
        l->b[l->n++] = *s++;
}

static void put_u(struct line *l, u64 v)
{
    char t[24];
    int i = 0;
    do {
        t[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i && l->n < sizeof l->b - 1)
        l->b[l->n++] = t[--i];
}

static __attribute__((unused)) void put_hex(struct line *l, u64 v)
{
    put(l, "0x");
    for (int i = 60; i >= 0; i -= 4)
        if (l->n < sizeof l->b - 1)
            l->b[l->n++] = "0123456789abcdef"[(v >> i) & 15];
}

static void flush_line(struct line *l)
{
    put(l, "\n");
    sys3(SYS_write, 1, l->b, l->n);
    l->n = 0;
}

static __attribute__((unused)) u64 parse_u(const char *s)
{
    u64 v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u64)(*s++ - '0');
    return v;
}

/* The entry point: argc, argv from the initial stack, then main's status. */
int main(int argc, char **argv);
__asm__(".globl _start\n_start:\n"
        "  xor %rbp, %rbp\n"
        "  mov (%rsp), %rdi\n"
        "  lea 8(%rsp), %rsi\n"
        "  and $-16, %rsp\n"
        "  call main\n"
        "  mov %eax, %edi\n"
        "  mov $60, %eax\n"
        "  syscall\n");

#endif
