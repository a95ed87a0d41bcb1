/* execloop: the fork+exec loop of the exec-cost benchmark (bench/execost.py builds it static and runs it).
 *
 *   execloop N ROUNDS
 *
 * ROUNDS rounds of N times: fork(2), execve(2) of this same program without arguments (which exits 0 at once), wait.
 * Prints one line: the fastest round's nanoseconds per fork+exec+exit+wait. Built static, so an exec maps one file
 * and runs no dynamic loader: the least an exec costs, against which a per-exec hook shows the most.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "benchclock.h"

int main(int argc, char **argv)
{
	if (argc == 1)
		return 0; /* the child */
	if (argc != 3) {
		fprintf(stderr, "usage: execloop N ROUNDS\n");
		return 2;
	}
	long n = atol(argv[1]), rounds = atol(argv[2]);
	char self[PATH_MAX];
	ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (len < 0 || n < 1 || rounds < 1) {
		perror("execloop");
		return 1;
	}
	self[len] = 0;
	char *child_argv[] = {self, NULL};
	char *child_env[] = {NULL};
	double best = 1e18;
	for (long round = 0; round < rounds; round++) {
		double t0 = now_ns();
		for (long i = 0; i < n; i++) {
			pid_t pid = fork();
			if (pid < 0) {
				perror("fork");
				return 1;
			}
			if (pid == 0) {
				execve(self, child_argv, child_env);
				_exit(127);
			}
			int status;
			if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
				fprintf(stderr, "execloop: child failed (status %d)\n", status);
				return 1;
			}
		}
		double per = (now_ns() - t0) / n;
		if (per < best)
			best = per;
	}
	printf("%.1f\n", best);
	return 0;
}
