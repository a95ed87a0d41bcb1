/* hookloop: the syscall loops of the hook-cost benchmark (bench/hookcost.py builds and runs it).
 *
 *   hookloop FILE N
 *
 * Opens FILE (created, mode 0644), then three rounds of N fchmod(2) on it and N pwrite(2) of one byte to it. Prints
 * one line: the fastest round's nanoseconds per fchmod and per pwrite. fchmod is the call a hook is attached to;
 * pwrite is a call no kwatch program watches, so it shows what attaching costs every other syscall.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "benchclock.h"

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: hookloop FILE N\n");
		return 2;
	}
	long n = atol(argv[2]);
	int fd = open(argv[1], O_CREAT | O_WRONLY, 0644);
	if (fd < 0 || n < 1) {
		perror(argv[1]);
		return 1;
	}
	double best_chmod = 1e18, best_write = 1e18;
	char byte = 0;
	for (int round = 0; round < 3; round++) {
		double t0 = now_ns();
		for (long i = 0; i < n; i++)
			if (fchmod(fd, 0644) != 0) {
				perror("fchmod");
				return 1;
			}
		double t1 = now_ns();
		for (long i = 0; i < n; i++)
			if (pwrite(fd, &byte, 1, 0) != 1) {
				perror("pwrite");
				return 1;
			}
		double t2 = now_ns();
		if ((t1 - t0) / n < best_chmod)
			best_chmod = (t1 - t0) / n;
		if ((t2 - t1) / n < best_write)
			best_write = (t2 - t1) / n;
	}
	printf("%.1f %.1f\n", best_chmod, best_write);
	return 0;
}
