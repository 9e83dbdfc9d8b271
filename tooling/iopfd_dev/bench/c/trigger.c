/*
 * The fault source for `iopfd-dev bench`: issues one ioctl over and over, as fast as possible or at a
 * fixed rate, from one thread or from several at once, and prints what it did as one JSON line. The
 * bench passes the ioctl's request number and argument bytes (an IOMMU_TEST_CMD with
 * IOMMU_TEST_OP_TRIGGER_IOPF, built with iopfd's layout-checked cffi binding) and, to vary them,
 * where in those bytes the fault's address and PASID lie, so this program knows no kernel struct at
 * all. Python cannot trigger 20 000 faults per second under TCG; this can, in 1 ms ticks.
 *
 *   trigger [-t THREADS -a ADDR_OFFSET [-p PASID_OFFSET] [-l LOG]] FD REQUEST HEXARG COUNT RATE
 *
 *   FD         an inherited iommufd; RATE 0: as fast as possible (with one thread only, a rate)
 *   -t         THREADS threads, released together, raise COUNT faults between them
 *   -a         fault i gets the address of HEXARG + i * 4096 (a u64 at byte ADDR_OFFSET)
 *   -p         thread t raises its faults at the PASID of HEXARG + t (a u32 at byte PASID_OFFSET)
 *   -l LOG     at exit, write each fault's (address, CLOCK_MONOTONIC time just before its ioctl) to
 *              LOG as pairs of u64 and double
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define PAGE 4096

struct raised { uint64_t addr; double at; };

static unsigned char arg[256];
static size_t len;
static int fd;
static unsigned long request;
static long addr_offset = -1, pasid_offset = -1;
static struct raised *raised;
static pthread_barrier_t start_line;

struct worker {
	pthread_t thread;
	unsigned long long first, count;  /* faults [first, first + count) of the whole run */
	uint32_t pasid_step;
	int failed;
};

/* Raise one fault: fault number i, at this worker's PASID; logs when it was raised. */
static int raise_fault(struct worker *w, unsigned long long i)
{
	unsigned char call[sizeof(arg)];
	memcpy(call, arg, len);  /* the kernel may write back into the argument */
	uint64_t addr = 0;
	if (addr_offset >= 0) {
		memcpy(&addr, call + addr_offset, sizeof(addr));
		addr += i * PAGE;
		memcpy(call + addr_offset, &addr, sizeof(addr));
	}
	if (pasid_offset >= 0) {
		uint32_t pasid;
		memcpy(&pasid, call + pasid_offset, sizeof(pasid));
		pasid += w->pasid_step;
		memcpy(call + pasid_offset, &pasid, sizeof(pasid));
	}
	if (raised)
		raised[i] = (struct raised){ addr, now() };
	if (ioctl(fd, request, call) < 0) {
		fprintf(stderr, "trigger: ioctl %llu: %s\n", i + 1, strerror(errno));
		return -1;
	}
	return 0;
}

static void *run_worker(void *data)
{
	struct worker *w = data;
	pthread_barrier_wait(&start_line);
	for (unsigned long long i = w->first; i < w->first + w->count; i++)
		if (raise_fault(w, i) < 0) {
			w->failed = 1;
			break;
		}
	return NULL;
}

int main(int argc, char **argv)
{
	long threads = 1;
	const char *log_path = NULL;
	int opt;
	while ((opt = getopt(argc, argv, "t:a:p:l:")) != -1) {
		switch (opt) {
		case 't': threads = strtol(optarg, NULL, 10); break;
		case 'a': addr_offset = strtol(optarg, NULL, 10); break;
		case 'p': pasid_offset = strtol(optarg, NULL, 10); break;
		case 'l': log_path = optarg; break;
		default: return 2;
		}
	}
	if (argc - optind != 5) {
		fprintf(stderr, "usage: %s [-t THREADS -a ADDR_OFFSET [-p PASID_OFFSET] [-l LOG]] FD REQUEST HEXARG "
			"COUNT RATE\n", argv[0]);
		return 2;
	}
	fd = atoi(argv[optind]);
	request = strtoul(argv[optind + 1], NULL, 0);
	const char *hex = argv[optind + 2];
	len = strlen(hex) / 2;
	unsigned long long count = strtoull(argv[optind + 3], NULL, 0);
	double rate = atof(argv[optind + 4]);
	if (len == 0 || len > sizeof(arg)) {
		fprintf(stderr, "trigger: the argument must be 1 to %zu bytes in hex\n", sizeof(arg));
		return 2;
	}
	if (threads < 1 || (threads > 1 && rate > 0) || addr_offset + 8 > (long)len || pasid_offset + 4 > (long)len
	    || ((threads > 1 || log_path) && addr_offset < 0)) {
		fprintf(stderr, "trigger: -t needs -a and no RATE; -l needs -a; offsets inside the argument\n");
		return 2;
	}
	for (size_t i = 0; i < len; i++)
		sscanf(hex + 2 * i, "%2hhx", &arg[i]);
	if (log_path && !(raised = calloc(count, sizeof(*raised)))) {
		perror("calloc");
		return 1;
	}

	double start = now(), behind = 0;
	if (threads > 1) {
		struct worker *workers = calloc(threads, sizeof(*workers));
		pthread_barrier_init(&start_line, NULL, threads + 1);
		for (long t = 0; t < threads; t++) {
			workers[t] = (struct worker){ .first = count * t / threads,
						      .count = count * (t + 1) / threads - count * t / threads,
						      .pasid_step = t };
			if (pthread_create(&workers[t].thread, NULL, run_worker, &workers[t])) {
				perror("pthread_create");
				return 1;
			}
		}
		start = now();
		pthread_barrier_wait(&start_line);
		int failed = 0;
		for (long t = 0; t < threads; t++) {
			pthread_join(workers[t].thread, NULL);
			failed |= workers[t].failed;
		}
		if (failed)
			return 1;
	} else {
		/* At a rate, faults are raised in ticks of 1 ms: everything due is issued back to back,
		 * then the trigger sleeps to the next tick. Spinning to each fault's due time would take
		 * a whole vCPU from the responder it measures. */
		const double tick = 1e-3;
		struct worker one = { 0 };
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
			for (; issued < due; issued++)
				if (raise_fault(&one, issued) < 0)
					return 1;
			if (issued < count) {
				double next = start + (double)(unsigned long long)((now() - start) / tick + 1) * tick;
				struct timespec at = { (time_t)next, (long)((next - (time_t)next) * 1e9) };
				clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL);
			}
		}
	}
	double seconds = now() - start;
	if (log_path) {
		FILE *f = fopen(log_path, "wb");
		if (!f || fwrite(raised, sizeof(*raised), count, f) != count || fclose(f)) {
			perror(log_path);
			return 1;
		}
	}
	printf("{\"triggered\": %llu, \"seconds\": %.6f, \"max_behind\": %.6f}\n", count, seconds, behind);
	return 0;
}
