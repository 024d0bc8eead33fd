/*
 * memchurn: follows a virtio-balloon and/or a virtio-mem device at the same time
 * while worker vCPUs keep writing and verifying the memory that is plugged (and,
 * optionally, a boot-RAM area the host may discard at marker exits). Checks that
 * re-plugged blocks and deflated pages read zero, that nothing written is lost,
 * and that the device answers PLUG/UNPLUG/STATE as the spec says.
 * See ../README.md for keys and output.
 *
 * vCPU 0 is the driver (polls both devices and the host signal port, no
 * interrupts); vCPUs >= 1 are workers. The virtio-mem block table is shared:
 * a block moves FREE -> IDLE (driver, after an acked PLUG), IDLE <-> INUSE
 * (a worker, lock cmpxchg), IDLE -> UNPLUGGING -> FREE (driver, around the
 * UNPLUG). Nothing touches a FREE (unplugged) block.
 */
#include "../common/lib.h"
#include "../common/virtio.h"

#define PAGE_SHIFT      12
#define PAGE_SIZE       (1UL << PAGE_SHIFT)
#define MIB             (1UL << 20)
#define RAM_GAP         0xc0000000UL    /* boot RAM and the region must stay below 3 GiB */
#define MAX_BLOCKS      2048            /* 4 GiB of 2 MiB blocks */
#define MIN_BLOCK_SIZE  (2UL << 20)
#define SIGNAL_PORT     0x503           /* inl: 0 = go on, 1 = finish */
#define SIGNAL_ABSENT   0xffffffffu     /* what an unclaimed port reads: not a request */
#define CHUNK           256             /* PFNs per balloon chain */
#define BAL_QSIZE       16
#define MEM_QSIZE       8
#define POLL_PAUSES     500             /* pause instructions between idle driver loops */
#define WAIT_ITERS      200000UL        /* used-ring polls before a request times out */
#define BUSY_RETRIES    1000            /* STATE / UNPLUG_ALL / overplug UNPLUG answered BUSY */
#define HOLD_LOOPS      100             /* loops without PLUG/UNPLUG after a NACK or failure */
#define WORKER_WAIT     100000000UL     /* pauses the driver waits for the workers at the end */
#define WORK_CHUNK      (256 * PAGE_SIZE) /* workers look at `done` this often */
#define MAX_REPORTS     8               /* detail lines for mismatches, all vCPUs together */
#define BALLOONED_SALT  0x0ba11005ba11UL /* value written into ballooned pages */

/* Block table entry: state = kind | B_WRITTEN. */
enum { B_FREE = 0, B_IDLE = 1, B_INUSE = 2, B_UNPLUGGING = 3 };
#define B_KIND          3u
#define B_WRITTEN       4u              /* the worker pattern for `gen` is in every page */

struct mblock {
    u32 state;
    u32 gen;                            /* bumped by the worker that takes the block */
};

struct wslot {                          /* one per worker, read by the driver at the end */
    u64 rounds, bad, zero_checks, zero_bad, verified;
    u32 reported;
} __attribute__((aligned(64)));

static struct mblock blocks[MAX_BLOCKS];
static struct wslot wslots[GUEST_MAX_CPUS];

/* ---- shared, set by the driver before `ready` ---- */
static u32 ready, done;
static u64 seed;
static u32 mem_present;
static u64 mem_addr, mem_bs, mem_nblocks;
static u32 mem_hi;                      /* blocks >= mem_hi are FREE */
static u32 mem_avoid;                   /* workers take no block >= mem_avoid */
static u64 area_base, area_pages, area_per, nworkers, wdiscard;
static u32 reports;

/* ---- driver only ---- */
static struct virtio_dev bal, mem;
static struct virtq inflateq, deflateq, memq;
static u32 pfns[CHUNK] __attribute__((aligned(64)));
static struct virtio_mem_req mreq __attribute__((aligned(64)));
static struct virtio_mem_resp mresp __attribute__((aligned(64)));
static u32 bal_present, bal_active, use_ballooned, overplug;
static u64 pool_base, pool_pages, kept_top;     /* pool pages [kept_top, pool_pages) ballooned */
static u64 nplugged;                            /* blocks IDLE/INUSE/UNPLUGGING */
static u64 hold_req, hold;                      /* loops without PLUG/UNPLUG after a failure */
static u32 overplug_done;
static u64 c_plugs, c_unplugs, c_nacks, c_overplug_acked, c_state_bad, c_errors;
static u64 c_inflated, c_deflated, c_zero_bad, c_pattern_bad, c_ballooned_writes;
static u64 c_zero_checks, c_verified;    /* pages the driver checked for zero / pattern */

/* ------------------------------------------------------------- helpers */

static inline u32 load32(const u32 *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store32(u32 *p, u32 v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int cas32(u32 *p, u32 *expected, u32 desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}

static void pause_n(int n)
{
    for (int i = 0; i < n; i++)
        cpu_relax();
}

static int may_report(void)
{
    return __atomic_fetch_add(&reports, 1, __ATOMIC_RELAXED) < MAX_REPORTS;
}

static u64 min_u64(u64 a, u64 b) { return a < b ? a : b; }

static u64 block_addr(u64 b) { return mem_addr + b * mem_bs; }

#define config_error(...)               \
    do {                                \
        printk(__VA_ARGS__);            \
        exit_vm(2);                     \
    } while (0)

static NORETURN void device_error(const char *what, int err)
{
    printk("memchurn: error: %s (err=%d)\n", what, err);
    exit_vm(3);
}

/* First word of every page in [a, end) := pattern_value(page, s). */
static void fill_pages(u64 a, u64 end, u64 s)
{
    for (; a != end; a += PAGE_SIZE)
        *(volatile u64 *)a = (a ^ s) * PATTERN_MUL;
}

__attribute__((noinline, cold))
static void report_mismatch(const char *what, u64 cpu, u64 a, u64 got, u64 want)
{
    if (may_report())
        printk("memchurn cpu=%lu %s: page 0x%lx got=0x%016lx want=0x%016lx\n", cpu, what, a,
               got, want);
}

/* Pages in [a, end) whose first word is not pattern_value(page, s). */
static u64 verify_pages(u64 a, u64 end, u64 s, const char *what, u64 cpu)
{
    u64 bad = 0;
    for (; a != end; a += PAGE_SIZE) {
        u64 want = (a ^ s) * PATTERN_MUL, got = *(volatile u64 *)a;
        if (unlikely(got != want)) {
            bad++;
            report_mismatch(what, cpu, a, got, want);
        }
    }
    return bad;
}

/* Pages in [a, end) whose first word (and, with mid, the word at +2048) is not 0. */
static u64 nonzero_pages(u64 a, u64 end, int mid, const char *what, u64 cpu)
{
    u64 bad = 0;
    for (; a != end; a += PAGE_SIZE) {
        u64 w0 = *(volatile u64 *)a;
        u64 w1 = mid ? *(volatile u64 *)(a + PAGE_SIZE / 2) : 0;
        if (unlikely(w0 | w1)) {
            bad++;
            report_mismatch(what, cpu, a, w0 ? w0 : w1, 0);
        }
    }
    return bad;
}

/* ---------------------------------------------------------------- workers */

struct wcount {
    u64 rounds, bad, zero_checks, zero_bad, verified;
};

/* One virtio-mem block: take an IDLE one, write its pages, verify, give it back.
 * Returns 1 if a block was taken. *next is where the next scan starts. */
static int worker_block(u64 cpu, u32 *next, struct wcount *c)
{
    u32 n = load32(&mem_hi), lim = load32(&mem_avoid);
    if (lim < n)
        n = lim;
    if (n == 0)
        return 0;
    u32 b = *next < n ? *next : 0;
    for (u32 k = 0; k < n; k++, b = b + 1 == n ? 0 : b + 1) {
        u32 s = __atomic_load_n(&blocks[b].state, __ATOMIC_RELAXED);
        if ((s & B_KIND) != B_IDLE || !cas32(&blocks[b].state, &s, B_INUSE))
            continue;
        /* INUSE: the block is ours until we put it back. */
        u32 gen = blocks[b].gen + 1;
        blocks[b].gen = gen;
        u64 base = block_addr(b), end = base + mem_bs, ps = seed ^ gen;
        u32 after = B_IDLE;
        int complete = 0;
        u64 a = base;
        while (a != end) {
            u64 stop = min_u64(a + WORK_CHUNK, end);
            fill_pages(a, stop, ps);
            a = stop;
            if (a != end && load32(&done))
                break;
        }
        if (a == end) {                 /* fully written: the pattern is defined */
            after |= B_WRITTEN;
            for (a = base; a != end;) {
                u64 stop = min_u64(a + WORK_CHUNK, end);
                c->bad += verify_pages(a, stop, ps, "block", cpu);
                c->verified += (stop - a) >> PAGE_SHIFT;
                a = stop;
                if (a != end && load32(&done))
                    break;
            }
            complete = a == end;
        }
        u32 expect = B_INUSE;
        if (!cas32(&blocks[b].state, &expect, after)) {
            c->bad++;
            if (may_report())
                printk("memchurn cpu=%lu block %u changed state while in use: 0x%x\n",
                       cpu, b, expect);
        }
        if (complete)
            c->rounds++;
        *next = b + 1;
        return 1;
    }
    return 0;
}

/* Visit order of a worker's area pages: sequential, or a permutation
 * (index i -> (i * RANDOM_STEP + offset) mod n, RANDOM_STEP a prime larger than
 * any share, so coprime with n). wpattern: 0 sequential, 1 random, 2 mixed
 * (random on odd epochs). */
#define RANDOM_STEP 1000003UL
static u64 wpattern;

static int epoch_random(u64 e)
{
    return wpattern == 1 || (wpattern == 2 && (e & 1));
}

/* Page address of visit i of n pages from base in epoch e. */
static u64 visit(u64 base, u64 n, u64 i, u64 e, int random)
{
    if (!random)
        return base + (i << PAGE_SHIFT);
    return base + ((((i * RANDOM_STEP) % n) + e * 7919) % n << PAGE_SHIFT);
}

/* One epoch over this worker's share of the boot-RAM area: (with wdiscard)
 * check every page reads zero after the host's discard, write the epoch's
 * pattern, verify it, then tell the host (marker) the epoch is done. */
static void worker_area(u64 cpu, u64 base, u64 end, u64 e, struct wcount *c)
{
    u64 ps = seed ^ (cpu << 32) ^ e, n = (end - base) >> PAGE_SHIFT, i;
    int rnd = epoch_random(e);

    if (wdiscard && e > 1) {
        for (i = 0; i < n; i++) {
            u64 a = visit(base, n, i, e, rnd);
            c->zero_checks++;
            c->zero_bad += nonzero_pages(a, a + PAGE_SIZE, 0, "area not discarded", cpu);
            if ((i & 255) == 255 && load32(&done))
                return;
        }
    }
    for (i = 0; i < n; i++) {
        u64 a = visit(base, n, i, e, rnd);
        fill_pages(a, a + PAGE_SIZE, ps);
        if ((i & 255) == 255 && load32(&done))
            return;
    }
    for (i = 0; i < n; i++) {
        u64 a = visit(base, n, i, e, rnd);
        c->bad += verify_pages(a, a + PAGE_SIZE, ps, "area", cpu);
        c->verified++;
        if ((i & 255) == 255 && i + 1 != n && load32(&done))
            return;
    }
    marker(0x100 + (u32)cpu);
    c->rounds++;
}

static NORETURN void worker(u64 cpu)
{
    struct wcount c = { 0 };
    u32 next = 0;
    u64 epoch = 0, abase = 0, aend = 0;

    while (!load32(&ready))
        cpu_relax();
    if (area_pages) {
        u64 w = cpu - 1, first = w * area_per;
        u64 count = w + 1 == nworkers ? area_pages - first : area_per;
        abase = area_base + (first << PAGE_SHIFT);
        aend = abase + (count << PAGE_SHIFT);
    }
    if (mem_present && mem_nblocks)
        next = (u32)((cpu - 1) * mem_nblocks / nworkers);
    while (!load32(&done)) {
        int did = 0;
        if (mem_present)
            did = worker_block(cpu, &next, &c);
        if (abase != aend && !load32(&done)) {
            worker_area(cpu, abase, aend, ++epoch, &c);
            did = 1;
        }
        if (!did)
            pause_n(POLL_PAUSES);
    }
    struct wslot *s = &wslots[cpu];
    s->rounds = c.rounds;
    s->bad = c.bad;
    s->zero_checks = c.zero_checks;
    s->zero_bad = c.zero_bad;
    s->verified = c.verified;
    store32(&s->reported, 1);
    halt_forever();
}

/* ---------------------------------------------------------------- balloon */

static u64 pool_addr(u64 i) { return pool_base + (i << PAGE_SHIFT); }

static void post_pfns(struct virtq *vq, u32 n)
{
    int r = virtq_transact(vq, (u64)pfns, n * 4, 0, 0, WAIT_ITERS, 0);
    if (r == -VIRTIO_ETIMEDOUT)
        device_error(vq == &inflateq ? "timeout waiting for the inflateq used ring"
                                     : "timeout waiting for the deflateq used ring", r);
    if (r < 0)
        device_error("balloon queue failure", r);
}

static void write_actual(void)
{
    virtio_config_write32(&bal, VIRTIO_BALLOON_CFG_ACTUAL, (u32)(pool_pages - kept_top));
}

static void inflate(u64 n)
{
    n = min_u64(n, CHUNK);
    for (u64 k = 0; k < n; k++)
        pfns[k] = (u32)((pool_base >> PAGE_SHIFT) + kept_top - 1 - k);
    post_pfns(&inflateq, (u32)n);
    kept_top -= n;
    c_inflated += n;
    write_actual();
    if (use_ballooned) {
        /* A misbehaving guest: use a page it just gave away. Its content before
         * the inflate is gone (discarded); what it writes now is undefined for
         * the device: at the next deflate the page reads either this write or
         * zero, nothing else. */
        u64 a = pool_addr(kept_top);
        *(volatile u64 *)a = pattern_value(a, seed ^ BALLOONED_SALT);
        c_ballooned_writes++;
    }
}

static void deflate(u64 n)
{
    n = min_u64(n, CHUNK);
    for (u64 k = 0; k < n; k++)
        pfns[k] = (u32)((pool_base >> PAGE_SHIFT) + kept_top + k);
    post_pfns(&deflateq, (u32)n);
    for (u64 k = 0; k < n; k++) {
        u64 a = pool_addr(kept_top + k);
        u64 first = *(volatile u64 *)a;
        u64 mid = *(volatile u64 *)(a + PAGE_SIZE / 2);
        int own_write = use_ballooned && first == pattern_value(a, seed ^ BALLOONED_SALT) && !mid;
        c_zero_checks++;
        if ((first | mid) && !own_write) {
            if (may_report())
                printk("memchurn: pool page 0x%lx not zero after deflate: first=0x%016lx "
                       "mid=0x%016lx%s\n", a, first, mid,
                       first == pattern_value(a, seed ^ BALLOONED_SALT)
                           ? " (the guest's write while ballooned)" : "");
            c_zero_bad++;
        }
        *(volatile u64 *)a = pattern_value(a, seed);
    }
    kept_top += n;
    c_deflated += n;
    write_actual();
}

/* One balloon action; *reached: actual == target. Returns 1 if it did something. */
static int balloon_step(int *reached, u64 *target_out)
{
    static u64 warned_plus1;            /* last target warned about + 1 (.bss: 0 = none) */
    u64 want = virtio_config_read32(&bal, VIRTIO_BALLOON_CFG_NUM_PAGES), target = want;

    if (target > pool_pages) {
        if (want + 1 != warned_plus1) {
            printk("memchurn: warning: balloon target=%lu pages is more than the pool "
                   "(%lu), capped\n", want, pool_pages);
            warned_plus1 = want + 1;
        }
        target = pool_pages;
    }
    *target_out = target;
    u64 actual = pool_pages - kept_top;
    *reached = 0;
    if (target > actual) {
        inflate(target - actual);
        return 1;
    }
    if (target < actual) {
        deflate(actual - target);
        return 1;
    }
    *reached = 1;
    return 0;
}

/* -------------------------------------------------------------- virtio-mem */

static const char *resp_name(u32 t)
{
    static const char *const names[] = { "ACK", "NACK", "BUSY", "ERROR" };
    return t < 4 ? names[t] : "bad-type";
}

/* One request; returns the response type (0xffff: the device wrote none). */
static u32 mem_request(u16 type, u64 addr, u16 nb, u16 *state)
{
    struct virtq_used_elem e;

    mreq.type = type;
    mreq.addr = addr;
    mreq.nb_blocks = nb;
    mresp.type = 0xffff;
    mresp.state = 0xffff;
    int r = virtq_transact(&memq, (u64)&mreq, sizeof(mreq), (u64)&mresp, sizeof(mresp),
                           WAIT_ITERS, &e);
    if (r == -VIRTIO_ETIMEDOUT)
        device_error("timeout waiting for the virtio-mem used ring", r);
    if (r < 0)
        device_error("virtio-mem queue failure", r);
    virtio_mb();
    if (state)
        *state = mresp.state;
    return mresp.type;
}

/* Same, but BUSY is retried (bounded) here. */
static u32 mem_request_retry(u16 type, u64 addr, u16 nb, u16 *state)
{
    u32 t = VIRTIO_MEM_RESP_BUSY;
    for (int i = 0; i < BUSY_RETRIES && t == VIRTIO_MEM_RESP_BUSY; i++) {
        if (i)
            pause_n(POLL_PAUSES);
        t = mem_request(type, addr, nb, state);
    }
    return t;
}

/* STATE of one block must be `want` (state_bad), the request must be ACKed (errors). */
static void check_state(u64 b, u16 want)
{
    u16 st;
    u32 t = mem_request_retry(VIRTIO_MEM_REQ_STATE, block_addr(b), 1, &st);
    if (t != VIRTIO_MEM_RESP_ACK) {
        c_errors++;
        if (may_report())
            printk("memchurn: STATE of block %lu answered %s (0x%x)\n", b, resp_name(t), t);
    } else if (st != want) {
        c_state_bad++;
        if (may_report())
            printk("memchurn: STATE of block %lu is %u, expected %u\n", b, st, want);
    }
}

/* After a NACK or a failed request, PLUG/UNPLUG rest for HOLD_LOOPS driver loops or
 * until requested_size changes, whichever comes first. */
static void set_hold(u64 req)
{
    hold = HOLD_LOOPS;
    hold_req = req;
}

static void raise_hi(u64 b)
{
    if (b + 1 > load32(&mem_hi))
        store32(&mem_hi, (u32)(b + 1));
}

static void lower_hi(void)
{
    u32 hi = load32(&mem_hi);
    while (hi && (__atomic_load_n(&blocks[hi - 1].state, __ATOMIC_RELAXED) & B_KIND) == B_FREE)
        hi--;
    store32(&mem_hi, hi);
}

/* Lowest FREE block below the usable size, or -1. */
static i64 lowest_free(void)
{
    u64 usable = virtio_config_read64(&mem, VIRTIO_MEM_CFG_USABLE_SIZE) / mem_bs;
    usable = min_u64(usable, mem_nblocks);
    for (u64 b = 0; b < usable; b++)
        if ((__atomic_load_n(&blocks[b].state, __ATOMIC_RELAXED) & B_KIND) == B_FREE)
            return (i64)b;
    return -1;
}

static void plug_one(u64 b, u64 req)
{
    u32 t = mem_request(VIRTIO_MEM_REQ_PLUG, block_addr(b), 1, 0);
    switch (t) {
    case VIRTIO_MEM_RESP_ACK: {
        c_plugs++;
        nplugged++;
        check_state(b, VIRTIO_MEM_STATE_PLUGGED);
        u64 a = block_addr(b);
        c_zero_bad += nonzero_pages(a, a + mem_bs, 1, "re-plugged block not zero", 0);
        c_zero_checks += mem_bs >> PAGE_SHIFT;
        store32(&blocks[b].state, B_IDLE);      /* written = 0: workers may take it now */
        raise_hi(b);
        break;
    }
    case VIRTIO_MEM_RESP_NACK:
        c_nacks++;
        set_hold(req);
        break;
    case VIRTIO_MEM_RESP_BUSY:
        pause_n(POLL_PAUSES);                   /* try again next loop */
        break;
    default:
        c_errors++;
        set_hold(req);
        if (may_report())
            printk("memchurn: PLUG of block %lu answered %s (0x%x)\n", b, resp_name(t), t);
        break;
    }
}

/* plugged > target: unplug the highest IDLE block. Returns 1 if a request was sent. */
static int unplug_one(u64 excess, u64 req)
{
    u32 hi = load32(&mem_hi);

    /* Workers leave the `excess` highest plugged blocks alone from now on. */
    u64 seen = 0;
    for (u32 b = hi; b-- > 0;) {
        if ((__atomic_load_n(&blocks[b].state, __ATOMIC_RELAXED) & B_KIND) != B_FREE &&
            ++seen == excess) {
            store32(&mem_avoid, b);
            break;
        }
    }
    if (hold)
        return 0;
    for (u32 b = hi; b-- > 0;) {
        u32 s = __atomic_load_n(&blocks[b].state, __ATOMIC_RELAXED);
        if ((s & B_KIND) != B_IDLE || !cas32(&blocks[b].state, &s, B_UNPLUGGING))
            continue;
        u64 a = block_addr(b);
        if (s & B_WRITTEN) {
            c_pattern_bad += verify_pages(a, a + mem_bs, seed ^ blocks[b].gen,
                                          "block before unplug", 0);
            c_verified += mem_bs >> PAGE_SHIFT;
        }
        u32 t = mem_request(VIRTIO_MEM_REQ_UNPLUG, a, 1, 0);
        if (t == VIRTIO_MEM_RESP_ACK) {
            c_unplugs++;
            nplugged--;
            store32(&blocks[b].state, B_FREE);
            lower_hi();
            check_state(b, VIRTIO_MEM_STATE_UNPLUGGED);
        } else {
            store32(&blocks[b].state, s);       /* still plugged as far as we know */
            if (t == VIRTIO_MEM_RESP_BUSY) {
                pause_n(POLL_PAUSES);           /* try again next loop */
            } else {
                c_errors++;
                set_hold(req);
                if (may_report())
                    printk("memchurn: UNPLUG of block %u answered %s (0x%x)\n", b,
                           resp_name(t), t);
            }
        }
        return 1;
    }
    return 0;                                   /* all in use: next loop */
}

/* overplug=1: one PLUG beyond requested_size, which the device must NACK. */
static void try_overplug(u64 b)
{
    u32 t = mem_request(VIRTIO_MEM_REQ_PLUG, block_addr(b), 1, 0);
    if (t == VIRTIO_MEM_RESP_BUSY) {
        pause_n(POLL_PAUSES);                   /* try again next loop */
        return;
    }
    overplug_done = 1;
    if (t == VIRTIO_MEM_RESP_NACK) {
        c_nacks++;
        return;
    }
    if (t != VIRTIO_MEM_RESP_ACK) {
        c_errors++;
        if (may_report())
            printk("memchurn: overplug PLUG of block %lu answered %s (0x%x)\n", b,
                   resp_name(t), t);
        return;
    }
    c_overplug_acked++;
    printk("memchurn: device acked a PLUG beyond requested_size (block %lu)\n", b);
    t = mem_request_retry(VIRTIO_MEM_REQ_UNPLUG, block_addr(b), 1, 0);
    if (t != VIRTIO_MEM_RESP_ACK) {
        /* It stays plugged: an ordinary IDLE block the loop will unplug. */
        c_errors++;
        nplugged++;
        store32(&blocks[b].state, B_IDLE);
        raise_hi(b);
        if (may_report())
            printk("memchurn: UNPLUG of overplugged block %lu answered %s (0x%x)\n", b,
                   resp_name(t), t);
    }
}

/* One virtio-mem action; *reached: plugged == target. Returns 1 if it sent a request. */
static int mem_step(int *reached, u64 *target_out)
{
    u64 req = virtio_config_read64(&mem, VIRTIO_MEM_CFG_REQUESTED_SIZE);
    u64 tb = min_u64(req / mem_bs, mem_nblocks);
    int did = 0;

    if (hold)
        hold = req != hold_req ? 0 : hold - 1;
    *target_out = tb * mem_bs;
    if (nplugged > tb) {
        did = unplug_one(nplugged - tb, req);
    } else {
        if (load32(&mem_avoid) != ~0u)
            store32(&mem_avoid, ~0u);
        if (nplugged < tb && !hold) {
            i64 b = lowest_free();
            if (b >= 0) {
                plug_one((u64)b, req);
                did = 1;
            }
        }
    }
    /* The over-plug goes out in the same loop that reached the target (the host
     * may move requested_size as soon as plugged_size matches it), and only if
     * requested_size still says the same. */
    if (overplug && !overplug_done && tb > 0 && nplugged == tb &&
        virtio_config_read64(&mem, VIRTIO_MEM_CFG_REQUESTED_SIZE) == req) {
        i64 b = lowest_free();
        if (b >= 0) {
            try_overplug((u64)b);
            did = 1;
        }
    }
    *reached = nplugged == tb;
    return did;
}

/* ------------------------------------------------------------------ driver */

/* Rounds [*base, *base + *bytes) to whole pages inside [image end, ram_top);
 * exits 2 with a message naming `what` if nothing is left. */
static void page_range(const char *what, u64 *base, u64 *bytes, u64 ram_top)
{
    u64 b = *base, n = *bytes;
    if (b & (PAGE_SIZE - 1)) {
        u64 nb = (b + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
        n = n > nb - b ? n - (nb - b) : 0;
        b = nb;
    }
    if (b >= ram_top)
        config_error("memchurn: error: %s base=0x%lx is beyond guest RAM (top=0x%lx)\n",
                     what, b, ram_top);
    if (b < (u64)__image_end)
        config_error("memchurn: error: %s base=0x%lx overlaps the guest image or low "
                     "memory (must be >= 0x%lx)\n", what, b, (u64)__image_end);
    n = min_u64(n, ram_top - b) & ~(PAGE_SIZE - 1);
    if (n == 0)
        config_error("memchurn: error: the %s at 0x%lx holds no whole page\n", what, b);
    *base = b;
    *bytes = n;
}

static int overlaps(u64 a, u64 an, u64 b, u64 bn)
{
    return an && bn && a < b + bn && b < a + an;
}

static void setup_balloon(void)
{
    int r = virtio_init(&bal, 0, 0);
    if (r < 0)
        device_error("balloon feature negotiation failed", r);
    for (u32 q = 0; q < 2; q++) {
        u32 max = virtq_num_max(&bal, q), size = BAL_QSIZE;
        while (size > max)
            size >>= 1;
        if (size == 0)
            device_error("balloon queue missing", -VIRTIO_EQUEUE);
        r = virtq_setup(&bal, q, q == 0 ? &inflateq : &deflateq, size);
        if (r < 0)
            device_error("cannot set up a balloon queue", r);
    }
    if ((r = virtio_driver_ok(&bal)) < 0)
        device_error("balloon refused DRIVER_OK", r);
    kept_top = pool_pages;
    write_actual();
}

static void setup_mem(void)
{
    u64 negotiated;
    int r = virtio_init(&mem, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, &negotiated);
    if (r < 0)
        device_error("virtio-mem feature negotiation failed", r);
    u32 max = virtq_num_max(&mem, VIRTIO_MEM_REQQ), size = MEM_QSIZE;
    while (size > max)
        size >>= 1;
    if (size == 0)
        device_error("virtio-mem request queue missing", -VIRTIO_EQUEUE);
    if ((r = virtq_setup(&mem, VIRTIO_MEM_REQQ, &memq, size)) < 0)
        device_error("cannot set up the virtio-mem queue", r);
    if ((r = virtio_driver_ok(&mem)) < 0)
        device_error("virtio-mem refused DRIVER_OK", r);

    u64 bs = virtio_config_read64(&mem, VIRTIO_MEM_CFG_BLOCK_SIZE);
    u64 addr = virtio_config_read64(&mem, VIRTIO_MEM_CFG_ADDR);
    u64 size_r = virtio_config_read64(&mem, VIRTIO_MEM_CFG_REGION_SIZE);
    u64 usable = virtio_config_read64(&mem, VIRTIO_MEM_CFG_USABLE_SIZE);
    u64 plugged = virtio_config_read64(&mem, VIRTIO_MEM_CFG_PLUGGED_SIZE);
    u64 req = virtio_config_read64(&mem, VIRTIO_MEM_CFG_REQUESTED_SIZE);
    printk("memchurn: mem at 0x%lx gsi=%u features=0x%lx addr=0x%lx region=0x%lx "
           "usable=0x%lx block=0x%lx plugged=0x%lx requested=0x%lx\n", mem.base, mem.gsi,
           negotiated, addr, size_r, usable, bs, plugged, req);
    if (bs < MIN_BLOCK_SIZE || (bs & (bs - 1)) || (addr & (bs - 1)) || (size_r & (bs - 1))) {
        printk("memchurn: error: virtio-mem geometry: block_size=0x%lx must be a power of "
               "two >= 2 MiB dividing addr=0x%lx and region_size=0x%lx\n", bs, addr, size_r);
        exit_vm(3);
    }
    if (addr >= RAM_GAP || size_r > RAM_GAP - addr)
        config_error("memchurn: error: virtio-mem region 0x%lx+0x%lx goes past 3 GiB\n",
                     addr, size_r);
    if (size_r / bs > MAX_BLOCKS)
        config_error("memchurn: error: virtio-mem region has %lu blocks (at most %d)\n",
                     size_r / bs, MAX_BLOCKS);
    if (overlaps(addr, size_r, 0, (u64)__image_end))
        config_error("memchurn: error: virtio-mem region 0x%lx+0x%lx overlaps the guest "
                     "image\n", addr, size_r);
    mem_addr = addr;
    mem_bs = bs;
    mem_nblocks = size_r / bs;
    if (plugged) {
        /* Left plugged by an earlier driver: start from nothing. */
        u32 t = mem_request_retry(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0, 0);
        plugged = virtio_config_read64(&mem, VIRTIO_MEM_CFG_PLUGGED_SIZE);
        printk("memchurn: UNPLUG_ALL answered %s, plugged=0x%lx\n", resp_name(t), plugged);
        if (t != VIRTIO_MEM_RESP_ACK || plugged) {
            printk("memchurn: error: cannot unplug what was plugged at start\n");
            exit_vm(3);
        }
    }
}

static void print_done(u64 steps, const struct wcount *w)
{
    static const char *const names[] = {
        "steps", "plugs", "unplugs", "nacks", "overplug_acked", "state_bad", "errors",
        "inflated", "deflated", "zero_bad", "pattern_bad", "ballooned_writes",
        "worker_rounds", "worker_bad", "worker_zero_checks", "worker_zero_bad",
        "zero_checks", "verified",
    };
    const u64 vals[] = {
        steps, c_plugs, c_unplugs, c_nacks, c_overplug_acked, c_state_bad, c_errors,
        c_inflated, c_deflated, c_zero_bad, c_pattern_bad, c_ballooned_writes,
        w->rounds, w->bad, w->zero_checks, w->zero_bad,
        c_zero_checks, c_verified + w->verified,
    };
    /* Longer than printk's 256-byte buffer: written under the serial lock. */
    serial_lock();
    serial_puts("memchurn: done");
    for (u32 i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        serial_putc(' ');
        serial_puts(names[i]);
        serial_putc('=');
        serial_print_dec(vals[i]);
    }
    serial_putc('\n');
    serial_unlock();
}

static NORETURN void driver(u64 ncpus, u64 memsize, const char *cmdline)
{
    u64 steps = cmdline_u64(cmdline, "steps", 0);
    u64 pbase = cmdline_u64(cmdline, "pool_base", 16 * MIB);
    u64 pbytes = cmdline_u64(cmdline, "pool_bytes", 32 * MIB);
    u64 wbase = cmdline_u64(cmdline, "wbase", 48 * MIB);
    u64 wbytes = cmdline_u64(cmdline, "wbytes", 0);
    u64 ignore_balloon = cmdline_u64(cmdline, "ignore_balloon", 0);
    u64 ram_top = min_u64(memsize, RAM_GAP);
    seed = cmdline_u64(cmdline, "seed", 1);
    wdiscard = cmdline_u64(cmdline, "wdiscard", 0);
    wpattern = cmdline_u64(cmdline, "wpattern", 0);
    overplug = cmdline_u64(cmdline, "overplug", 0) != 0;
    use_ballooned = cmdline_u64(cmdline, "use_ballooned", 0) != 0;
    nworkers = ncpus - 1;

    bal_present = virtio_find(cmdline, VIRTIO_ID_BALLOON, &bal) == 0;
    mem_present = virtio_find(cmdline, VIRTIO_ID_MEM, &mem) == 0;
    bal_active = bal_present && !ignore_balloon;

    /* ---- boot-RAM ranges ---- */
    if (bal_active) {
        page_range("balloon pool", &pbase, &pbytes, ram_top);
        pool_base = pbase;
        pool_pages = pbytes >> PAGE_SHIFT;
    }
    if (wbytes) {
        page_range("worker area", &wbase, &wbytes, ram_top);
        if (overlaps(wbase, wbytes, pool_base, pool_pages << PAGE_SHIFT))
            config_error("memchurn: error: worker area 0x%lx+0x%lx overlaps the balloon "
                         "pool 0x%lx+0x%lx\n", wbase, wbytes, pool_base,
                         pool_pages << PAGE_SHIFT);
        if (nworkers) {
            area_base = wbase;
            area_pages = wbytes >> PAGE_SHIFT;
            area_per = area_pages / nworkers;
        }
    }
    printk("memchurn: start vcpus=%lu workers=%lu steps=%lu seed=0x%lx balloon=%u mem=%u "
           "overplug=%u ignore_balloon=%lu use_ballooned=%u\n", ncpus, nworkers, steps, seed,
           bal_present, mem_present, overplug, ignore_balloon, use_ballooned);

    /* ---- devices ---- */
    if (bal_present) {
        setup_balloon();
        if (bal_active)
            printk("memchurn: balloon at 0x%lx gsi=%u pool base=0x%lx pages=%lu\n", bal.base,
                   bal.gsi, pool_base, pool_pages);
        else
            printk("memchurn: balloon at 0x%lx gsi=%u ignored (ignore_balloon=1)\n",
                   bal.base, bal.gsi);
    }
    if (mem_present) {
        setup_mem();
        u64 rb = mem_nblocks * mem_bs;
        if (overlaps(mem_addr, rb, pool_base, pool_pages << PAGE_SHIFT) ||
            overlaps(mem_addr, rb, area_base, area_pages << PAGE_SHIFT))
            config_error("memchurn: error: virtio-mem region 0x%lx+0x%lx overlaps the "
                         "balloon pool or the worker area\n", mem_addr, rb);
        if (mem_addr < ram_top)
            printk("memchurn: warning: virtio-mem region 0x%lx is below the top of boot "
                   "RAM (0x%lx)\n", mem_addr, ram_top);
    }
    if (area_pages)
        printk("memchurn: worker area base=0x%lx pages=%lu workers=%lu per_worker=%lu "
               "(last +%lu) wdiscard=%lu\n", area_base, area_pages, nworkers, area_per,
               area_pages - area_per * nworkers, wdiscard);
    else if (wbytes)
        printk("memchurn: worker area unused (no worker vCPUs)\n");

    if (bal_active)
        fill_pages(pool_base, pool_addr(pool_pages), seed);
    store32(&mem_avoid, ~0u);
    store32(&ready, 1);

    /* ---- follow the targets ---- */
    u64 nsteps = 0, last_bal = 0, last_mem = 0;
    int signal_port = 1;
    for (;;) {
        if (steps && nsteps >= steps)
            break;
        if (signal_port) {
            u32 v = inl(SIGNAL_PORT);
            if (v == SIGNAL_ABSENT) {
                printk("memchurn: warning: port 0x%x reads 0x%x: no signal port, not "
                       "polled again\n", SIGNAL_PORT, v);
                signal_port = 0;
            } else if (v) {
                printk("memchurn: host signal 0x%x\n", v);
                break;
            }
        }
        int bal_ok = 1, mem_ok = 1, did = 0;
        u64 bal_t = 0, mem_t = 0;
        if (bal_active)
            did |= balloon_step(&bal_ok, &bal_t);
        if (mem_present)
            did |= mem_step(&mem_ok, &mem_t);
        if (bal_ok && mem_ok && (bal_t != last_bal || mem_t != last_mem)) {
            printk("memchurn: reached balloon=%lu mem=%lu\n", pool_pages - kept_top,
                   nplugged * mem_bs);
            last_bal = bal_t;
            last_mem = mem_t;
            nsteps++;
        }
        if (!did)
            pause_n(POLL_PAUSES);
    }

    /* ---- stop the workers, collect, verify ---- */
    store32(&done, 1);
    struct wcount w = { 0 };
    u64 budget = WORKER_WAIT;
    for (u64 c = 1; c < ncpus; c++) {
        while (!load32(&wslots[c].reported)) {
            if (budget-- == 0) {
                printk("memchurn: error: worker cpu=%lu did not stop\n", c);
                exit_vm(3);
            }
            cpu_relax();
        }
        w.rounds += wslots[c].rounds;
        w.bad += wslots[c].bad;
        w.zero_checks += wslots[c].zero_checks;
        w.zero_bad += wslots[c].zero_bad;
        w.verified += wslots[c].verified;
    }
    for (u64 b = 0; b < mem_nblocks; b++) {
        u32 s = load32(&blocks[b].state);
        if (s == (B_IDLE | B_WRITTEN)) {
            u64 a = block_addr(b);
            c_pattern_bad += verify_pages(a, a + mem_bs, seed ^ blocks[b].gen,
                                          "block at the end", 0);
            c_verified += mem_bs >> PAGE_SHIFT;
        }
    }
    if (bal_active) {
        c_pattern_bad += verify_pages(pool_base, pool_addr(kept_top), seed,
                                      "kept pool page", 0);
        c_verified += kept_top;
    }
    print_done(nsteps, &w);
    int ok = c_zero_bad == 0 && c_pattern_bad == 0 && c_state_bad == 0 && c_errors == 0 &&
             c_overplug_acked == 0 && w.bad == 0 && w.zero_bad == 0;
    exit_vm(ok ? 0 : 1);
}

void guest_main(unsigned long cpu, unsigned long ncpus, unsigned long memsize,
                const char *cmdline)
{
    check_ncpus(cpu, ncpus);
    if (cpu == 0)
        driver(ncpus, memsize, cmdline);
    worker(cpu);
}
