/*
 * What the bench's C programs share: this project's own layouts of the fault record and the page
 * response (checked against the lab kernels' uapi by tests/kernel/test_layout.py through the cffi
 * binding, not copied headers), the clock, the SIGTERM flag and the writing of responses.
 */
#ifndef IOPFD_BENCH_H
#define IOPFD_BENCH_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
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
#define SUCCESS 0u
#define INVALID 1u
#define MAX_RECORDS 4096    /* records per read, and what iopfd accepts as a peer's read size */

static volatile sig_atomic_t stopping;
static inline void on_term(int sig) { (void)sig; stopping = 1; }

static inline double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Write count responses to a fault fd: the kernel stops at the first refused entry, which is
 * skipped. Returns how many were refused. */
static inline unsigned long long write_responses(int fd, const struct page_response *answers, size_t count)
{
	unsigned long long refused = 0;
	for (size_t done = 0; done < count;) {
		ssize_t w = write(fd, answers + done, (count - done) * sizeof(answers[0]));
		size_t taken = w > 0 ? (size_t)w / sizeof(answers[0]) : 0;
		done += taken;
		if (done < count && taken == 0) {
			refused++;
			done++;
		}
	}
	return refused;
}

#endif
