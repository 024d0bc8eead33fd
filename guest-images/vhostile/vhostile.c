/*
 * vhostile: a guest that misbehaves toward every virtio-mmio device on its command
 * line (notifies before setup, pokes read-only and unused registers with odd sizes,
 * bogus features, broken queue configurations, malicious descriptor chains, notify
 * floods), then checks the device still works. vCPU 1 meanwhile keeps writing and
 * verifying a RAM region, so a device that corrupts guest memory shows up there.
 * The guest never judges the device: the host-side test reads the done line.
 * See ../README.md for keys and output.
 *
 * Every address the guest itself dereferences is guest RAM (its image/.bss or the
 * checked region) or a device window; the deliberately bad addresses only ever go
 * into descriptors, ring registers and PFN arrays.
 */
#include "../common/lib.h"
#include "../common/virtio.h"

#define PAGE_SHIFT      12
#define NSCRATCH        16              /* pages the recovery inflate hands out */
#define MAX_QSIZE       256
#define NQ_PROBE        8               /* queue indices notified in steps a and f */
#define POLL_ITERS      5000            /* used-ring polls per malicious chain (~0.15 s) */
#define RECOVER_ITERS   100000          /* used-ring polls for the recovery chain (~3 s) */
#define MMIO_GAP_ADDR   0xd0000000UL
#define GIB             (1UL << 30)
#define MIB             (1UL << 20)

/* Scratch pages: only ever handed to a balloon (they may come back zero). */
static u8 scratch[NSCRATCH][4096] __attribute__((aligned(4096)));
/* PFN arrays the descriptors point at. pfn_ok holds scratch PFNs only (1 KiB, so a
 * device honouring a too-long length still reads harmless PFNs within 256 entries). */
static u32 pfn_ok[MAX_QSIZE] __attribute__((aligned(4096)));
static u32 pfn_bad[16] __attribute__((aligned(64)));
static u32 npfn_bad;
/* Rings for step d: room for a 512-entry queue (desc 8 KiB, avail, used 4102 bytes). */
#define RAW_DESC        0x0000
#define RAW_AVAIL       0x2000
#define RAW_USED        0x3000
static u8 rawring[6 * 4096] __attribute__((aligned(4096)));

static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
static struct virtq vq0, vq1;
static u64 memsize_g;
static u32 sink;

/* vCPU 0 <-> checker (vCPU 1) */
static u32 done_flag, reported;
static u64 checker_rounds, checker_bad;

/* ------------------------------------------------------------ raw MMIO */

static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)a; }
static inline void wr8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void wr64(u64 a, u64 v) { *(volatile u64 *)a = v; }

static void step(int i, const char *name)
{
    printk("vhostile: dev=%d step=%s\n", i, name);
}

/* Largest power of two <= min(max, cap); 0 if max is 0. */
static u32 qsize_for(u32 max, u32 cap)
{
    u32 m = max < cap ? max : cap, s = 1;
    if (m == 0)
        return 0;
    while (s * 2 <= m)
        s *= 2;
    return s;
}

static u64 scratch_pfn(u32 k)
{
    return ((u64)scratch[k % NSCRATCH]) >> PAGE_SHIFT;
}

/* (Re)writes pfn_ok: a device that treated one of its buffers as writable may have
 * scribbled on it. pfn_ok[k] is scratch page k % 16. */
static void fill_pfn_ok(void)
{
    for (u32 k = 0; k < MAX_QSIZE; k++)
        pfn_ok[k] = (u32)scratch_pfn(k);
}

/* ---------------------------------------------- a. notify before setup */

static void step_early_notify(const struct virtio_dev *d)
{
    for (u32 q = 0; q < NQ_PROBE; q++)
        wr32(d->base + VIRTIO_MMIO_QUEUE_NOTIFY, q);
}

/* ------------------------------------ b. read-only / odd-size / unused */

static void step_registers(const struct virtio_dev *d)
{
    static const u32 ro[] = {
        VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_VERSION, VIRTIO_MMIO_DEVICE_ID,
        VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_INTERRUPT_STATUS,
        VIRTIO_MMIO_CONFIG_GENERATION,
    };
    static const u32 vals[] = { 0xffffffffu, 0, 0x80000001u, 0x00010002u,
                                VIRTIO_MMIO_MAGIC ^ 1 };
    static const u32 narrow[] = { 0x001, 0x013, 0x052, 0x0ff, 0x030, 0x071, 0x103, 0x13f };
    static const u32 wide[] = { 0x000, 0x080, 0x100, 0x1f8 };
    u64 b = d->base;

    for (u32 r = 0; r < sizeof(ro) / sizeof(ro[0]); r++)
        for (u32 v = 0; v < sizeof(vals) / sizeof(vals[0]); v++) {
            wr32(b + ro[r], vals[v]);
            sink += rd32(b + ro[r]);
        }
    /* first 64 bytes of config space: whole words, then odd bytes and halves */
    for (u32 off = 0; off < 64; off += 4) {
        wr32(b + VIRTIO_MMIO_CONFIG + off, 0xffffffffu);
        sink += rd32(b + VIRTIO_MMIO_CONFIG + off);
        wr32(b + VIRTIO_MMIO_CONFIG + off, 0x80000000u | off);
    }
    for (u32 off = 1; off < 64; off += 8) {
        wr8(b + VIRTIO_MMIO_CONFIG + off, 0xff);
        sink += rd8(b + VIRTIO_MMIO_CONFIG + off);
        wr16(b + VIRTIO_MMIO_CONFIG + off + 2, 0xfffe);
        sink += rd16(b + VIRTIO_MMIO_CONFIG + off + 2);
    }
    /* unaligned / narrow accesses to registers (0x0ff and 0x13f straddle) */
    for (u32 k = 0; k < sizeof(narrow) / sizeof(narrow[0]); k++) {
        u64 a = b + narrow[k];
        sink += rd8(a);
        wr8(a, 0xff);
        sink += rd16(a);
        wr16(a, 0xffff);
    }
    /* 64-bit accesses */
    for (u32 k = 0; k < sizeof(wide) / sizeof(wide[0]); k++) {
        u64 a = b + wide[k];
        sink += (u32)rd64(a);
        wr64(a, ~0UL);
    }
    /* past the config space: 0x200..0xff8 (within the window) */
    u64 end = d->size < 0x1000 ? d->size : 0x1000;
    for (u64 off = 0x200; off + 8 <= end; off += 8) {
        wr32(b + off, 0xffffffffu);
        sink += rd32(b + off);
    }
}

/* ------------------------------------------------- b'. random registers */

/* `n` seeded random writes (8, 16 or 32 bits) anywhere in the first 0x200 bytes
 * (every register and the config space), each followed by a read elsewhere. Ring
 * address registers only ever get addresses inside the zeroed `rawring`, so a
 * device that goes live and is notified finds empty rings and writes nowhere else.
 * The device is reset afterwards. */
static void step_random_registers(const struct virtio_dev *d, int i, u64 n)
{
    u64 x = 0xbadc0ffeeUL + (u64)i, b = d->base, raw = (u64)rawring;

    for (u64 off = 0; off < sizeof(rawring); off += 8)
        *(volatile u64 *)(raw + off) = 0;
    for (u64 k = 0; k < n; k++) {
        u64 r = mix64(x += 0x9e3779b97f4a7c15UL);
        u32 off = (u32)(r % 0x200), v = (u32)(r >> 32);
        if (off >= 0x80 && off < 0xa8) {            /* QueueDesc/Driver/Device */
            off &= ~3u;
            v = (off & 4) ? 0 : (u32)(raw + (v % (sizeof(rawring) / 4096)) * 4096);
        }
        switch ((r >> 24) % 3) {
        case 0: wr8(b + off, (u8)v); break;
        case 1: wr16(b + (off & ~1u), (u16)v); break;
        default: wr32(b + (off & ~3u), v); break;
        }
        sink += rd32(b + ((u32)(r >> 12) % 0x200 & ~3u));
    }
    virtio_set_status(d, 0);
    printk("vhostile: dev=%d random_registers=%lu status=0x%x\n", i, n, virtio_get_status(d));
}

/* ----------------------------------------------------- c. bogus features */

/* Returns 1 if FEATURES_OK stuck after accepting all 64 feature bits. */
static int step_bogus_features(const struct virtio_dev *d, int i)
{
    virtio_reset(d);
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 offered = virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES);
    virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, 0xffffffffu);
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, 0xffffffffu);
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
                         VIRTIO_STATUS_FEATURES_OK);
    u32 st = virtio_get_status(d);
    int stuck = (st & VIRTIO_STATUS_FEATURES_OK) != 0;
    printk("vhostile: dev=%d bogus_features offered=0x%lx features_ok=%d status=0x%x\n",
           i, offered, stuck, st);
    virtio_set_status(d, 0);
    return stuck;
}

/* ------------------------------------------------ d. bad queue configs */

static void step_bad_queues(struct virtio_dev *d, int i)
{
    u64 raw = (u64)rawring;
    u64 gap = MMIO_GAP_ADDR, far = memsize_g + GIB;
    u32 max = virtq_num_max(d, 0);
    u32 ok = qsize_for(max, 16) ? qsize_for(max, 16) : 16;
    struct {
        const char *name;
        u32 num;
        u64 desc, drv, dev;
    } c[] = {
        { "num3", 3, raw + RAW_DESC, raw + RAW_AVAIL, raw + RAW_USED },
        { "num2x", max * 2, raw + RAW_DESC, raw + RAW_AVAIL, raw + RAW_USED },
        { "unaligned", ok, raw + RAW_DESC + 8, raw + RAW_AVAIL + 1, raw + RAW_USED + 2 },
        { "mmio_gap", ok, gap, gap + 0x400, gap + 0x800 },
        { "beyond_ram", ok, far, far + 0x1000, far + 0x2000 },
    };

    for (u32 k = 0; k < sizeof(c) / sizeof(c[0]); k++) {
        /* empty rings: avail idx 0 / used idx 0 wherever the device looks */
        for (u32 off = 0; off < 64; off += 8) {
            *(volatile u64 *)(raw + RAW_AVAIL + off) = 0;
            *(volatile u64 *)(raw + RAW_USED + off) = 0;
        }
        if (virtio_init(d, 0, 0) < 0) {
            printk("vhostile: dev=%d badq=%s negotiation failed\n", i, c[k].name);
            virtio_set_status(d, 0);
            continue;
        }
        u32 ready = virtq_program(d, 0, c[k].num, c[k].desc, c[k].drv, c[k].dev);
        virtio_set_status(d, virtio_get_status(d) | VIRTIO_STATUS_DRIVER_OK);
        u32 st = virtio_get_status(d);
        virtq_notify(d, 0);
        u32 st2 = virtio_get_status(d);
        printk("vhostile: dev=%d badq=%s num=%u ready=%u status=0x%x after_notify=0x%x\n",
               i, c[k].name, c[k].num, ready, st, st2);
        virtio_set_status(d, 0);
    }
}

/* -------------------------------------------- e. malicious descriptors */

enum {
    C_LOOP, C_CYCLE2, C_CHAIN300, C_NEXT_OOB, C_MMIO, C_BEYOND, C_HUGE_LEN,
    C_WRITE_ONLY, C_BAD_PFNS, C_HEAD_OOB, C_IDX_JUMP, NCASES
};
static const char *const case_name[NCASES] = {
    "loop", "cycle2", "chain300", "next_oob", "mmio_addr", "beyond_ram", "huge_len",
    "write_only", "bad_pfns", "head_oob", "idx_jump",
};

static void put_desc(u32 k, u64 addr, u32 len, u16 flags, u16 next)
{
    volatile struct virtq_desc *x = &vq0.desc[k & (vq0.size - 1)];
    x->addr = addr;
    x->len = len;
    x->flags = flags;
    x->next = next;
}

/* Negotiates VERSION_1, sets up queue 0 with qs entries and sets DRIVER_OK. */
static int setup_q0(struct virtio_dev *d, u32 qs)
{
    if (virtio_init(d, 0, 0) < 0)
        return -1;
    if (virtq_setup(d, 0, &vq0, qs) < 0)
        return -1;
    return virtio_driver_ok(d) < 0 ? -1 : 0;
}

static void step_bad_chains(struct virtio_dev *d, int i)
{
    u32 qs = qsize_for(virtq_num_max(d, 0), MAX_QSIZE);
    u64 ok = (u64)pfn_ok;
    u32 reinits = 0;

    fill_pfn_ok();
    if (qs == 0) {
        printk("vhostile: dev=%d queue 0 missing, no chains\n", i);
        return;
    }
    if (setup_q0(d, qs) < 0) {
        printk("vhostile: dev=%d cannot set up queue 0, no chains\n", i);
        virtio_set_status(d, 0);
        return;
    }
    for (u32 c = 0; c < NCASES; c++) {
        u32 st = virtio_get_status(d);
        if ((st & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) ||
            !(st & VIRTIO_STATUS_DRIVER_OK)) {
            /* the device gave up on the queue: start over so every chain is seen */
            reinits++;
            if (setup_q0(d, qs) < 0) {
                printk("vhostile: dev=%d case=%s skipped (re-init failed, status=0x%x)\n",
                       i, case_name[c], virtio_get_status(d));
                virtio_set_status(d, 0);
                continue;
            }
        }
        u32 head = 0, jump = 0;
        switch (c) {
        case C_LOOP:                    /* next points to itself */
            put_desc(0, ok, 64, VIRTQ_DESC_F_NEXT, 0);
            head = 0;
            break;
        case C_CYCLE2:                  /* 1 -> 2 -> 1 -> ... */
            put_desc(1, ok, 64, VIRTQ_DESC_F_NEXT, (u16)(2 & (qs - 1)));
            put_desc(2, ok, 64, VIRTQ_DESC_F_NEXT, (u16)(1 & (qs - 1)));
            head = 1 & (qs - 1);
            break;
        case C_CHAIN300:                /* 300 NEXT links through a qs-entry table */
            for (u32 k = 0; k < 300; k++)
                put_desc(k, ok, 4, VIRTQ_DESC_F_NEXT, (u16)((k + 1) & (qs - 1)));
            head = 0;
            break;
        case C_NEXT_OOB:                /* next beyond the table */
            put_desc(3, ok, 64, VIRTQ_DESC_F_NEXT, 0xffff);
            head = 3 & (qs - 1);
            break;
        case C_MMIO:
            put_desc(4, MMIO_GAP_ADDR, 64, 0, 0);
            head = 4 & (qs - 1);
            break;
        case C_BEYOND:
            put_desc(5, memsize_g + 16 * MIB, 64, 0, 0);
            head = 5 & (qs - 1);
            break;
        case C_HUGE_LEN:
            put_desc(6, ok, 0xfffff000u, 0, 0);
            head = 6 & (qs - 1);
            break;
        case C_WRITE_ONLY:              /* device-writable where the device reads */
            put_desc(7, ok, 64, VIRTQ_DESC_F_WRITE, 0);
            head = 7 & (qs - 1);
            break;
        case C_BAD_PFNS:
            put_desc(8, (u64)pfn_bad, npfn_bad * 4, 0, 0);
            head = 8 & (qs - 1);
            break;
        case C_HEAD_OOB:                /* avail entry beyond the table */
            head = 0xfff0;
            break;
        case C_IDX_JUMP:                /* avail->idx 1000 past what was posted */
            put_desc(9, ok, 16, 0, 0);
            head = 9 & (qs - 1);
            jump = 1000;
            break;
        }
        virtq_submit(&vq0, head);
        if (jump) {
            vq0.avail_idx = (u16)(vq0.avail_idx + jump);
            vq0.avail->idx = vq0.avail_idx;
        }
        virtq_notify(d, 0);

        struct virtq_used_elem e;
        u32 used = 0;
        for (u32 k = 0; k < POLL_ITERS; k++) {
            if (virtq_poll_used(&vq0, &e))
                used++;
            else if (used)
                break;
            else
                cpu_relax();
        }
        printk("vhostile: dev=%d case=%s used=%u status=0x%x\n", i, case_name[c], used,
               virtio_get_status(d));
    }
    printk("vhostile: dev=%d chains=%d reinits=%u\n", i, NCASES, reinits);
}

/* ------------------------------------------------------------ f. flood */

static void step_flood(struct virtio_dev *d, int i, u64 flood)
{
    /* Flood a live queue 0 (the chains above usually leave NEEDS_RESET, and a
     * device that needs a reset ignores notifies): set it up again if needed. */
    u32 st = virtio_get_status(d);
    u32 qs = qsize_for(virtq_num_max(d, 0), 16);
    if (qs && ((st & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) ||
               !(st & VIRTIO_STATUS_DRIVER_OK))) {
        if (setup_q0(d, qs) < 0)
            printk("vhostile: dev=%d flood: queue 0 set-up failed (status=0x%x)\n", i,
                   virtio_get_status(d));
    }
    for (u64 k = 0; k < flood; k++) {
        wr32(d->base + VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        wr32(d->base + VIRTIO_MMIO_QUEUE_NOTIFY, NQ_PROBE - 1);
    }
    printk("vhostile: dev=%d flood=%lu status=0x%x\n", i, flood, virtio_get_status(d));
}

/* ------------------------------------------------- h. virtio-mem requests */

static struct virtio_mem_req mreq __attribute__((aligned(64)));
static struct virtio_mem_resp mresp __attribute__((aligned(64)));
static u64 mem_bad;                     /* virtio-mem checks that failed (all devices) */

struct mem_geo {
    u64 bs, addr, size, requested;
};

static void mem_geometry(const struct virtio_dev *d, struct mem_geo *g)
{
    g->bs = virtio_config_read64(d, VIRTIO_MEM_CFG_BLOCK_SIZE);
    g->addr = virtio_config_read64(d, VIRTIO_MEM_CFG_ADDR);
    g->size = virtio_config_read64(d, VIRTIO_MEM_CFG_REGION_SIZE);
    g->requested = virtio_config_read64(d, VIRTIO_MEM_CFG_REQUESTED_SIZE);
}

/* One well-formed request on vq0: the response type, 0xffff if the device wrote
 * none, 0xfffe if the chain never came back. */
static u32 mem_req(const struct virtio_dev *d, u16 type, u64 addr, u16 nb, u16 *state)
{
    (void)d;
    mreq.type = type;
    mreq.addr = addr;
    mreq.nb_blocks = nb;
    mresp.type = 0xffff;
    mresp.state = 0xffff;
    if (virtq_transact(&vq0, (u64)&mreq, sizeof(mreq), (u64)&mresp, sizeof(mresp),
                       RECOVER_ITERS, 0) < 0)
        return 0xfffe;
    virtio_mb();
    if (state)
        *state = mresp.state;
    return mresp.type;
}

/* plugged_size must stay whole blocks within requested_size and the region. */
static int mem_config_sane(const struct virtio_dev *d, const struct mem_geo *g)
{
    u64 plugged = virtio_config_read64(d, VIRTIO_MEM_CFG_PLUGGED_SIZE);
    return g->bs && plugged % g->bs == 0 && plugged <= g->requested && plugged <= g->size;
}

/* Random requests (types 0..5, addresses inside, across, below and beyond the
 * region, in RAM, in the MMIO gap and anywhere; block counts 0, 1, a few and any
 * u16), then malformed chains (no response buffer, a read-only or 2-byte response,
 * a response in the MMIO gap, a request beyond RAM or of 8 bytes). Every chain must
 * come back on the used ring and plugged_size must stay sane throughout. In between,
 * plugs block by block from the region's start must be NACKed exactly at
 * requested_size. */
static void step_mem_requests(struct virtio_dev *d, int i, u64 nreq)
{
    struct mem_geo g;
    u64 x = 0x5eed0000UL + (u64)i, cnt[5] = { 0 }, lost = 0, insane = 0;

    if (setup_q0(d, 16) < 0) {
        printk("vhostile: dev=%d mem: queue 0 set-up failed\n", i);
        mem_bad++;
        virtio_set_status(d, 0);
        return;
    }
    mem_geometry(d, &g);
    u64 nblocks = g.bs ? g.size / g.bs : 1;
    for (u64 k = 0; k < nreq; k++) {
        u64 r = mix64(x += 0x9e3779b97f4a7c15UL);
        u16 type = (u16)(r % 6);
        u64 addr;
        switch ((r >> 8) % 8) {
        case 0: addr = g.addr + (r >> 16) % nblocks * g.bs; break;
        case 1: addr = g.addr + (r >> 16) % g.size; break;
        case 2: addr = g.addr - g.bs; break;
        case 3: addr = g.addr + g.size; break;
        case 4: addr = g.addr + g.size - g.bs; break;
        case 5: addr = 0; break;
        case 6: addr = MMIO_GAP_ADDR; break;
        default: addr = mix64(r); break;
        }
        u16 nb;
        switch ((r >> 40) % 4) {
        case 0: nb = 0; break;
        case 1: nb = 1; break;
        case 2: nb = (u16)(1 + (r >> 44) % 8); break;
        default: nb = (u16)(r >> 48); break;
        }
        u32 t = mem_req(d, type, addr, nb, 0);
        if (t <= VIRTIO_MEM_RESP_ERROR)
            cnt[t]++;
        else
            cnt[4]++;
        if (t == 0xfffe)
            lost++;
        if (!mem_config_sane(d, &g))
            insane++;
    }
    /* grab more than requested, block by block: the device must NACK exactly at
     * requested_size */
    u64 grabbed = 0, stop = 0xffff;
    mem_req(d, VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0, 0);
    for (u64 k = 0; k < nblocks; k++) {
        stop = mem_req(d, VIRTIO_MEM_REQ_PLUG, g.addr + k * g.bs, 1, 0);
        if (stop != VIRTIO_MEM_RESP_ACK)
            break;
        grabbed++;
    }
    u64 overplug_bad = grabbed * g.bs != g.requested ||
                       (g.requested < g.size && stop != VIRTIO_MEM_RESP_NACK);
    if (!mem_config_sane(d, &g))
        insane++;
    mem_req(d, VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0, 0);
    /* malformed chains: the device must still put each on the used ring */
    u64 gap = MMIO_GAP_ADDR, far = memsize_g + GIB;
    struct virtq_buf bad[][2] = {
        { { (u64)&mreq, sizeof(mreq), 0 }, { 0, 0, 0 } },
        { { (u64)&mreq, sizeof(mreq), 0 }, { (u64)&mresp, sizeof(mresp), 0 } },
        { { (u64)&mreq, sizeof(mreq), 0 }, { (u64)&mresp, 2, VIRTQ_DESC_F_WRITE } },
        { { (u64)&mreq, sizeof(mreq), 0 }, { gap, sizeof(mresp), VIRTQ_DESC_F_WRITE } },
        { { far, sizeof(mreq), 0 }, { (u64)&mresp, sizeof(mresp), VIRTQ_DESC_F_WRITE } },
        { { (u64)&mreq, 8, 0 }, { (u64)&mresp, sizeof(mresp), VIRTQ_DESC_F_WRITE } },
    };
    u32 nbad = sizeof(bad) / sizeof(bad[0]), back = 0;
    mreq.type = VIRTIO_MEM_REQ_STATE;
    mreq.addr = g.addr;
    mreq.nb_blocks = 1;
    for (u32 k = 0; k < nbad; k++) {
        struct virtq_used_elem e;
        int head = virtq_add_chain(&vq0, bad[k], bad[k][1].len ? 2 : 1);
        if (head < 0)
            continue;
        virtq_submit(&vq0, (u32)head);
        virtq_notify(d, 0);
        if (virtq_wait_used(&vq0, RECOVER_ITERS, &e) == 0 && e.id == (u32)head)
            back++;
    }
    if (!mem_config_sane(d, &g))
        insane++;
    mem_bad += lost + insane + overplug_bad + (nbad - back);
    printk("vhostile: dev=%d mem requests=%lu ack=%lu nack=%lu busy=%lu error=%lu "
           "unanswered=%lu lost=%lu insane=%lu grabbed=%lu overplug_bad=%lu "
           "malformed_back=%u/%u\n", i, nreq, cnt[0], cnt[1], cnt[2], cnt[3], cnt[4], lost,
           insane, grabbed, overplug_bad, back, nbad);
}

/* Writes one word per page of [a, a+len). */
static void mem_scribble(u64 a, u64 len)
{
    for (u64 off = 0; off < len; off += 4096)
        *(volatile u64 *)(a + off + (off >> 12) % 512 * 8) = 0xdeadbeef00000000UL | off;
}

/* The pages of [a, a+len) whose scribbled word or first word (pattern_fill's) is
 * not zero. */
static u64 mem_nonzero(u64 a, u64 len)
{
    u64 stale = 0;
    for (u64 off = 0; off < len; off += 4096)
        stale += (*(volatile u64 *)(a + off + (off >> 12) % 512 * 8) |
                  *(volatile u64 *)(a + off)) != 0;
    return stale;
}

/* Still a working device: UNPLUG_ALL; writes to an unplugged block, outside any
 * memslot or inside a plugged slice, are dropped (it reads zero once plugged); a
 * plugged block keeps what is written; STATE follows; an unplugged and re-plugged
 * block reads zero again (unplug discarded it). */
static int mem_probe(struct virtio_dev *d, int i)
{
    struct mem_geo g;
    u16 st = 0xffff;
    u64 bad = 0;

    mem_geometry(d, &g);
    if (g.requested < g.bs || !g.bs) {
        printk("vhostile: dev=%d mem probe needs requested_size >= block_size "
               "(requested=0x%lx)\n", i, g.requested);
        return 0;
    }
    u64 b = g.addr + g.size - g.bs;         /* the last block and the one before it */
    u64 b1 = b - g.bs;                      /* (same 128 MiB slice: block <= 64 MiB) */
    bad += mem_req(d, VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0, 0) != VIRTIO_MEM_RESP_ACK;
    bad += virtio_config_read64(d, VIRTIO_MEM_CFG_PLUGGED_SIZE) != 0;
    mem_scribble(b, g.bs);                  /* no memslot there: dropped */
    bad += mem_req(d, VIRTIO_MEM_REQ_PLUG, b, 1, 0) != VIRTIO_MEM_RESP_ACK;
    u64 stale = mem_nonzero(b, g.bs);
    mem_scribble(b1, g.bs);                 /* unplugged block of a plugged slice */
    bad += mem_req(d, VIRTIO_MEM_REQ_PLUG, b1, 1, 0) != VIRTIO_MEM_RESP_ACK;
    stale += mem_nonzero(b1, g.bs);
    pattern_fill(b, g.bs / 4096, 4096, 0x77);
    u64 pattern_bad = pattern_verify(b, g.bs / 4096, 4096, 0x77, 0, "vhostile", 0);
    bad += mem_req(d, VIRTIO_MEM_REQ_STATE, b, 1, &st) != VIRTIO_MEM_RESP_ACK ||
           st != VIRTIO_MEM_STATE_PLUGGED;
    /* b1 stays plugged, so the slice stays: unplug itself must discard b */
    bad += mem_req(d, VIRTIO_MEM_REQ_UNPLUG, b, 1, 0) != VIRTIO_MEM_RESP_ACK;
    bad += mem_req(d, VIRTIO_MEM_REQ_STATE, b, 1, &st) != VIRTIO_MEM_RESP_ACK ||
           st != VIRTIO_MEM_STATE_UNPLUGGED;
    mem_scribble(b, g.bs);                  /* unplugged again: dropped */
    bad += mem_req(d, VIRTIO_MEM_REQ_PLUG, b, 1, 0) != VIRTIO_MEM_RESP_ACK;
    stale += mem_nonzero(b, g.bs);
    bad += mem_req(d, VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0, 0) != VIRTIO_MEM_RESP_ACK;
    bad += virtio_config_read64(d, VIRTIO_MEM_CFG_PLUGGED_SIZE) != 0;
    printk("vhostile: dev=%d mem probe block=0x%lx stale=%lu pattern_bad=%lu bad=%lu\n", i,
           b, stale, pattern_bad, bad);
    mem_bad += stale + pattern_bad + bad;
    return stale + pattern_bad + bad == 0;
}

/* --------------------------------------------------------- g. recovery */

static int step_recover(struct virtio_dev *d, int i)
{
    struct virtq_used_elem e;
    int ok = virtio_reset(d) == 0 && virtio_init(d, 0, 0) == 0;
    u32 q0 = qsize_for(virtq_num_max(d, 0), 16);
    u32 q1 = qsize_for(virtq_num_max(d, 1), 16);

    if (ok && q0)
        ok = virtq_setup(d, 0, &vq0, q0) == 0;
    if (ok && q1)
        ok = virtq_setup(d, 1, &vq1, q1) == 0;
    if (ok)
        ok = virtio_driver_ok(d) == 0;
    if (ok && d->device_id == VIRTIO_ID_BALLOON) {
        ok = 0;
        fill_pfn_ok();
        if (q0) {
            /* pfn_ok[0..16) are the 16 scratch pages */
            int head = virtq_add_readable(&vq0, (u64)pfn_ok, NSCRATCH * 4);
            if (head >= 0) {
                virtq_submit(&vq0, (u32)head);
                virtq_notify(d, 0);
                ok = virtq_wait_used(&vq0, RECOVER_ITERS, &e) == 0 && e.id == (u32)head;
            }
        }
    }
    if (ok && d->device_id == VIRTIO_ID_MEM)
        ok = mem_probe(d, i);
    printk("vhostile: dev=%d recover status=0x%x\n", i, virtio_get_status(d));
    printk("vhostile: dev=%d recovered=%d\n", i, ok);
    virtio_set_status(d, 0);        /* stop using vq0/vq1 memory before the next device */
    return ok;
}

/* -------------------------------------------------------------- checker */

static void checker(const struct region *r)
{
    u64 rounds = 0, bad = 0, x;
    do {
        u64 s = rounds + 1;
        pattern_fill(r->base, r->nwords, r->stride, s);
        bad += pattern_verify(r->base, r->nwords, r->stride, s, &x, "vhostile", 1);
        rounds++;
    } while (!__atomic_load_n(&done_flag, __ATOMIC_ACQUIRE));
    checker_rounds = rounds;
    checker_bad = bad;
    printk("vhostile: checker rounds=%lu bad=%lu\n", rounds, bad);
    __atomic_store_n(&reported, 1, __ATOMIC_RELEASE);
}

/* ----------------------------------------------------------------- main */

void guest_main(unsigned long cpu, unsigned long ncpus, unsigned long memsize,
                const char *cmdline)
{
    struct region r;

    check_ncpus(cpu, ncpus);
    if (ncpus > 1)      /* every vCPU parses it; vCPU 0 reports a bad config (exit 2) */
        region_setup(&r, cpu, "vhostile", cmdline, memsize, 64 * MIB, 8 * MIB, 4096, 0);
    if (cpu == 1) {
        checker(&r);
        return;
    }
    if (cpu != 0)
        halt_forever();

    u64 rounds = cmdline_u64(cmdline, "rounds", 1);
    u64 flood = cmdline_u64(cmdline, "flood", 2000);
    u64 ptpfns = cmdline_u64(cmdline, "ptpfns", 1);
    u64 memreqs = cmdline_u64(cmdline, "memreqs", 300);
    u64 randregs = cmdline_u64(cmdline, "randregs", 5000);
    memsize_g = memsize;
    int n = virtio_scan(cmdline, devs, VIRTIO_MAX_DEVICES);

    npfn_bad = 0;
    pfn_bad[npfn_bad++] = (u32)(MMIO_GAP_ADDR >> PAGE_SHIFT);          /* 0xd0000 */
    pfn_bad[npfn_bad++] = (u32)(MMIO_GAP_ADDR >> PAGE_SHIFT) + 1;
    if (ptpfns) {                       /* the guest's own page tables */
        pfn_bad[npfn_bad++] = 9;        /* PML4 */
        pfn_bad[npfn_bad++] = 10;       /* PDPT */
        pfn_bad[npfn_bad++] = 11;       /* first PD */
    }
    pfn_bad[npfn_bad++] = (u32)(memsize >> PAGE_SHIFT);                /* first beyond RAM */
    pfn_bad[npfn_bad++] = (u32)(memsize >> PAGE_SHIFT) + 1;
    pfn_bad[npfn_bad++] = (u32)((memsize + GIB) >> PAGE_SHIFT);
    pfn_bad[npfn_bad++] = 0xfffff;      /* last page below 4 GiB */
    pfn_bad[npfn_bad++] = 0xffffffffu;

    printk("vhostile: start devices=%d rounds=%lu flood=%lu ptpfns=%lu vcpus=%lu\n", n,
           rounds, flood, ptpfns, ncpus);
    for (int i = 0; i < n; i++)
        printk("vhostile: dev=%d id=%u base=0x%lx size=0x%lx gsi=%u\n", i,
               devs[i].device_id, devs[i].base, devs[i].size, devs[i].gsi);

    u8 stuck[VIRTIO_MAX_DEVICES] = { 0 };
    u8 failed[VIRTIO_MAX_DEVICES] = { 0 };
    for (u64 round = 1; round <= rounds; round++) {
        if (rounds > 1)
            printk("vhostile: round=%lu\n", round);
        for (int i = 0; i < n; i++) {
            struct virtio_dev *d = &devs[i];
            step(i, "early_notify");
            step_early_notify(d);
            step(i, "registers");
            step_registers(d);
            step(i, "random_registers");
            step_random_registers(d, i, randregs);
            step(i, "bogus_features");
            if (step_bogus_features(d, i))
                stuck[i] = 1;
            step(i, "bad_queues");
            step_bad_queues(d, i);
            step(i, "bad_chains");
            step_bad_chains(d, i);
            if (d->device_id == VIRTIO_ID_MEM) {
                step(i, "mem_requests");
                step_mem_requests(d, i, memreqs);
            }
            step(i, "flood");
            step_flood(d, i, flood);
            step(i, "recover");
            if (!step_recover(d, i))
                failed[i] = 1;
        }
    }

    u64 nstuck = 0, nrecovered = 0;
    for (int i = 0; i < n; i++) {
        nstuck += stuck[i];
        nrecovered += !failed[i];
    }
    __atomic_store_n(&done_flag, 1, __ATOMIC_RELEASE);
    if (ncpus > 1)
        while (!__atomic_load_n(&reported, __ATOMIC_ACQUIRE))
            cpu_relax();
    printk("vhostile: done devices=%d features_ok_stuck=%lu recovered=%lu checker_bad=%lu "
           "mem_bad=%lu\n", n, nstuck, nrecovered, checker_bad, mem_bad);
    exit_vm(0);
}
