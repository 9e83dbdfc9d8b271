/*
 * The floor for `iopfd-dev bench`'s ioas-map runs: demand paging one fault at a time. It waits with
 * poll(), reads up to RECORDS fault records until the fd is empty, maps each fault's page from a
 * backing memfd into the IOAS with one IOMMU_IOAS_MAP per fault (no coalescing), and answers every
 * group SUCCESS (INVALID when one of its pages lies outside the window or its map fails; a page
 * already mapped counts as mapped) with one write() per read, as responder.c does. On SIGTERM it
 * prints what it did as one JSON line: responder.c's figures, and the maps made and failed.
 *
 * The bench passes IOMMU_IOAS_MAP's request number and argument bytes (struct iommu_ioas_map with
 * size, flags, ioas_id and length filled in, built with iopfd's layout-checked cffi binding) and
 * where in those bytes the user address and the IOVA lie, so this program knows no iommufd struct
 * but the fault record and the response (this project's own layouts, in bench.h).
 *
 *   mapper [-r RECORDS] IOMMUFD FAULT_FD REQUEST HEXARG USER_VA_OFFSET IOVA_OFFSET MEMFD WINDOW LENGTH PAGE
 *
 *   IOMMUFD, FAULT_FD, MEMFD   inherited fds: the iommufd holding the IOAS, its fault queue, the backing
 *   WINDOW, LENGTH             the IOVA window [WINDOW, WINDOW + LENGTH) is backed by bytes [0, LENGTH)
 *                              of MEMFD; a fault maps its PAGE (a power of two: HEXARG's length)
 *   -r                         records per read() (default 256)
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

static struct pgfault records[MAX_RECORDS];
static struct page_response responses[MAX_RECORDS];
static unsigned char arg[256];
static size_t len;
static long va_offset, iova_offset;
static int iommufd;
static unsigned long request;
static uint64_t window, window_length, page;
static unsigned char *backing;
static unsigned long long groups, refused, mapped, already, failed, outside;
static double first_read, last_write;

/* One IOMMU_IOAS_MAP of the page of addr; 0 when it is mapped (now or already). */
static int map_page(uint64_t addr)
{
	unsigned char call[sizeof(arg)];
	uint64_t iova = addr & ~(page - 1);
	if (iova < window || iova - window >= window_length) {
		outside++;
		return -1;
	}
	uint64_t user_va = (uint64_t)(uintptr_t)(backing + (iova - window));
	memcpy(call, arg, len);  /* the kernel writes back into the argument */
	memcpy(call + va_offset, &user_va, sizeof(user_va));
	memcpy(call + iova_offset, &iova, sizeof(iova));
	if (ioctl(iommufd, request, call) == 0) {
		mapped++;
		return 0;
	}
	if (errno == EEXIST) {
		already++;
		return 0;
	}
	failed++;
	return -1;
}

/* Read, map and answer until the fd has nothing more; -1 on a read error. */
static int serve(int fd, size_t records_per_read)
{
	uint32_t code = SUCCESS;  /* of the group being read: INVALID once one of its pages fails */
	for (;;) {
		ssize_t n = read(fd, records, records_per_read * sizeof(records[0]));
		if (n < 0)
			return errno == EAGAIN ? 0 : -1;
		if (n == 0)
			return 0;
		if (!first_read)
			first_read = now();
		size_t count = 0;
		for (size_t i = 0; i < (size_t)n / sizeof(records[0]); i++) {
			if (map_page(records[i].addr) < 0)
				code = INVALID;
			if (records[i].flags & LAST_PAGE) {
				responses[count++] = (struct page_response){ records[i].cookie, code };
				code = SUCCESS;
			}
		}
		refused += write_responses(fd, responses, count);
		groups += count;
		last_write = now();
	}
}

int main(int argc, char **argv)
{
	size_t records_per_read = 256;
	int opt;
	while ((opt = getopt(argc, argv, "r:")) != -1) {
		if (opt != 'r')
			return 2;
		records_per_read = strtoul(optarg, NULL, 10);
	}
	if (argc - optind != 10 || records_per_read < 1 || records_per_read > MAX_RECORDS) {
		fprintf(stderr, "usage: %s [-r RECORDS (1 to %d)] IOMMUFD FAULT_FD REQUEST HEXARG USER_VA_OFFSET "
			"IOVA_OFFSET MEMFD WINDOW LENGTH PAGE\n", argv[0], MAX_RECORDS);
		return 2;
	}
	char **a = argv + optind;
	iommufd = atoi(a[0]);
	int fault_fd = atoi(a[1]), memfd = atoi(a[6]);
	request = strtoul(a[2], NULL, 0);
	len = strlen(a[3]) / 2;
	va_offset = strtol(a[4], NULL, 10);
	iova_offset = strtol(a[5], NULL, 10);
	window = strtoull(a[7], NULL, 0);
	window_length = strtoull(a[8], NULL, 0);
	if (len < 8 || len > sizeof(arg) || va_offset < 0 || va_offset + 8 > (long)len || iova_offset < 0
	    || iova_offset + 8 > (long)len) {
		fprintf(stderr, "mapper: the argument must be 8 to %zu bytes in hex, the offsets inside it\n", sizeof(arg));
		return 2;
	}
	for (size_t i = 0; i < len; i++)
		sscanf(a[3] + 2 * i, "%2hhx", &arg[i]);
	page = strtoull(a[9], NULL, 0);
	if (page == 0 || (page & (page - 1)) || window % page || window_length % page) {
		fprintf(stderr, "mapper: the page size must be a power of two dividing WINDOW and LENGTH\n");
		return 2;
	}
	backing = mmap(NULL, window_length, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (backing == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	struct sigaction sa = { .sa_handler = on_term };   /* no SA_RESTART: poll() returns EINTR */
	sigaction(SIGTERM, &sa, NULL);
	struct pollfd polled = { .fd = fault_fd, .events = POLLIN };
	while (!stopping) {
		if (poll(&polled, 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("poll");
			return 1;
		}
		if ((polled.revents & POLLIN) && serve(fault_fd, records_per_read) < 0) {
			perror("read");
			return 1;
		}
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	printf("{\"cpu_seconds\": %.6f, \"maxrss_kb\": %ld, \"mapped\": %llu, \"already_mapped\": %llu, "
	       "\"map_failures\": %llu, \"outside_window\": %llu, \"fds\": [{\"fd\": %d, \"groups\": %llu, "
	       "\"refused\": %llu, \"first_read\": %.9f, \"last_write\": %.9f}]}\n",
	       ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6,
	       ru.ru_maxrss, mapped, already, failed, outside, fault_fd, groups, refused, first_read, last_write);
	return 0;
}
