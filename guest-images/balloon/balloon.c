/*
 * balloon: a polled virtio-balloon driver (virtio-mmio, DeviceID 5) over a page
 * pool. Follows the host's target (config num_pages) by inflating and deflating
 * pool pages, checks that pages the host discarded come back zero and that kept
 * pages keep their pattern. See ../README.md for keys and output.
 *
 * vCPU 0 is the driver; the other vCPUs halt.
 */
#include "../common/lib.h"
#include "../common/virtio.h"

#define PAGE_SHIFT      12
#define PAGE_SIZE       (1UL << PAGE_SHIFT)
#define MAX_PAGES       65536           /* pool of up to 256 MiB */
#define CHUNK           256             /* PFNs per descriptor chain (device limit) */
#define QSIZE           16
#define INFLATEQ        0
#define DEFLATEQ        1
#define CFG_NUM_PAGES   0
#define CFG_ACTUAL      4
#define POLL_PAUSES     200             /* pause instructions between config polls */
#define WAIT_ITERS      100000UL        /* used-ring polls before a chain times out (~3 s) */
#define MMIO_GAP        0xc0000000UL    /* RAM above this is not where memsize says */
#define MAX_REPORTS     4

enum { KEPT = 0, BALLOONED = 1 };

static u8 state[MAX_PAGES];
static u32 pfns[CHUNK] __attribute__((aligned(64)));
static struct virtio_dev dev;
static struct virtq inflateq, deflateq;

static u64 pool_base, npages, seed;
/* Pages [0, kept_top) of the pool are KEPT, [kept_top, npages) BALLOONED: inflation
 * takes KEPT pages from the top down, deflation gives back the most recently
 * inflated ones first, so the balloon stays one block at the top of the pool. */
static u64 kept_top;
static u64 total_inflated, total_deflated, zero_bad, pattern_bad;

#define config_error(...)               \
    do {                                \
        printk(__VA_ARGS__);            \
        exit_vm(2);                     \
    } while (0)

static NORETURN void device_error(const char *what, int err)
{
    printk("balloon: error: %s (err=%d)\n", what, err);
    exit_vm(3);
}

static u64 page_addr(u64 i)
{
    return pool_base + (i << PAGE_SHIFT);
}

static void idle(void)
{
    for (int i = 0; i < POLL_PAUSES; i++)
        cpu_relax();
}

/* Posts pfns[0..n) as one device-readable chain on queue q and waits for it. */
static void post_pfns(struct virtq *vq, u32 q, u32 n)
{
    struct virtq_used_elem e;
    int head = virtq_add_readable(vq, (u64)pfns, n * 4);
    if (head < 0)
        device_error("no free descriptor", head);
    virtq_submit(vq, (u32)head);
    virtq_notify(&dev, q);
    int r = virtq_wait_used(vq, WAIT_ITERS, &e);
    if (r == -VIRTIO_ETIMEDOUT)
        device_error(q == INFLATEQ ? "timeout waiting for the inflateq used ring"
                                   : "timeout waiting for the deflateq used ring", r);
    if (r < 0)
        device_error("bad used element", r);
    if (e.id != (u32)head)
        device_error("used element for another chain", -VIRTIO_EDEVICE);
}

static void write_actual(void)
{
    virtio_config_write32(&dev, CFG_ACTUAL, (u32)(npages - kept_top));
}

static void inflate(u64 n)
{
    if (n > CHUNK)
        n = CHUNK;
    for (u64 k = 0; k < n; k++)
        pfns[k] = (u32)((pool_base >> PAGE_SHIFT) + kept_top - 1 - k);
    post_pfns(&inflateq, INFLATEQ, (u32)n);
    for (u64 k = 0; k < n; k++)
        state[kept_top - 1 - k] = BALLOONED;
    kept_top -= n;
    total_inflated += n;
    write_actual();
}

static void deflate(u64 n)
{
    if (n > CHUNK)
        n = CHUNK;
    for (u64 k = 0; k < n; k++)
        pfns[k] = (u32)((pool_base >> PAGE_SHIFT) + kept_top + k);
    post_pfns(&deflateq, DEFLATEQ, (u32)n);
    for (u64 k = 0; k < n; k++) {
        u64 i = kept_top + k, a = page_addr(i);
        u64 first = *(volatile u64 *)a;
        u64 mid = *(volatile u64 *)(a + PAGE_SIZE / 2);
        if (first != 0 || mid != 0) {
            if (zero_bad < MAX_REPORTS)
                printk("balloon: page 0x%lx not zero after deflate: first=0x%016lx "
                       "mid=0x%016lx\n", a, first, mid);
            zero_bad++;
        }
        *(volatile u64 *)a = pattern_value(a, seed);
        state[i] = KEPT;
    }
    kept_top += n;
    total_deflated += n;
    write_actual();
}

static void verify_kept(void)
{
    for (u64 i = 0; i < npages; i++) {
        if (state[i] != KEPT)
            continue;
        u64 a = page_addr(i), want = pattern_value(a, seed);
        u64 got = *(volatile u64 *)a;
        if (got != want) {
            if (pattern_bad < MAX_REPORTS)
                printk("balloon: kept page 0x%lx got=0x%016lx want=0x%016lx\n", a, got,
                       want);
            pattern_bad++;
        }
    }
}

void guest_main(unsigned long cpu, unsigned long ncpus, unsigned long memsize,
                const char *cmdline)
{
    check_ncpus(cpu, ncpus);
    if (cpu != 0)
        halt_forever();

    /* ---- configuration ---- */
    u64 base = cmdline_u64(cmdline, "base", 16UL << 20);
    u64 bytes = cmdline_u64(cmdline, "bytes", 32UL << 20);
    u64 steps = cmdline_u64(cmdline, "steps", 3);
    /* RAM beyond 3 GiB lives at 4 GiB+, so memsize only bounds RAM below the gap. */
    u64 ram_top = cmdline_u64(cmdline, "memtop", memsize > MMIO_GAP ? MMIO_GAP : memsize);
    seed = cmdline_u64(cmdline, "seed", 1);

    if (base & (PAGE_SIZE - 1)) {       /* round up to a page boundary */
        u64 nb = (base + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
        bytes = bytes > nb - base ? bytes - (nb - base) : 0;
        base = nb;
    }
    if (base >= ram_top)
        config_error("balloon: error: base=0x%lx is beyond guest RAM (memsize=0x%lx)\n",
                     base, ram_top);
    if (base < (u64)__image_end)
        config_error("balloon: error: base=0x%lx overlaps the guest image or low memory "
                     "(must be >= 0x%lx)\n", base, (u64)__image_end);
    if (bytes > ram_top - base)
        bytes = ram_top - base;
    npages = bytes >> PAGE_SHIFT;
    if (npages == 0)
        config_error("balloon: error: the pool at base=0x%lx holds no whole page\n", base);
    if (npages > MAX_PAGES)
        config_error("balloon: error: bytes=0x%lx is more than the %lu MiB pool maximum\n",
                     bytes, (MAX_PAGES * PAGE_SIZE) >> 20);
    pool_base = base;
    kept_top = npages;

    /* ---- device ---- */
    if (virtio_find(cmdline, VIRTIO_ID_BALLOON, &dev) < 0) {
        printk("balloon: error: no balloon device\n");
        exit_vm(2);
    }
    int r = virtio_init(&dev, 0, 0);
    if (r < 0)
        device_error("feature negotiation failed", r);
    if ((r = virtq_setup(&dev, INFLATEQ, &inflateq, QSIZE)) < 0)
        device_error("cannot set up the inflate queue", r);
    if ((r = virtq_setup(&dev, DEFLATEQ, &deflateq, QSIZE)) < 0)
        device_error("cannot set up the deflate queue", r);
    if ((r = virtio_driver_ok(&dev)) < 0)
        device_error("device refused DRIVER_OK", r);
    write_actual();

    printk("balloon: device at 0x%lx gsi=%u pool base=0x%lx pages=%lu steps=%lu\n",
           dev.base, dev.gsi, pool_base, npages, steps);

    /* ---- fill the pool: one pattern word per page makes every page resident ---- */
    pattern_fill(pool_base, npages, PAGE_SIZE, seed);

    /* ---- follow the target ---- */
    u64 done_steps = 0, last_reached = 0;
    u64 warned = ~0UL;
    while (done_steps < steps) {
        u64 want = virtio_config_read32(&dev, CFG_NUM_PAGES);
        u64 target = want;
        if (target > npages) {
            if (want != warned) {
                printk("balloon: warning: target=%lu pages is more than the pool (%lu), "
                       "capped\n", want, npages);
                warned = want;
            }
            target = npages;
        }
        u64 actual = npages - kept_top;
        if (target > actual) {
            inflate(target - actual);
        } else if (target < actual) {
            deflate(actual - target);
        } else if (target != last_reached) {
            printk("balloon: reached target=%lu actual=%lu\n", target, actual);
            last_reached = target;
            done_steps++;
        } else {
            idle();
        }
    }

    verify_kept();
    printk("balloon: done inflated=%lu deflated=%lu zero_bad=%lu pattern_bad=%lu "
           "steps=%lu\n", total_inflated, total_deflated, zero_bad, pattern_bad,
           done_steps);
    exit_vm(zero_bad == 0 && pattern_bad == 0 ? 0 : 1);
}
