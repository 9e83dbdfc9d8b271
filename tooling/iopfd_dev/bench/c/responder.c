/*
 * The floor for `iopfd-dev bench`: the least a fault-queue responder can do. It waits with poll(), reads
 * whole groups and answers every group SUCCESS, and on SIGTERM prints what it did as one JSON line:
 * its CPU time and peak RSS, and per fd the groups, the first read and the last write. Layouts are
 * this project's own, in bench.h.
 *
 *   responder [-r RECORDS] [-q] [-l LOG] FD...
 *
 *   FD       iommufd fault fds (anon_inode:[iommufd-pgfault]) inherited from the caller
 *   -r       records per read() (default 256)
 *   -q       as QEMU's VT-d PRQ series reads a fault queue: one read() per poll() wakeup (the rest
 *            waits for the next wakeup) and one write() per group
 *            (default: read until the fd is empty, one write() per read)
 *   -l LOG   at exit, write each answered group's (address of its last record, CLOCK_MONOTONIC time
 *            of the write that answered it) to LOG as pairs of u64 and double
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

#include "bench.h"

#define MAX_FDS 256

struct answered { uint64_t addr; double at; };

static struct pgfault records[MAX_RECORDS];
static struct page_response responses[MAX_RECORDS];
static uint64_t addrs[MAX_RECORDS];
static struct { unsigned long long groups, refused; double first_read, last_write; } figures[MAX_FDS];
static size_t records_per_read = 256;
static int per_group;
static struct answered *log_entries;
static size_t logged, log_room;

/* Kept in memory and written at exit, so logging costs no system call while serving. */
static void log_answers(const uint64_t *addr, size_t count, double at)
{
	if (log_room < logged + count) {
		log_room = (logged + count) * 2;
		log_entries = realloc(log_entries, log_room * sizeof(*log_entries));
		if (!log_entries) {
			perror("realloc");
			exit(1);
		}
	}
	for (size_t i = 0; i < count; i++)
		log_entries[logged++] = (struct answered){ addr[i], at };
}

/* Read and answer once, or (unless per_group) until the fd has nothing more; -1 on a read error. */
static int serve(int fd, int slot, int logging)
{
	do {
		ssize_t n = read(fd, records, records_per_read * sizeof(records[0]));
		if (n < 0)
			return errno == EAGAIN ? 0 : -1;
		if (n == 0)
			return 0;
		if (!figures[slot].first_read)
			figures[slot].first_read = now();
		size_t count = 0;
		for (size_t i = 0; i < (size_t)n / sizeof(records[0]); i++)
			if (records[i].flags & LAST_PAGE) {
				addrs[count] = records[i].addr;
				responses[count++] = (struct page_response){ records[i].cookie, 0 };
			}
		if (per_group) {
			for (size_t i = 0; i < count; i++) {
				figures[slot].refused += write_responses(fd, responses + i, 1);
				if (logging)
					log_answers(addrs + i, 1, now());
			}
		} else {
			figures[slot].refused += write_responses(fd, responses, count);
			if (logging)
				log_answers(addrs, count, now());
		}
		figures[slot].groups += count;
		figures[slot].last_write = now();
	} while (!per_group);
	return 0;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_term };   /* no SA_RESTART: poll() returns EINTR */
	struct pollfd polled[MAX_FDS];
	const char *log_path = NULL;
	int opt;

	while ((opt = getopt(argc, argv, "r:ql:")) != -1) {
		switch (opt) {
		case 'r':
			records_per_read = strtoul(optarg, NULL, 10);
			break;
		case 'q':
			per_group = 1;
			break;
		case 'l':
			log_path = optarg;
			break;
		default:
			return 2;
		}
	}
	int nfds = argc - optind;
	if (nfds < 1 || nfds > MAX_FDS || records_per_read < 1 || records_per_read > MAX_RECORDS) {
		fprintf(stderr, "usage: %s [-r RECORDS (1 to %d)] [-q] [-l LOG] FAULT_FD... (1 to %d fds)\n",
			argv[0], MAX_RECORDS, MAX_FDS);
		return 2;
	}
	for (int i = 0; i < nfds; i++)
		polled[i] = (struct pollfd){ .fd = atoi(argv[optind + i]), .events = POLLIN };
	sigaction(SIGTERM, &sa, NULL);
	while (!stopping) {
		if (poll(polled, nfds, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("poll");
			return 1;
		}
		for (int i = 0; i < nfds; i++) {
			if ((polled[i].revents & POLLIN) && serve(polled[i].fd, i, log_path != NULL) < 0) {
				perror("read");
				return 1;
			}
		}
	}
	if (log_path) {
		FILE *f = fopen(log_path, "wb");
		if (!f || fwrite(log_entries, sizeof(*log_entries), logged, f) != logged || fclose(f)) {
			perror(log_path);
			return 1;
		}
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	printf("{\"cpu_seconds\": %.6f, \"maxrss_kb\": %ld, \"fds\": [",
	       ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6,
	       ru.ru_maxrss);
	for (int i = 0; i < nfds; i++)
		printf("%s{\"fd\": %d, \"groups\": %llu, \"refused\": %llu, \"first_read\": %.9f, \"last_write\": %.9f}",
		       i ? ", " : "", polled[i].fd, figures[i].groups, figures[i].refused, figures[i].first_read,
		       figures[i].last_write);
	printf("]}\n");
	return 0;
}
