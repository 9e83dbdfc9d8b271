/*
 * The fault source for `iopfd bench`: issues one ioctl over and over, as fast as possible or at a
 * fixed rate, and prints what it did as one JSON line. The bench passes the ioctl's request number
 * and argument bytes (an IOMMU_TEST_CMD with IOMMU_TEST_OP_TRIGGER_IOPF, built with iopfd's
 * layout-checked cffi binding), so this program knows no kernel struct at all. Python cannot
 * trigger 20 000 faults per second under TCG; this can.
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

	double start = now(), behind = 0;
	unsigned char call[sizeof(arg)];
	for (unsigned long long i = 0; i < count; i++) {
		if (rate > 0) {
			/* Spin to the due time: sleeping has a granularity far above 50 µs under TCG. */
			double due = start + i / rate, lag;
			while ((lag = now() - due) < 0)
				;
			if (lag > behind)
				behind = lag;
		}
		memcpy(call, arg, len);  /* the kernel may write back into the argument */
		if (ioctl(fd, request, call) < 0) {
			fprintf(stderr, "trigger: ioctl %llu of %llu: %s\n", i + 1, count, strerror(errno));
			return 1;
		}
	}
	printf("{\"triggered\": %llu, \"seconds\": %.6f, \"max_behind\": %.6f}\n", count, now() - start, behind);
	return 0;
}
