/*
 * The fault source for `iopfd-dev bench`: issues one ioctl over and over, as fast as possible or at a
 * fixed rate, and prints what it did as one JSON line. The bench passes the ioctl's request number
 * and argument bytes (an IOMMU_TEST_CMD with IOMMU_TEST_OP_TRIGGER_IOPF, built with iopfd's
 * layout-checked cffi binding), so this program knows no kernel struct at all. Python cannot
 * trigger 20 000 faults per second under TCG; this can, in 1 ms ticks.
 *
 *   trigger FD REQUEST HEXARG COUNT RATE   FD: an inherited iommufd; RATE 0: as fast as possible
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	unsigned char arg[256];
	if (argc != 6) {
		fprintf(stderr, "usage: %s FD REQUEST HEXARG COUNT RATE\n", argv[0]);
		return 2;
	}
	int fd = atoi(argv[1]);
	unsigned long request = strtoul(argv[2], NULL, 0);
	size_t len = strlen(argv[3]) / 2;
	unsigned long long count = strtoull(argv[4], NULL, 0);
	double rate = atof(argv[5]);
	if (len == 0 || len > sizeof(arg)) {
		fprintf(stderr, "trigger: the argument must be 1 to %zu bytes in hex\n", sizeof(arg));
		return 2;
	}
	for (size_t i = 0; i < len; i++)
		sscanf(argv[3] + 2 * i, "%2hhx", &arg[i]);

	/* At a rate, faults are raised in ticks of 1 ms: everything due is issued back to back, then
	 * the trigger sleeps to the next tick. Spinning to each fault's due time would take a whole
	 * vCPU from the responder it measures. */
	const double tick = 1e-3;
	double start = now(), behind = 0;
	unsigned char call[sizeof(arg)];
	unsigned long long issued = 0;
	while (issued < count) {
		unsigned long long due = count;
		if (rate > 0) {
			double elapsed = now() - start;
			due = (unsigned long long)(elapsed * rate) + 1;
			if (due > count)
				due = count;
			/* how late the oldest fault of this tick is raised */
			double lag = elapsed - issued / rate;
			if (lag > behind)
				behind = lag;
		}
		for (; issued < due; issued++) {
			memcpy(call, arg, len);  /* the kernel may write back into the argument */
			if (ioctl(fd, request, call) < 0) {
				fprintf(stderr, "trigger: ioctl %llu of %llu: %s\n", issued + 1, count, strerror(errno));
				return 1;
			}
		}
		if (issued < count) {
			double next = start + (double)(unsigned long long)((now() - start) / tick + 1) * tick;
			struct timespec at = { (time_t)next, (long)((next - (time_t)next) * 1e9) };
			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL);
		}
	}
	printf("{\"triggered\": %llu, \"seconds\": %.6f, \"max_behind\": %.6f}\n", count, now() - start, behind);
	return 0;
}
