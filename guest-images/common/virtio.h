/*
 * Minimal polled virtio-mmio (version 2, modern only) driver library for the
 * test guests: command-line discovery, feature negotiation, split virtqueues.
 * No interrupts (the guests run with IF=0): completions are found by polling
 * the used ring. See ../README.md ("virtio library").
 *
 * Errors are printed with printk and returned as negative VIRTIO_E* values;
 * nothing here halts or ends the VM.
 */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include "lib.h"

/* ---- virtio-mmio register offsets (virtio 1.2, 4.2.2) ---- */
#define VIRTIO_MMIO_MAGIC_VALUE         0x000
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MMIO_MAGIC               0x74726976u     /* "virt" */

/* Device status bits */
#define VIRTIO_STATUS_ACKNOWLEDGE       1
#define VIRTIO_STATUS_DRIVER            2
#define VIRTIO_STATUS_DRIVER_OK         4
#define VIRTIO_STATUS_FEATURES_OK       8
#define VIRTIO_STATUS_NEEDS_RESET       64
#define VIRTIO_STATUS_FAILED            128

#define VIRTIO_F_VERSION_1              (1UL << 32)

#define VIRTIO_ID_NET                   1
#define VIRTIO_ID_BLOCK                 2
#define VIRTIO_ID_BALLOON               5
#define VIRTIO_ID_MEM                   24

/* ---- virtio-balloon (virtio 1.2, 5.5), as used without optional features ---- */
#define VIRTIO_BALLOON_CFG_NUM_PAGES    0       /* u32, device -> driver: target */
#define VIRTIO_BALLOON_CFG_ACTUAL       4       /* u32, driver -> device */
#define VIRTIO_BALLOON_INFLATEQ         0
#define VIRTIO_BALLOON_DEFLATEQ         1
#define VIRTIO_BALLOON_PFN_SHIFT        12

/* ---- virtio-mem (virtio 1.2, 5.15) ---- */
#define VIRTIO_MEM_F_ACPI_PXM                   (1UL << 0)
#define VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE     (1UL << 1)
/* Config space (all little-endian; read the u64 fields with virtio_config_read64). */
#define VIRTIO_MEM_CFG_BLOCK_SIZE       0       /* u64 */
#define VIRTIO_MEM_CFG_NODE_ID          8       /* u16 (+ 6 bytes padding) */
#define VIRTIO_MEM_CFG_ADDR             16      /* u64: guest-physical start of the region */
#define VIRTIO_MEM_CFG_REGION_SIZE      24      /* u64 */
#define VIRTIO_MEM_CFG_USABLE_SIZE      32      /* u64: usable_region_size */
#define VIRTIO_MEM_CFG_PLUGGED_SIZE     40      /* u64 */
#define VIRTIO_MEM_CFG_REQUESTED_SIZE   48      /* u64 */
#define VIRTIO_MEM_REQQ                 0       /* the one request queue */
/* Request types */
#define VIRTIO_MEM_REQ_PLUG             0
#define VIRTIO_MEM_REQ_UNPLUG           1
#define VIRTIO_MEM_REQ_UNPLUG_ALL       2
#define VIRTIO_MEM_REQ_STATE            3
/* Response types */
#define VIRTIO_MEM_RESP_ACK             0
#define VIRTIO_MEM_RESP_NACK            1
#define VIRTIO_MEM_RESP_BUSY            2
#define VIRTIO_MEM_RESP_ERROR           3
/* STATE answers */
#define VIRTIO_MEM_STATE_PLUGGED        0
#define VIRTIO_MEM_STATE_UNPLUGGED      1
#define VIRTIO_MEM_STATE_MIXED          2

/* A request (device-readable, 24 bytes) and its response (device-writable, 10 bytes). */
struct virtio_mem_req {
    u16 type;
    u16 padding[3];
    u64 addr;
    u16 nb_blocks;
    u16 padding2[3];
};
struct virtio_mem_resp {
    u16 type;
    u16 padding[3];
    u16 state;          /* STATE requests only */
};
_Static_assert(sizeof(struct virtio_mem_req) == 24, "virtio_mem_req is 24 bytes");
_Static_assert(sizeof(struct virtio_mem_resp) == 10, "virtio_mem_resp is 10 bytes");

/* Split virtqueue descriptor flags */
#define VIRTQ_DESC_F_NEXT               1
#define VIRTQ_DESC_F_WRITE              2

/* ---- errors (returned negated) ---- */
#define VIRTIO_ENODEV     1     /* no such device / bad window / bad magic or version */
#define VIRTIO_EFEATURES  2     /* feature negotiation failed (FEATURES_OK not kept) */
#define VIRTIO_EQUEUE     3     /* queue missing, busy or size not acceptable */
#define VIRTIO_ETIMEDOUT  4     /* no used element within the polling budget */
#define VIRTIO_ENOSPC     5     /* not enough free descriptors */
#define VIRTIO_EINVAL     6     /* bad argument */
#define VIRTIO_ENOMEM     7     /* ring memory pool exhausted */
#define VIRTIO_EDEVICE    8     /* device misbehaved (reset never completed, bogus used id) */

/* Limits */
#define VIRTIO_MAX_DEVICES  8   /* virtio_mmio.device= tokens parsed */
#define VIRTQ_MAX_SIZE      256 /* largest queue virtq_setup accepts */
#define VIRTQ_POOL_SLOTS    8   /* ring memory for this many queues (8 KiB each) */

/* One virtio_mmio.device=<size>@<base>:<gsi> command-line token. */
struct virtio_window {
    u64 base;
    u64 size;
    u32 gsi;
};

struct virtio_dev {
    u64 base;           /* MMIO window */
    u64 size;
    u32 gsi;
    u32 device_id;
    u32 vendor_id;
    u32 version;
    u64 offered;        /* device features (valid after virtio_init) */
    u64 features;       /* negotiated features (valid after virtio_init) */
};

/* Split virtqueue layout (virtio 1.2, 2.7). */
struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[];         /* + u16 used_event (unused: no VIRTIO_F_EVENT_IDX) */
};
struct virtq_used_elem {
    u32 id;
    u32 len;
};
struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[];
};

/* Driver-side state of one queue. Must be zero (static or `= {0}`) before its first
 * virtq_setup; a virtq set up before keeps (and re-zeroes) its ring memory. */
struct virtq {
    struct virtio_dev *dev;
    volatile struct virtq_desc *desc;   /* 16 * size bytes, 16-aligned */
    volatile struct virtq_avail *avail; /* 6 + 2 * size bytes */
    volatile struct virtq_used *used;   /* 6 + 8 * size bytes */
    u32 index;          /* queue index on the device */
    u32 size;           /* entries (power of two <= VIRTQ_MAX_SIZE) */
    u16 avail_idx;      /* next avail->idx to publish (shadow) */
    u16 last_used;      /* used->idx value consumed so far */
    u16 free_head;      /* free descriptors, linked through desc[].next */
    u16 num_free;
    u64 bogus_used;     /* used elements whose id was not an in-flight head */
    int slot;           /* ring memory pool slot + 1 (0 = none yet) */
    u16 chain_len[VIRTQ_MAX_SIZE];      /* per in-flight head: descriptors, 0 = free */
};

/* One buffer of a descriptor chain: flags 0 = device-readable, VIRTQ_DESC_F_WRITE =
 * device-writable (NEXT is added by the library). */
struct virtq_buf {
    u64 addr;
    u32 len;
    u16 flags;
};

/* ---- barriers ----
 * Full barrier (compiler + CPU): locked add to the stack top, no mfence needed. */
static inline void virtio_mb(void)
{
    __asm__ volatile("lock addl $0, (%%rsp)" ::: "memory", "cc");
}

/* ---- raw register access (32-bit, little-endian) ---- */
static inline u32 virtio_read32(const struct virtio_dev *d, u32 off)
{
    return *(volatile u32 *)(d->base + off);
}
static inline void virtio_write32(const struct virtio_dev *d, u32 off, u32 v)
{
    *(volatile u32 *)(d->base + off) = v;
}

/* ---- discovery ----
 * virtio_parse_cmdline: fills up to max windows from virtio_mmio.device= tokens
 * (Linux format: <size>[KMG]@<base>:<gsi>[:<id>]); returns how many. Malformed tokens
 * and windows that do not fit below 4 GiB (the identity map) or are smaller than
 * 0x200 bytes are skipped with a message. cmdline may be NULL. */
int virtio_parse_cmdline(const char *cmdline, struct virtio_window *w, int max);
/* Reads MagicValue/Version/DeviceID/VendorID of a window. 0 if it holds a version-2
 * device with a non-zero DeviceID, else -VIRTIO_ENODEV (silently). */
int virtio_probe(const struct virtio_window *w, struct virtio_dev *dev);
/* All devices of the command line, in token order: returns how many were stored. */
int virtio_scan(const char *cmdline, struct virtio_dev *devs, int max);
/* First device with this DeviceID: 0, or -VIRTIO_ENODEV (silently). */
int virtio_find(const char *cmdline, u32 device_id, struct virtio_dev *dev);

/* ---- device status ---- */
u32 virtio_get_status(const struct virtio_dev *d);
void virtio_set_status(const struct virtio_dev *d, u32 status);
/* Status = 0, then waits (bounded) until Status reads 0: 0 or -VIRTIO_EDEVICE. */
int virtio_reset(const struct virtio_dev *d);
/* reset -> ACKNOWLEDGE|DRIVER -> read both feature words -> write
 * (wanted & offered) | VERSION_1 -> FEATURES_OK -> re-read Status. Sets dev->offered
 * and dev->features, stores the negotiated set in *negotiated (may be NULL).
 * Fails (-VIRTIO_EFEATURES, Status FAILED set) if VERSION_1 is not offered or the
 * device did not keep FEATURES_OK; -VIRTIO_ENODEV for a bad window. */
int virtio_init(struct virtio_dev *dev, u64 wanted, u64 *negotiated);
/* Sets DRIVER_OK; 0, or -VIRTIO_EDEVICE if Status then shows NEEDS_RESET/FAILED or
 * lost DRIVER_OK. */
int virtio_driver_ok(const struct virtio_dev *d);
/* Sets FAILED in Status (keeps the other bits). */
void virtio_fail(const struct virtio_dev *d);
/* Reads InterruptStatus and, if non-zero, writes it to InterruptACK; returns it. */
u32 virtio_ack_interrupts(const struct virtio_dev *d);

/* ---- device config space (32-bit accesses at 0x100 + off) ----
 * Reads retry (bounded) until ConfigGeneration is the same before and after. */
u32 virtio_config_read32(const struct virtio_dev *d, u32 off);
void virtio_config_write32(const struct virtio_dev *d, u32 off, u32 v);
/* A 64-bit little-endian field as two 32-bit reads (low word first) inside one
 * ConfigGeneration retry loop, so both halves come from the same generation. */
u64 virtio_config_read64(const struct virtio_dev *d, u32 off);

/* ---- virtqueues ---- */
/* Writes QueueSel, QueueNum, the three ring addresses and QueueReady=1 as given
 * (no checks at all: also for deliberately bad values); returns QueueReady read back. */
u32 virtq_program(const struct virtio_dev *d, u32 index, u32 num, u64 desc, u64 driver,
                  u64 device);
/* Checks the queue exists (QueueNumMax != 0), is not ready, and that size is a power of
 * two <= min(QueueNumMax, VIRTQ_MAX_SIZE); takes (first time) a pool slot of 8 KiB
 * 4096-aligned .bss, zeroes the rings, builds the free list and programs the queue.
 * 0 or -VIRTIO_EQUEUE / -VIRTIO_EINVAL / -VIRTIO_ENOMEM. */
int virtq_setup(struct virtio_dev *d, u32 index, struct virtq *vq, u32 size);
/* QueueNumMax of a queue (selects it). */
u32 virtq_num_max(const struct virtio_dev *d, u32 index);
/* Gives the ring memory back to the pool (reset the device first). */
void virtq_free(struct virtq *vq);

/* Takes n free descriptors and fills them as one chain; returns the head index, or
 * -VIRTIO_ENOSPC / -VIRTIO_EINVAL. The chain is not visible to the device yet. */
int virtq_add_chain(struct virtq *vq, const struct virtq_buf *bufs, u32 n);
/* Single-descriptor chain; flags 0 or VIRTQ_DESC_F_WRITE. */
int virtq_add_buf(struct virtq *vq, u64 addr, u32 len, u16 flags);
static inline int virtq_add_readable(struct virtq *vq, u64 addr, u32 len)
{
    return virtq_add_buf(vq, addr, len, 0);
}
static inline int virtq_add_writable(struct virtq *vq, u64 addr, u32 len)
{
    return virtq_add_buf(vq, addr, len, VIRTQ_DESC_F_WRITE);
}
/* Puts head into the next avail ring slot and publishes avail->idx (barrier before
 * and after). Any u16 is accepted as head (hostile guests). */
void virtq_submit(struct virtq *vq, u32 head);
/* Barrier, then QueueNotify = index. */
void virtq_notify(const struct virtio_dev *d, u32 index);
/* Non-blocking: 1 and *out filled if a used element was pending (it is consumed, its
 * chain freed if the id is an in-flight head, else vq->bogus_used is counted), 0 if
 * none. Acknowledges interrupts after consuming. */
int virtq_poll_used(struct virtq *vq, struct virtq_used_elem *out);
/* Polls up to timeout_iterations times (pause between polls): 0 and *out filled,
 * -VIRTIO_ETIMEDOUT, or -VIRTIO_EDEVICE if the element's id was not in flight. */
int virtq_wait_used(struct virtq *vq, u64 timeout_iterations, struct virtq_used_elem *out);
/* One synchronous request on queue vq->index: a chain of a device-readable buffer
 * [out, out+out_len) followed by a device-writable one [in, in+in_len) (either may
 * be left out with a length of 0, not both), submitted, notified and waited for
 * (virtq_wait_used). 0 and *used filled, -VIRTIO_ENOSPC / -VIRTIO_EINVAL,
 * -VIRTIO_ETIMEDOUT (the chain stays in flight), or -VIRTIO_EDEVICE if the used
 * element names another chain. `used` may be NULL. */
int virtq_transact(struct virtq *vq, u64 out, u32 out_len, u64 in, u32 in_len,
                   u64 timeout_iterations, struct virtq_used_elem *used);

#endif
