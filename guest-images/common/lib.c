/*
 * Tiny freestanding support library for the VMM test guests.
 * Everything here runs emulated at ~1.5 us per instruction on the target host,
 * so hot loops are kept short.
 */
#include "lib.h"

/* ------------------------------------------------------------------ misc */

NORETURN void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt" ::: "memory");
}

NORETURN void exit_vm(u32 status)
{
    outl(EXIT_PORT, status);
    halt_forever();
}

/* ---------------------------------------------------------------- serial */

/* Ticket lock: lock xadd to take a ticket, spin with pause until served. */
static struct {
    u32 next;
    u32 owner;
} serial_ticket;

void serial_lock(void)
{
    u32 t = __atomic_fetch_add(&serial_ticket.next, 1, __ATOMIC_RELAXED);
    while (__atomic_load_n(&serial_ticket.owner, __ATOMIC_ACQUIRE) != t)
        cpu_relax();
}

void serial_unlock(void)
{
    u32 o = __atomic_load_n(&serial_ticket.owner, __ATOMIC_RELAXED);
    __atomic_store_n(&serial_ticket.owner, o + 1, __ATOMIC_RELEASE);
}

void serial_putc(char c)
{
    while (!(inb(SERIAL_LSR) & SERIAL_LSR_THRE))
        cpu_relax();
    outb(SERIAL_PORT, (u8)c);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

static const char hexdigits[] = "0123456789abcdef";

void serial_print_hex(u64 v)
{
    char buf[16];
    int n = 0;
    do {
        buf[n++] = hexdigits[v & 15];
        v >>= 4;
    } while (v);
    serial_putc('0');
    serial_putc('x');
    while (n)
        serial_putc(buf[--n]);
}

void serial_print_dec(u64 v)
{
    char buf[20];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        serial_putc(buf[--n]);
}

/* ---------------------------------------------------------------- printk */

struct outbuf {
    char *p;
    char *end;
};

static void ob_putc(struct outbuf *o, char c)
{
    if (o->p < o->end)
        *o->p++ = c;
}

static void ob_num(struct outbuf *o, u64 v, unsigned base, int upper, int neg,
                   int width, char pad, int left)
{
    char tmp[24];
    int n = 0;
    const char *digits = upper ? "0123456789ABCDEF" : hexdigits;
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    if (neg && pad == '0' && !left) {
        ob_putc(o, tmp[--n]);           /* sign before the zero padding */
        width--;
    }
    int len = n;
    if (!left)
        for (int i = len; i < width; i++)
            ob_putc(o, pad);
    while (n)
        ob_putc(o, tmp[--n]);
    if (left)
        for (int i = len; i < width; i++)
            ob_putc(o, ' ');
}

void printk(const char *fmt, ...)
{
    char buf[256];
    struct outbuf o = { buf, buf + sizeof(buf) };
    __builtin_va_list ap;

    __builtin_va_start(ap, fmt);
    for (const char *f = fmt; *f; f++) {
        if (*f != '%') {
            ob_putc(&o, *f);
            continue;
        }
        f++;
        char pad = ' ';
        int width = 0, lng = 0, left = 0;
        for (;; f++) {
            if (*f == '0')
                pad = '0';
            else if (*f == '-')
                left = 1;
            else
                break;
        }
        while (*f >= '0' && *f <= '9')
            width = width * 10 + (*f++ - '0');
        while (*f == 'l' || *f == 'z') {
            lng = 1;
            f++;
        }
        switch (*f) {
        case 'c':
            ob_putc(&o, (char)__builtin_va_arg(ap, int));
            break;
        case 's': {
            const char *s = __builtin_va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            while (*s)
                ob_putc(&o, *s++);
            break;
        }
        case 'd':
        case 'i': {
            i64 v = lng ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
            ob_num(&o, v < 0 ? -(u64)v : (u64)v, 10, 0, v < 0, width, pad, left);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            u64 v = lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, unsigned);
            ob_num(&o, v, *f == 'u' ? 10 : 16, *f == 'X', 0, width, pad, left);
            break;
        }
        case 'p':
            ob_putc(&o, '0');
            ob_putc(&o, 'x');
            ob_num(&o, (u64)__builtin_va_arg(ap, void *), 16, 0, 0, width, pad, left);
            break;
        case '%':
            ob_putc(&o, '%');
            break;
        case '\0':
            f--;
            break;
        default:
            ob_putc(&o, '%');
            ob_putc(&o, *f);
            break;
        }
    }
    __builtin_va_end(ap);

    serial_lock();
    for (const char *p = buf; p < o.p; p++)
        serial_putc(*p);
    serial_unlock();
}

/* -------------------------------------------------------------- cmdline */

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Parses [s, e) as a number; returns 0 on failure. */
static int parse_u64(const char *s, const char *e, u64 *out)
{
    u64 v = 0;
    int digits = 0;

    if (e - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2; s < e; s++, digits++) {
            char c = *s;
            unsigned d;
            if (c >= '0' && c <= '9')
                d = (unsigned)(c - '0');
            else if (c >= 'a' && c <= 'f')
                d = (unsigned)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                d = (unsigned)(c - 'A' + 10);
            else
                break;
            v = v * 16 + d;
        }
    } else {
        for (; s < e && *s >= '0' && *s <= '9'; s++, digits++)
            v = v * 10 + (u64)(*s - '0');
    }
    if (!digits)
        return 0;
    if (s < e) {
        unsigned shift;
        switch (*s) {
        case 'k': case 'K': shift = 10; break;
        case 'm': case 'M': shift = 20; break;
        case 'g': case 'G': shift = 30; break;
        case 't': case 'T': shift = 40; break;
        default: return 0;
        }
        v <<= shift;
        s++;
    }
    if (s != e)
        return 0;
    *out = v;
    return 1;
}

u64 cmdline_u64(const char *cmdline, const char *key, u64 def)
{
    u64 result = def;
    const char *s = cmdline;

    if (!s)
        return def;
    for (;;) {
        while (is_space(*s))
            s++;
        if (!*s)
            break;
        const char *tok = s;
        while (*s && !is_space(*s))
            s++;
        /* token is [tok, s) */
        const char *k = key, *t = tok;
        while (*k && t < s && *t == *k) {
            k++;
            t++;
        }
        if (*k == '\0' && t < s && *t == '=') {
            u64 v;
            if (parse_u64(t + 1, s, &v))
                result = v;
        }
    }
    return result;
}

/* -------------------------------------------------------------- barrier */

void barrier_wait(struct barrier *b, u64 n)
{
    if (n <= 1)
        return;
    u32 gen = __atomic_load_n(&b->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == n) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->generation, gen + 1, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) == gen)
            cpu_relax();
    }
}

/* ------------------------------------------------------------- patterns */

void pattern_fill(u64 start, u64 nwords, u64 stride, u64 seed)
{
    const u64 K = PATTERN_MUL;
    u64 a = start;

    if (stride == 8) {
        /* Unrolled x4: 4 instructions per word + 3 per iteration. */
        u64 end4 = start + (nwords & ~3UL) * 8;
        for (; a != end4; a += 32) {
            u64 *p = (u64 *)a;
            p[0] = (a ^ seed) * K;
            p[1] = ((a + 8) ^ seed) * K;
            p[2] = ((a + 16) ^ seed) * K;
            p[3] = ((a + 24) ^ seed) * K;
        }
        nwords &= 3;
    }
    for (u64 end = a + nwords * stride; a != end; a += stride)
        *(u64 *)a = (a ^ seed) * K;
}

/* Slow path: re-reads the word, reports it (first 4 per call only) and returns the
 * value read so the caller can fix up its checksum. */
__attribute__((noinline, cold))
static u64 mismatch(u64 base, u64 off, u64 want, u64 *errors, const char *tag, u64 cpu)
{
    u64 addr = base + off;
    u64 got = *(volatile u64 *)addr;
    if (*errors < 4)
        printk("%s cpu=%lu mismatch addr=0x%lx got=0x%016lx want=0x%016lx\n",
               tag, cpu, addr, got, want);
    (*errors)++;
    return got;
}

/* Fast path: lea/xor/imul/cmp-mem/jne/xor = 6 instructions per word. */
#define CHECK_WORD(a, off)                                                   \
    do {                                                                     \
        u64 w_ = (((a) + (off)) ^ seed) * K;                                 \
        if (unlikely(*(const u64 *)((a) + (off)) != w_))                     \
            w_ = mismatch((a), (off), w_, &errors, tag, cpu);                \
        x ^= w_;                                                             \
    } while (0)

u64 pattern_verify(u64 start, u64 nwords, u64 stride, u64 seed, u64 *xsum,
                   const char *tag, u64 cpu)
{
    const u64 K = PATTERN_MUL;
    u64 a = start, x = 0, errors = 0;

    if (stride == 8) {
        u64 end4 = start + (nwords & ~3UL) * 8;
        for (; a != end4; a += 32) {
            CHECK_WORD(a, 0);
            CHECK_WORD(a, 8);
            CHECK_WORD(a, 16);
            CHECK_WORD(a, 24);
        }
        nwords &= 3;
    }
    for (u64 end = a + nwords * stride; a != end; a += stride)
        CHECK_WORD(a, 0);
    *xsum = x;
    return errors;
}

/* --------------------------------------------------------------- region */

/* Configuration errors: vCPU 0 reports and ends the VM with status 2, the others halt. */
#define region_fail(...)                \
    do {                                \
        if (cpu != 0)                   \
            halt_forever();             \
        printk(__VA_ARGS__);            \
        exit_vm(2);                     \
    } while (0)

void check_ncpus(u64 cpu, u64 ncpus)
{
    if (ncpus == 0 || ncpus > GUEST_MAX_CPUS) {
        if (cpu == 0)
            exit_vm(0x7f);
        halt_forever();
    }
}

void region_setup(struct region *r, u64 cpu, const char *tag, const char *cmdline,
                  u64 memsize, u64 base_def, u64 bytes_def, u64 stride_def, int allow_stride)
{
    u64 base = cmdline_u64(cmdline, "base", base_def);
    u64 bytes = cmdline_u64(cmdline, "bytes", bytes_def);
    u64 stride = allow_stride ? cmdline_u64(cmdline, "stride", stride_def) : stride_def;
    u64 img_end = (u64)__image_end;

    /* memtop= overrides the RAM size for regions in hotplugged memory above
     * boot RAM (the caller promises it is mapped). */
    memsize = cmdline_u64(cmdline, "memtop", memsize);
    if (stride == 0 || (stride & 7)) {
        region_fail("%s: error: stride=%lu must be a non-zero multiple of 8\n", tag, stride);
    }
    if (base & 7) {                      /* round up to a word boundary */
        u64 nb = (base + 7) & ~7UL;
        bytes = bytes > nb - base ? bytes - (nb - base) : 0;
        base = nb;
    }
    if (base >= memsize) {
        region_fail("%s: error: base=0x%lx is beyond guest RAM (memsize=0x%lx)\n",
                    tag, base, memsize);
    }
    if (base < img_end) {
        region_fail("%s: error: base=0x%lx overlaps the guest image or low memory "
                    "(must be >= 0x%lx)\n", tag, base, img_end);
    }
    if (bytes > memsize - base)
        bytes = memsize - base;
    bytes &= ~7UL;
    r->base = base;
    r->bytes = bytes;
    r->stride = stride;
    r->nwords = bytes >= 8 ? (bytes - 8) / stride + 1 : 0;
}

void region_share(const struct region *r, u64 cpu, u64 ncpus, u64 *first, u64 *count)
{
    u64 per = r->nwords / ncpus;
    *first = cpu * per;
    *count = (cpu == ncpus - 1) ? r->nwords - cpu * per : per;
}
