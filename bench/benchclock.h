/* The clock of the bench loops (hookloop.c, execloop.c): CLOCK_MONOTONIC in nanoseconds. */
#ifndef BENCHCLOCK_H
#define BENCHCLOCK_H
#include <time.h>

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}
#endif
