/*
 * Polled virtio-mmio (version 2) driver library for the test guests.
 * See virtio.h for the API and ../README.md for the overview.
 */
#include "virtio.h"

#define RESET_POLLS      1000   /* Status reads waiting for a reset to complete */
#define CONFIG_RETRIES   64     /* ConfigGeneration retries per config read */
#define IDENTITY_TOP     (1UL << 32)    /* the VMM identity-maps 0..4 GiB */
#define MIN_WINDOW       0x200

/* ------------------------------------------------------------ discovery */

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Parses a number at *s (decimal or 0x-hex, optional K/M/G suffix if allow_suffix);
 * advances *s. Returns 0 if there were no digits or it overflowed. */
static int parse_num(const char **s, const char *e, int allow_suffix, u64 *out)
{
    const char *p = *s;
    u64 v = 0;
    int digits = 0;

    if (e - p > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        for (p += 2; p < e; p++, digits++) {
            char c = *p;
            u64 d;
            if (c >= '0' && c <= '9')
                d = (u64)(c - '0');
            else if (c >= 'a' && c <= 'f')
                d = (u64)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                d = (u64)(c - 'A' + 10);
            else
                break;
            if (v >> 60)
                return 0;
            v = v * 16 + d;
        }
    } else {
        for (; p < e && *p >= '0' && *p <= '9'; p++, digits++) {
            if (v > (~0UL - 9) / 10)
                return 0;
            v = v * 10 + (u64)(*p - '0');
        }
    }
    if (!digits)
        return 0;
    if (allow_suffix && p < e) {
        unsigned shift = 0;
        switch (*p) {
        case 'k': case 'K': shift = 10; break;
        case 'm': case 'M': shift = 20; break;
        case 'g': case 'G': shift = 30; break;
        }
        if (shift) {
            if (v >> (64 - shift))
                return 0;
            v <<= shift;
            p++;
        }
    }
    *s = p;
    *out = v;
    return 1;
}

static const char token_prefix[] = "virtio_mmio.device=";

/* Parses [tok, e) after the prefix: <size>@<base>:<gsi>[:<id>]. */
static int parse_window(const char *p, const char *e, struct virtio_window *w)
{
    u64 size, base, gsi;

    if (!parse_num(&p, e, 1, &size) || p >= e || *p++ != '@')
        return 0;
    if (!parse_num(&p, e, 0, &base) || p >= e || *p++ != ':')
        return 0;
    if (!parse_num(&p, e, 0, &gsi) || gsi > 0xffffffffUL)
        return 0;
    if (p < e && *p != ':')             /* optional ":<first platform id>" is ignored */
        return 0;
    w->base = base;
    w->size = size;
    w->gsi = (u32)gsi;
    return 1;
}

int virtio_parse_cmdline(const char *cmdline, struct virtio_window *w, int max)
{
    const char *s = cmdline;
    int n = 0;

    if (!s)
        return 0;
    for (;;) {
        while (is_space(*s))
            s++;
        if (!*s)
            break;
        const char *tok = s;
        while (*s && !is_space(*s))
            s++;
        /* token is [tok, s) */
        const char *k = token_prefix, *t = tok;
        while (*k && t < s && *t == *k) {
            k++;
            t++;
        }
        if (*k)
            continue;
        struct virtio_window win;
        if (!parse_window(t, s, &win)) {
            char shown[48];
            u64 len = (u64)(s - tok) < sizeof(shown) - 1 ? (u64)(s - tok) : sizeof(shown) - 1;
            for (u64 k = 0; k < len; k++)
                shown[k] = tok[k];
            shown[len] = 0;
            printk("virtio: ignoring malformed token '%s' (want size@base:gsi)\n", shown);
            continue;
        }
        if (win.size < MIN_WINDOW || win.base >= IDENTITY_TOP ||
            win.size > IDENTITY_TOP - win.base || (win.base & 3)) {
            printk("virtio: ignoring window 0x%lx size 0x%lx (must be 4-aligned, "
                   ">= 0x%x bytes, below 4 GiB)\n", win.base, win.size, MIN_WINDOW);
            continue;
        }
        if (n >= max) {
            printk("virtio: more than %d devices on the command line, ignoring 0x%lx\n",
                   max, win.base);
            continue;
        }
        w[n++] = win;
    }
    return n;
}

int virtio_probe(const struct virtio_window *w, struct virtio_dev *dev)
{
    struct virtio_dev d = { 0 };

    d.base = w->base;
    d.size = w->size;
    d.gsi = w->gsi;
    if (virtio_read32(&d, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC)
        return -VIRTIO_ENODEV;
    d.version = virtio_read32(&d, VIRTIO_MMIO_VERSION);
    d.device_id = virtio_read32(&d, VIRTIO_MMIO_DEVICE_ID);
    d.vendor_id = virtio_read32(&d, VIRTIO_MMIO_VENDOR_ID);
    if (d.version != 2 || d.device_id == 0)
        return -VIRTIO_ENODEV;
    *dev = d;
    return 0;
}

int virtio_scan(const char *cmdline, struct virtio_dev *devs, int max)
{
    struct virtio_window w[VIRTIO_MAX_DEVICES];
    int nw = virtio_parse_cmdline(cmdline, w, VIRTIO_MAX_DEVICES);
    int n = 0;

    for (int i = 0; i < nw && n < max; i++)
        if (virtio_probe(&w[i], &devs[n]) == 0)
            n++;
    return n;
}

int virtio_find(const char *cmdline, u32 device_id, struct virtio_dev *dev)
{
    struct virtio_window w[VIRTIO_MAX_DEVICES];
    int nw = virtio_parse_cmdline(cmdline, w, VIRTIO_MAX_DEVICES);

    for (int i = 0; i < nw; i++) {
        struct virtio_dev d;
        if (virtio_probe(&w[i], &d) == 0 && d.device_id == device_id) {
            *dev = d;
            return 0;
        }
    }
    return -VIRTIO_ENODEV;
}

/* --------------------------------------------------------------- status */

u32 virtio_get_status(const struct virtio_dev *d)
{
    return virtio_read32(d, VIRTIO_MMIO_STATUS);
}

void virtio_set_status(const struct virtio_dev *d, u32 status)
{
    virtio_mb();
    virtio_write32(d, VIRTIO_MMIO_STATUS, status);
}

int virtio_reset(const struct virtio_dev *d)
{
    virtio_set_status(d, 0);
    for (int i = 0; i < RESET_POLLS; i++) {
        if (virtio_get_status(d) == 0)
            return 0;
        cpu_relax();
    }
    printk("virtio: dev@0x%lx: reset did not complete (status=0x%x)\n", d->base,
           virtio_get_status(d));
    return -VIRTIO_EDEVICE;
}

void virtio_fail(const struct virtio_dev *d)
{
    virtio_set_status(d, virtio_get_status(d) | VIRTIO_STATUS_FAILED);
}

int virtio_init(struct virtio_dev *dev, u64 wanted, u64 *negotiated)
{
    const struct virtio_dev *d = dev;
    u32 status = VIRTIO_STATUS_ACKNOWLEDGE;

    if (virtio_read32(d, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC ||
        virtio_read32(d, VIRTIO_MMIO_VERSION) != 2) {
        printk("virtio: dev@0x%lx: not a virtio-mmio version 2 device\n", d->base);
        return -VIRTIO_ENODEV;
    }
    int r = virtio_reset(d);
    if (r < 0)
        return r;
    virtio_set_status(d, status);
    status |= VIRTIO_STATUS_DRIVER;
    virtio_set_status(d, status);

    virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 offered = virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES);
    virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    dev->offered = offered;
    dev->features = 0;
    if (!(offered & VIRTIO_F_VERSION_1)) {
        printk("virtio: dev@0x%lx: VERSION_1 not offered (features=0x%lx)\n",
               d->base, offered);
        virtio_fail(d);
        return -VIRTIO_EFEATURES;
    }
    u64 accept = (wanted & offered) | VIRTIO_F_VERSION_1;
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)accept);
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(accept >> 32));
    status |= VIRTIO_STATUS_FEATURES_OK;
    virtio_set_status(d, status);
    u32 got = virtio_get_status(d);
    if (!(got & VIRTIO_STATUS_FEATURES_OK)) {
        printk("virtio: dev@0x%lx: device refused features 0x%lx (status=0x%x)\n",
               d->base, accept, got);
        virtio_fail(d);
        return -VIRTIO_EFEATURES;
    }
    dev->features = accept;
    if (negotiated)
        *negotiated = accept;
    return 0;
}

int virtio_driver_ok(const struct virtio_dev *d)
{
    virtio_set_status(d, virtio_get_status(d) | VIRTIO_STATUS_DRIVER_OK);
    u32 got = virtio_get_status(d);
    if ((got & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) ||
        !(got & VIRTIO_STATUS_DRIVER_OK)) {
        printk("virtio: dev@0x%lx: DRIVER_OK not accepted (status=0x%x)\n", d->base, got);
        return -VIRTIO_EDEVICE;
    }
    return 0;
}

u32 virtio_ack_interrupts(const struct virtio_dev *d)
{
    u32 isr = virtio_read32(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr)
        virtio_write32(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
    return isr;
}

/* --------------------------------------------------------------- config */

u32 virtio_config_read32(const struct virtio_dev *d, u32 off)
{
    u32 gen, v;
    int tries = 0;

    do {
        gen = virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION);
        v = virtio_read32(d, VIRTIO_MMIO_CONFIG + off);
    } while (virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION) != gen &&
             ++tries < CONFIG_RETRIES);
    return v;
}

u64 virtio_config_read64(const struct virtio_dev *d, u32 off)
{
    u32 gen, lo, hi;
    int tries = 0;

    do {
        gen = virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION);
        lo = virtio_read32(d, VIRTIO_MMIO_CONFIG + off);
        hi = virtio_read32(d, VIRTIO_MMIO_CONFIG + off + 4);
    } while (virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION) != gen &&
             ++tries < CONFIG_RETRIES);
    return (u64)lo | ((u64)hi << 32);
}

void virtio_config_write32(const struct virtio_dev *d, u32 off, u32 v)
{
    virtio_write32(d, VIRTIO_MMIO_CONFIG + off, v);
}

/* ----------------------------------------------------------- virtqueues */

/* Ring memory: per slot one page for the descriptor table (16 * 256 bytes) and one
 * for the avail ring (offset 0, 6 + 2 * 256 bytes) and used ring (offset 1024,
 * 6 + 8 * 256 bytes). */
#define SLOT_AVAIL_OFF  4096
#define SLOT_USED_OFF   (4096 + 1024)
static u8 ring_pool[VIRTQ_POOL_SLOTS][8192] __attribute__((aligned(4096)));
static u8 ring_pool_used[VIRTQ_POOL_SLOTS];

u32 virtq_num_max(const struct virtio_dev *d, u32 index)
{
    virtio_write32(d, VIRTIO_MMIO_QUEUE_SEL, index);
    return virtio_read32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
}

u32 virtq_program(const struct virtio_dev *d, u32 index, u32 num, u64 desc, u64 driver,
                  u64 device)
{
    virtio_write32(d, VIRTIO_MMIO_QUEUE_SEL, index);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_NUM, num);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)driver);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)(driver >> 32));
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)device);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)(device >> 32));
    virtio_mb();
    virtio_write32(d, VIRTIO_MMIO_QUEUE_READY, 1);
    return virtio_read32(d, VIRTIO_MMIO_QUEUE_READY);
}

static void zero_bytes(volatile u8 *p, u64 n)
{
    volatile u64 *q = (volatile u64 *)p;
    for (u64 i = 0; i < (n + 7) / 8; i++)
        q[i] = 0;
}

int virtq_setup(struct virtio_dev *d, u32 index, struct virtq *vq, u32 size)
{
    u32 max = virtq_num_max(d, index);

    if (max == 0) {
        printk("virtio: dev@0x%lx: queue %u does not exist\n", d->base, index);
        return -VIRTIO_EQUEUE;
    }
    if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY) != 0) {
        printk("virtio: dev@0x%lx: queue %u already ready\n", d->base, index);
        return -VIRTIO_EQUEUE;
    }
    if (size == 0 || (size & (size - 1)) || size > VIRTQ_MAX_SIZE || size > max) {
        printk("virtio: dev@0x%lx: queue %u: bad size %u (max %u, library max %u)\n",
               d->base, index, size, max, VIRTQ_MAX_SIZE);
        return -VIRTIO_EINVAL;
    }
    if (vq->slot <= 0 || vq->slot > VIRTQ_POOL_SLOTS) {
        int s;
        for (s = 0; s < VIRTQ_POOL_SLOTS && ring_pool_used[s]; s++)
            ;
        if (s == VIRTQ_POOL_SLOTS) {
            printk("virtio: ring memory pool exhausted (%d queues)\n", VIRTQ_POOL_SLOTS);
            return -VIRTIO_ENOMEM;
        }
        ring_pool_used[s] = 1;
        vq->slot = s + 1;
    }
    u8 *mem = ring_pool[vq->slot - 1];
    vq->dev = d;
    vq->index = index;
    vq->size = size;
    vq->desc = (volatile struct virtq_desc *)mem;
    vq->avail = (volatile struct virtq_avail *)(mem + SLOT_AVAIL_OFF);
    vq->used = (volatile struct virtq_used *)(mem + SLOT_USED_OFF);
    zero_bytes((volatile u8 *)vq->desc, 16UL * size);
    zero_bytes((volatile u8 *)vq->avail, 6 + 2UL * size);
    zero_bytes((volatile u8 *)vq->used, 6 + 8UL * size);
    for (u32 i = 0; i < size; i++) {
        vq->desc[i].next = (u16)(i + 1);
        vq->chain_len[i] = 0;
    }
    vq->free_head = 0;
    vq->num_free = (u16)size;
    vq->avail_idx = 0;
    vq->last_used = 0;
    vq->bogus_used = 0;

    u32 ready = virtq_program(d, index, size, (u64)vq->desc, (u64)vq->avail,
                              (u64)vq->used);
    if (ready != 1) {
        printk("virtio: dev@0x%lx: queue %u: QueueReady reads %u after setup\n",
               d->base, index, ready);
        return -VIRTIO_EQUEUE;
    }
    return 0;
}

void virtq_free(struct virtq *vq)
{
    if (vq->slot > 0 && vq->slot <= VIRTQ_POOL_SLOTS)
        ring_pool_used[vq->slot - 1] = 0;
    vq->slot = 0;
    vq->desc = 0;
    vq->avail = 0;
    vq->used = 0;
}

int virtq_add_chain(struct virtq *vq, const struct virtq_buf *bufs, u32 n)
{
    if (n == 0 || !vq->desc)
        return -VIRTIO_EINVAL;
    if (n > vq->num_free)
        return -VIRTIO_ENOSPC;
    u16 head = vq->free_head, i = head;
    for (u32 k = 0; k < n; k++) {
        u16 next = vq->desc[i].next;            /* free-list link */
        vq->desc[i].addr = bufs[k].addr;
        vq->desc[i].len = bufs[k].len;
        vq->desc[i].flags = (u16)((bufs[k].flags & VIRTQ_DESC_F_WRITE) |
                                  (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
        if (k + 1 < n)
            vq->desc[i].next = next;            /* chain link: same next descriptor */
        else
            vq->free_head = next;
        i = next;
    }
    vq->num_free = (u16)(vq->num_free - n);
    vq->chain_len[head] = (u16)n;
    return head;
}

int virtq_add_buf(struct virtq *vq, u64 addr, u32 len, u16 flags)
{
    struct virtq_buf b = { addr, len, flags };
    return virtq_add_chain(vq, &b, 1);
}

void virtq_submit(struct virtq *vq, u32 head)
{
    vq->avail->ring[vq->avail_idx & (vq->size - 1)] = (u16)head;
    virtio_mb();                                /* descriptors + ring entry before idx */
    vq->avail_idx++;
    vq->avail->idx = vq->avail_idx;
    virtio_mb();
}

void virtq_notify(const struct virtio_dev *d, u32 index)
{
    virtio_mb();
    virtio_write32(d, VIRTIO_MMIO_QUEUE_NOTIFY, index);
}

/* Returns a finished chain to the free list. */
static void free_chain(struct virtq *vq, u16 head)
{
    u16 n = vq->chain_len[head], tail = head;
    for (u16 k = 1; k < n; k++)
        tail = vq->desc[tail].next;
    vq->desc[tail].next = vq->free_head;
    vq->free_head = head;
    vq->num_free = (u16)(vq->num_free + n);
    vq->chain_len[head] = 0;
}

int virtq_poll_used(struct virtq *vq, struct virtq_used_elem *out)
{
    if (!vq->used || vq->used->idx == vq->last_used)
        return 0;
    virtio_mb();                                /* idx before the element */
    volatile struct virtq_used_elem *e = &vq->used->ring[vq->last_used & (vq->size - 1)];
    out->id = e->id;
    out->len = e->len;
    vq->last_used++;
    if (out->id < vq->size && vq->chain_len[out->id])
        free_chain(vq, (u16)out->id);
    else
        vq->bogus_used++;
    virtio_ack_interrupts(vq->dev);
    return 1;
}

int virtq_wait_used(struct virtq *vq, u64 timeout_iterations, struct virtq_used_elem *out)
{
    for (u64 i = 0; i < timeout_iterations; i++) {
        u64 bogus = vq->bogus_used;
        if (virtq_poll_used(vq, out)) {
            if (vq->bogus_used != bogus) {
                printk("virtio: dev@0x%lx: queue %u: used id %u is not in flight\n",
                       vq->dev->base, vq->index, out->id);
                return -VIRTIO_EDEVICE;
            }
            return 0;
        }
        cpu_relax();
    }
    return -VIRTIO_ETIMEDOUT;
}

int virtq_transact(struct virtq *vq, u64 out, u32 out_len, u64 in, u32 in_len,
                   u64 timeout_iterations, struct virtq_used_elem *used)
{
    struct virtq_buf b[2];
    struct virtq_used_elem e;
    u32 n = 0;

    if (out_len)
        b[n++] = (struct virtq_buf){ out, out_len, 0 };
    if (in_len)
        b[n++] = (struct virtq_buf){ in, in_len, VIRTQ_DESC_F_WRITE };
    int head = virtq_add_chain(vq, b, n);
    if (head < 0)
        return head;
    virtq_submit(vq, (u32)head);
    virtq_notify(vq->dev, vq->index);
    int r = virtq_wait_used(vq, timeout_iterations, &e);
    if (r < 0)
        return r;
    if (e.id != (u32)head) {
        printk("virtio: dev@0x%lx: queue %u: used id %u, expected %d\n", vq->dev->base,
               vq->index, e.id, head);
        return -VIRTIO_EDEVICE;
    }
    if (used)
        *used = e;
    return 0;
}
