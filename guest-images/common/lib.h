/*
 * Tiny freestanding support library for the VMM test guests.
 * See ../README.md for the guest ABI.
 */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

typedef unsigned char      u8;
typedef unsigned short     u16;
typedef unsigned int       u32;
typedef unsigned long      u64;
typedef long               i64;

#define GUEST_MAX_CPUS  64

#define SERIAL_PORT     0x3f8           /* 8250 THR */
#define SERIAL_LSR      (SERIAL_PORT + 5)
#define SERIAL_LSR_THRE 0x20
#define SERIAL_LSR_DR   0x01            /* a received byte waits in RBR */
#define EXIT_PORT       0x501

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define NORETURN    __attribute__((noreturn))

/* Symbols from guest.ld. */
extern char __image_start[], __image_end[];

void guest_main(unsigned long cpu, unsigned long ncpus,
                unsigned long memsize, const char *cmdline);

/* ---- port I/O ---- */
static inline void outb(u16 port, u8 v)  { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8  inb(u16 port) { u8 v;  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* Phase marker: 32-bit outl of v to port 0x502 tells the VMM a test phase boundary
 * was reached. The VMM may act synchronously during that exit (e.g. discard guest
 * pages) before the vCPU continues, hence the memory clobber. */
#define MARKER_PORT     0x502
static inline void marker(u32 v)
{
    __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"((u16)MARKER_PORT) : "memory");
}

/* Halt this vCPU forever (interrupts disabled). */
NORETURN void halt_forever(void);

/* End the whole VM: 32-bit outl of status to port 0x501 (VMM exits with status & 0xff). */
NORETURN void exit_vm(u32 status);

/* ---- serial console ----
 * The unlocked primitives below must be bracketed by serial_lock()/serial_unlock()
 * when several vCPUs may print; printk() takes the lock itself for one whole call. */
void serial_lock(void);
void serial_unlock(void);
void serial_putc(char c);
void serial_puts(const char *s);
void serial_print_hex(u64 v);           /* "0x" + minimal hex digits */
void serial_print_dec(u64 v);

/* ---- serial input: the host's word to a guest ----
 * The VMM feeds its stdin to the UART: a byte there is how a test tells a guest
 * to go on (touch holds=, memstress wait_after=) or to stop (touch loop=1). A VMM
 * whose stdin is /dev/null never sends one. Inline, so guests that do not use
 * them keep their layout. */

/* 1 if a byte had arrived (it is consumed), else 0. One port read when none has. */
static inline int serial_take_byte(void)
{
    if (!(inb(SERIAL_LSR) & SERIAL_LSR_DR))
        return 0;
    (void)inb(SERIAL_PORT);             /* RBR (DLAB is never set): pops the byte */
    return 1;
}

/* Wait for a byte from the host and consume it (a port read per ~100 pauses). */
static inline void serial_wait_byte(void)
{
    while (!serial_take_byte())
        for (int i = 0; i < 100; i++)
            cpu_relax();
}

/* printf subset: %% %c %s %d %i %u %x %X %p with optional '0'/'-' flags, width and
 * l/ll/z length. Output (up to 255 bytes) is written atomically w.r.t. other printk calls. */
__attribute__((format(printf, 1, 2)))
void printk(const char *fmt, ...);

/* ---- command line ----
 * Looks for whitespace-separated "key=NUMBER" tokens (last one wins).
 * NUMBER: decimal or 0x-hex, optional suffix K/M/G/T (x1024^n, case-insensitive).
 * Returns def if cmdline is NULL, the key is missing or the value does not parse. */
u64 cmdline_u64(const char *cmdline, const char *key, u64 def);

/* ---- barrier for n vCPUs (sense-reversing, reusable) ---- */
struct barrier {
    volatile u32 count;
    volatile u32 generation;
};
void barrier_wait(struct barrier *b, u64 n);

/* ---- hashing ---- */
/* splitmix64 finalizer: good avalanche, ~9 instructions. */
static inline u64 mix64(u64 x)
{
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9UL;
    x ^= x >> 27; x *= 0x94d049bb133111ebUL;
    x ^= x >> 31;
    return x;
}

/* Memory-test pattern: one multiply by an odd constant (a bijection on u64, so
 * distinct (addr ^ seed) always give distinct values). Cheap enough for the
 * per-word inner loops of the emulated guest. */
#define PATTERN_MUL 0x9e3779b97f4a7c15UL
static inline u64 mix_fast(u64 x) { return x * PATTERN_MUL; }
static inline u64 pattern_value(u64 addr, u64 seed) { return mix_fast(addr ^ seed); }

static inline u64 gcd_u64(u64 a, u64 b)
{
    while (b) {
        u64 t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* A step coprime with n and far from 1, from a seed: visiting word i*step
 * mod n for i < n touches every word once, in an order no sequential
 * detector follows (memstress order=random, wset random=1). */
static inline u64 coprime_step(u64 n, u64 seed)
{
    if (n < 3)
        return 1;
    u64 step = ((seed * 0x9e3779b97f4a7c15UL) >> 20) % n;
    if (step < n / 3)
        step += n / 3;
    while (gcd_u64(step, n) != 1)
        step++;
    return step;
}

/* Write pattern_value(a, seed) to the nwords words a = start + i*stride, i < nwords. */
void pattern_fill(u64 start, u64 nwords, u64 stride, u64 seed);

/* Verify those words; returns the number of mismatches, *xsum receives the xor of all
 * values read. The first few mismatches are printed, tagged with `tag` and `cpu`. */
u64 pattern_verify(u64 start, u64 nwords, u64 stride, u64 seed, u64 *xsum,
                   const char *tag, u64 cpu);

/* If ncpus is 0 or > GUEST_MAX_CPUS: vCPU 0 exits with 0x7f, the others halt. */
void check_ncpus(u64 cpu, u64 ncpus);

/* Region split shared by touch and demo. */
struct region {
    u64 base;        /* first word address (8-byte aligned) */
    u64 bytes;       /* clamped size */
    u64 stride;      /* bytes between touched words (multiple of 8) */
    u64 nwords;      /* words touched in the whole region */
};
/* Parses base/bytes/stride keys (stride_def is used when stride is absent; pass
 * allow_stride=0 to ignore the key). The region is clamped to guest RAM. On a bad
 * configuration vCPU 0 prints "<tag>: error: ..." and exits 2; other vCPUs halt. */
void region_setup(struct region *r, u64 cpu, const char *tag, const char *cmdline,
                  u64 memsize, u64 base_def, u64 bytes_def, u64 stride_def, int allow_stride);
/* Share of vCPU `cpu`: words [*first, *first + *count). Last vCPU takes the remainder. */
void region_share(const struct region *r, u64 cpu, u64 ncpus, u64 *first, u64 *count);

#endif
