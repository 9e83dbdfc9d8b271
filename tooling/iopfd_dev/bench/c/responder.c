/*
 * The floor for `iopfd-dev bench`: the least a fault-queue responder can do. It waits with poll(),
 * reads whole groups in batches, answers every group SUCCESS in one write() per read, and on
 * SIGTERM prints what it did as one JSON line. Layouts are this project's own (checked against the
 * lab kernel's uapi by tests/kernel/test_layout.py through the cffi binding), not copied headers.
 *
 *   responder FD...   FD: iommufd fault fds (anon_inode:[iommufd-pgfault]) inherited from the caller
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

struct pgfault {            /* struct iommu_hwpt_pgfault, 40 bytes */
	uint32_t flags, dev_id, pasid, grpid, perm, reserved;
	uint64_t addr;
	uint32_t length, cookie;
};
struct page_response {      /* struct iommu_hwpt_page_response, 8 bytes */
	uint32_t cookie, code;
};
_Static_assert(sizeof(struct pgfault) == 40, "iommu_hwpt_pgfault is 40 bytes");
_Static_assert(sizeof(struct page_response) == 8, "iommu_hwpt_page_response is 8 bytes");

#define LAST_PAGE 2u
#define MAX_FDS 64
#define BATCH 4096          /* records per read(), as many as iopfd's fully grown buffer reads at once */

static volatile sig_atomic_t stopping;
static void on_term(int sig) { (void)sig; stopping = 1; }

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct pgfault records[BATCH];
static struct page_response responses[BATCH];
static unsigned long long groups, refused;
static double first_read, last_write;

/* Read and answer until the fd has nothing more; -1 on a read error. */
static int drain(int fd)
{
	for (;;) {
		ssize_t n = read(fd, records, sizeof(records));
		if (n < 0)
			return -1;
		if (n == 0)
			return 0;
		if (!first_read)
			first_read = now();
		size_t count = 0;
		for (size_t i = 0; i < (size_t)n / sizeof(records[0]); i++)
			if (records[i].flags & LAST_PAGE)
				responses[count++] = (struct page_response){ records[i].cookie, 0 };
		/* The kernel stops at the first refused entry: skip it and write the rest. */
		for (size_t done = 0; done < count;) {
			ssize_t w = write(fd, responses + done, (count - done) * sizeof(responses[0]));
			size_t taken = w > 0 ? (size_t)w / sizeof(responses[0]) : 0;
			done += taken;
			if (done < count && taken == 0) {
				refused++;
				done++;
			}
		}
		groups += count;
		last_write = now();
	}
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_term };   /* no SA_RESTART: poll() returns EINTR */
	struct pollfd polled[MAX_FDS];
	int nfds = argc - 1;

	if (nfds < 1 || nfds > MAX_FDS) {
		fprintf(stderr, "usage: %s FAULT_FD... (1 to %d fds)\n", argv[0], MAX_FDS);
		return 2;
	}
	for (int i = 0; i < nfds; i++)
		polled[i] = (struct pollfd){ .fd = atoi(argv[i + 1]), .events = POLLIN };
	sigaction(SIGTERM, &sa, NULL);
	while (!stopping) {
		if (poll(polled, nfds, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("poll");
			return 1;
		}
		for (int i = 0; i < nfds; i++) {
			if ((polled[i].revents & POLLIN) && drain(polled[i].fd) < 0) {
				perror("read");
				return 1;
			}
		}
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	printf("{\"groups\": %llu, \"refused\": %llu, \"first_read\": %.9f, \"last_write\": %.9f, "
	       "\"cpu_seconds\": %.6f, \"maxrss_kb\": %ld}\n", groups, refused, first_read, last_write,
	       ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6,
	       ru.ru_maxrss);
	return 0;
}
