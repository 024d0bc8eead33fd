/*
 * init.c — the /init of the project's Linux test initramfs (guest-images/linux).
 *
 * Protocol (console = fd 1, lines end in "\n"):
 *   VMM-INIT-MARKER: /init started
 *   VMM-INIT-CHECKSUM: ok words=8388608 checksum=0x<16 hex digits>
 *     or VMM-INIT-CHECKSUM: FAIL errors=N   (after up to 4 "VMM-INIT-MISMATCH:" lines)
 *   VMM-INIT-ERROR: <reason>                 (only if something failed)
 *   VMM-INIT-MARKER: rebooting
 * then sync() and reboot(RB_AUTOBOOT): with `reboot=k` the kernel resets the
 * machine through the i8042, which ends the VMM with status 0. If reboot()
 * returns, /init exits and the kernel panics (`panic=-1` reboots at once).
 *
 * The memory test: mmap 64 MiB anonymous, write word i (8 bytes) as
 * pattern(i) = (i ^ 0x5eed) * 0x9e3779b97f4a7c15 (mod 2^64), read every word
 * back, verify it, and xor all the words read into the checksum.
 *
 * Build: gcc -static -Os -o init init.c          (64-bit, glibc static)
 *        gcc -m32 -static -Os -o init32 init.c   (32-bit: int $0x80 syscalls
 *                                                 when booted with vdso32=0)
 *        gcc -static -Os -DHOST_TEST -o init-hosttest init.c
 * HOST_TEST builds never call reboot() or mount(); they print the same lines
 * and exit 0/1, so they can be run on the build host. The real build also
 * refuses to call reboot() unless it is PID 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

#define TEST_BYTES (64UL * 1024 * 1024)
#define TEST_WORDS (TEST_BYTES / 8)
#define PATTERN_SEED 0x5eedULL
#define PATTERN_MULT 0x9e3779b97f4a7c15ULL

static inline uint64_t pattern(uint64_t i)
{
	return (i ^ PATTERN_SEED) * PATTERN_MULT;
}

/* Output without stdio: one write() per line keeps lines whole on the console. */
struct line {
	char buf[160];
	size_t len;
};

static void put_str(struct line *l, const char *s)
{
	while (*s && l->len < sizeof(l->buf) - 1)
		l->buf[l->len++] = *s++;
}

static void put_dec(struct line *l, uint64_t v)
{
	char tmp[21];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n && l->len < sizeof(l->buf) - 1)
		l->buf[l->len++] = tmp[--n];
}

static void put_hex16(struct line *l, uint64_t v)
{
	static const char digits[] = "0123456789abcdef";
	put_str(l, "0x");
	for (int shift = 60; shift >= 0; shift -= 4)
		if (l->len < sizeof(l->buf) - 1)
			l->buf[l->len++] = digits[(v >> shift) & 0xf];
}

static void emit(struct line *l)
{
	const char *p = l->buf;
	size_t n;

	l->buf[l->len++] = '\n';
	n = l->len;
	while (n) {
		ssize_t w = write(1, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			break;
		p += w;
		n -= (size_t)w;
	}
	l->len = 0;
}

static void say(const char *s)
{
	struct line l = { .len = 0 };
	put_str(&l, s);
	emit(&l);
}

static void say_errno(const char *what, int err)
{
	struct line l = { .len = 0 };
	put_str(&l, "VMM-INIT-ERROR: ");
	put_str(&l, what);
	put_str(&l, " failed errno=");
	put_dec(&l, (uint64_t)err);
	emit(&l);
}

/*
 * The kernel opens /dev/console as fds 0-2 for init when the initramfs has
 * the node. If it did not (no node), mount devtmpfs on /dev and open it.
 */
static void ensure_console(void)
{
#ifndef HOST_TEST
	int fd;

	if (fcntl(1, F_GETFD) >= 0 || getpid() != 1)
		return;
	mkdir("/dev", 0755);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	fd = open("/dev/console", O_RDWR);
	if (fd < 0)
		return;
	for (int i = 0; i < 3; i++)
		if (fd != i)
			dup2(fd, i);
	if (fd > 2)
		close(fd);
#endif
}

static int memory_test(void)
{
	struct line l = { .len = 0 };
	uint64_t errors = 0, sum = 0;
	volatile uint64_t *mem;
	void *p;

	p = mmap(NULL, TEST_BYTES, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		say_errno("mmap 64 MiB", errno);
		return 1;
	}
	mem = p;

	for (uint64_t i = 0; i < TEST_WORDS; i++)
		mem[i] = pattern(i);
	__asm__ __volatile__("" ::: "memory");
	for (uint64_t i = 0; i < TEST_WORDS; i++) {
		uint64_t got = mem[i], want = pattern(i);
		sum ^= got;
		if (got != want) {
			if (errors < 4) {
				put_str(&l, "VMM-INIT-MISMATCH: word=");
				put_dec(&l, i);
				put_str(&l, " got=");
				put_hex16(&l, got);
				put_str(&l, " want=");
				put_hex16(&l, want);
				emit(&l);
			}
			errors++;
		}
	}

	if (errors == 0) {
		put_str(&l, "VMM-INIT-CHECKSUM: ok words=");
		put_dec(&l, TEST_WORDS);
		put_str(&l, " checksum=");
		put_hex16(&l, sum);
	} else {
		put_str(&l, "VMM-INIT-CHECKSUM: FAIL errors=");
		put_dec(&l, errors);
	}
	emit(&l);

	if (munmap(p, TEST_BYTES) != 0)
		say_errno("munmap", errno);
	return errors ? 1 : 0;
}

static void finish(int status)
{
#ifdef HOST_TEST
	say("VMM-INIT-MARKER: host test, not rebooting");
	_exit(status);
#else
	if (getpid() != 1) {
		/* Never reboot a machine we are not the init of (e.g. the host). */
		say("VMM-INIT-ERROR: not PID 1, refusing to reboot");
		_exit(status ? status : 1);
	}
	say("VMM-INIT-MARKER: rebooting");
	sync();
	reboot(RB_AUTOBOOT);
	say_errno("reboot(RB_AUTOBOOT)", errno);
	/* init exiting makes the kernel panic; with panic=-1 it reboots. */
	_exit(1);
#endif
}

int main(void)
{
	int status;

	ensure_console();
	say("VMM-INIT-MARKER: /init started");
	status = memory_test();
	finish(status);
	return status;
}
