/*
 * A forward peer at the floor, for `iopfd-dev bench` and the tests: it waits with poll(), receives
 * packets of fault records on a peer channel (docs/protocol.md), and answers every group SUCCESS
 * in one send() per packet. When iopfd closes the channel, or on SIGTERM, it prints what it did as
 * one JSON line. Layouts are this project's own, in bench.h.
 *
 *   peer FD [RECORDS]   FD: the peer's end of the channel (a SOCK_SEQPACKET socket: --forward-fd's
 *                       socketpair, or the fd a `forward` reply carried); RECORDS: records per
 *                       receive, as the peer told iopfd (default 256)
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench.h"

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: %s FD [RECORDS]\n", argv[0]);
		return 2;
	}
	int fd = atoi(argv[1]);
	long records = argc == 3 ? strtol(argv[2], NULL, 10) : 256;
	if (records < 1 || records > MAX_RECORDS) {
		fprintf(stderr, "RECORDS: 1 to %d\n", MAX_RECORDS);
		return 2;
	}
	struct sigaction sa = { .sa_handler = on_term };
	sigaction(SIGTERM, &sa, NULL);

	static struct pgfault in[MAX_RECORDS];
	static struct page_response out[MAX_RECORDS];
	unsigned long packets = 0, groups = 0;
	struct pollfd p = { .fd = fd, .events = POLLIN };
	while (!stopping) {
		if (poll(&p, 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("poll");
			return 1;
		}
		ssize_t got = recv(fd, in, records * sizeof(in[0]), MSG_DONTWAIT);
		if (got < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			perror("recv");
			return 1;
		}
		if (got == 0)
			break;  /* iopfd closed the channel */
		size_t n = 0;
		for (size_t i = 0; i < (size_t)got / sizeof(in[0]); i++)
			if (in[i].flags & LAST_PAGE)  /* one answer per group: its id is in every record */
				out[n++] = (struct page_response){ .cookie = in[i].cookie, .code = 0 /* SUCCESS */ };
		if (send(fd, out, n * sizeof(out[0]), MSG_NOSIGNAL) < 0) {
			if (errno == EPIPE || errno == ECONNRESET)
				break;
			perror("send");
			return 1;
		}
		packets++;
		groups += n;
	}
	printf("{\"packets\": %lu, \"groups\": %lu}\n", packets, groups);
	return 0;
}
