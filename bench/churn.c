/* churn: the create/write/close/unlink workload of the capture benchmark (bench/workloads.py builds and runs it).
 *
 *   churn DIR ITERATIONS [RATE [WRITE_BYTES [NAMES [MODE]]]]
 *
 * MODE "churn" (default), each iteration: openat(O_CREAT|O_WRONLY|O_TRUNC) a name, write WRITE_BYTES (default 64),
 * close, unlink: the BPF backend reports CREATE, CLOSE_WRITE and UNLINK for it. Names cycle over NAMES (default 64)
 * files "c<N>" in DIR. MODE "chmod", each iteration: one fchmodat of an existing file (created first, not counted):
 * one CHMOD event per syscall, the cheapest way to offer the consumer a high event rate.
 * RATE > 0 paces the loop to RATE iterations per second (checked every 64 iterations, so bursts stay short);
 * 0 runs flat out. Prints one line: "iterations elapsed_ns". Deterministic: no randomness.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: churn DIR ITERATIONS [RATE [WRITE_BYTES [NAMES]]]\n");
		return 2;
	}
	long long iters = atoll(argv[2]);
	double rate = argc > 3 ? atof(argv[3]) : 0;
	size_t wbytes = argc > 4 ? (size_t)atol(argv[4]) : 64;
	int names = argc > 5 ? atoi(argv[5]) : 64;
	int chmod_mode = argc > 6 && strcmp(argv[6], "chmod") == 0;
	if (names < 1)
		names = 1;
	int dfd = open(argv[1], O_DIRECTORY | O_RDONLY);
	if (dfd < 0) {
		fprintf(stderr, "churn: %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	char *buf = calloc(1, wbytes ? wbytes : 1);
	memset(buf, 'k', wbytes);
	char name[32];
	if (chmod_mode) {
		for (int k = 0; k < names; k++) {
			snprintf(name, sizeof name, "c%d", k);
			int fd = openat(dfd, name, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
			if (fd < 0) {
				fprintf(stderr, "churn: create %s: %s\n", name, strerror(errno));
				return 1;
			}
			close(fd);
		}
	}
	long long t0 = now_ns();
	for (long long i = 0; i < iters; i++) {
		if (rate > 0 && (i & 63) == 0) {
			long long due = t0 + (long long)(i / rate * 1e9);
			long long t = now_ns();
			if (due > t) {
				struct timespec ts = { (due - t) / 1000000000LL, (due - t) % 1000000000LL };
				nanosleep(&ts, NULL);
			}
		}
		snprintf(name, sizeof name, "c%d", (int)(i % names));
		if (chmod_mode) {
			if (fchmodat(dfd, name, (i & 1) ? 0600 : 0644, 0) != 0) {
				fprintf(stderr, "churn: chmod %s: %s\n", name, strerror(errno));
				return 1;
			}
			continue;
		}
		int fd = openat(dfd, name, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644);
		if (fd < 0) {
			fprintf(stderr, "churn: open %s: %s\n", name, strerror(errno));
			return 1;
		}
		if (wbytes && write(fd, buf, wbytes) != (ssize_t)wbytes) {
			fprintf(stderr, "churn: write %s: %s\n", name, strerror(errno));
			return 1;
		}
		close(fd);
		if (unlinkat(dfd, name, 0) != 0) {
			fprintf(stderr, "churn: unlink %s: %s\n", name, strerror(errno));
			return 1;
		}
	}
	printf("%lld %lld\n", iters, now_ns() - t0);
	return 0;
}
