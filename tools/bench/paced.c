/* Paced request/response load generator and echo server for the HBONE benchmark.
 *
 *   paced client HOST PORT CONNS RATE SECONDS SIZE   -> prints "count p50_us p90_us p99_us max_us"
 *   paced server HOST PORT                           -> echoes SIZE-byte requests forever
 *
 * HOST is an IPv4 or an IPv6 address (one with a ':').
 *
 * Client: CONNS long-lived connections, each a thread sending one SIZE-byte request at a
 * fixed schedule (RATE/CONNS per second) and reading the SIZE-byte reply. Latency is measured
 * from the *scheduled* send time, so a stall is not hidden (no coordinated omission). wrk2,
 * which does this, is not packaged in Debian.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static size_t size_g;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int full_io(int fd, char *buf, size_t n, int writing) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = writing ? write(fd, buf + done, n - done) : read(fd, buf + done, n - done);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            return -1;
        }
        done += (size_t)r;
    }
    return 0;
}

/* HOST:PORT as a socket address of HOST's family; exits on an address that does not parse. */
static socklen_t sockaddr_of(const char *host, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    if (strchr(host, ':')) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) { fprintf(stderr, "bad host %s\n", host); exit(2); }
        return sizeof *a;
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    if (inet_pton(AF_INET, host, &a->sin_addr) != 1) { fprintf(stderr, "bad host %s\n", host); exit(2); }
    return sizeof *a;
}

static int dial(const char *host, int port) {
    struct sockaddr_storage a;
    socklen_t len = sockaddr_of(host, port, &a);
    int fd = socket(a.ss_family, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&a, len) < 0) { perror("connect"); exit(2); }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

struct job { const char *host; int port; double interval_ns; int64_t start, end; int64_t *lat; long n; };

static void *client_thread(void *arg) {
    struct job *j = arg;
    int fd = dial(j->host, j->port);
    char *buf = malloc(size_g);
    memset(buf, 'q', size_g);
    long i = 0;
    for (;;) {
        int64_t due = j->start + (int64_t)(i * j->interval_ns);
        if (due >= j->end) break;
        int64_t t = now_ns();
        if (t < due) {
            struct timespec ts = {.tv_sec = due / 1000000000LL, .tv_nsec = due % 1000000000LL};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        }
        if (full_io(fd, buf, size_g, 1) || full_io(fd, buf, size_g, 0)) { fprintf(stderr, "io error\n"); exit(3); }
        j->lat[i++] = now_ns() - due;
    }
    j->n = i;
    close(fd);
    free(buf);
    return NULL;
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void *echo_thread(void *arg) {
    int fd = (int)(intptr_t)arg;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char *buf = malloc(65536);
    for (;;) {
        ssize_t r = read(fd, buf, 65536);
        if (r <= 0) break;
        if (full_io(fd, buf, (size_t)r, 1)) break;
    }
    free(buf);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc >= 4 && strcmp(argv[1], "server") == 0) {
        struct sockaddr_storage a;
        socklen_t len = sockaddr_of(argv[2], atoi(argv[3]), &a);
        int ls = socket(a.ss_family, SOCK_STREAM, 0), one = 1;
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(ls, (struct sockaddr *)&a, len) || listen(ls, 128)) { perror("listen"); return 2; }
        for (;;) {
            int fd = accept(ls, NULL, NULL);
            if (fd < 0) continue;
            pthread_t t;
            pthread_create(&t, NULL, echo_thread, (void *)(intptr_t)fd);
            pthread_detach(t);
        }
    }
    if ((argc != 8 && argc != 9) || strcmp(argv[1], "client") != 0 ||
        (argc == 9 && strcmp(argv[8], "cdf") != 0)) {
        fprintf(stderr, "usage: paced client HOST PORT CONNS RATE SECONDS SIZE [cdf] | paced server HOST PORT\n");
        return 1;
    }
    int conns = atoi(argv[4]);
    double rate = atof(argv[5]), secs = atof(argv[6]);
    size_g = (size_t)atol(argv[7]);
    long per = (long)(rate / conns * secs) + 16;
    struct job *jobs = calloc(conns, sizeof *jobs);
    pthread_t *th = calloc(conns, sizeof *th);
    int64_t start = now_ns() + 200000000LL;
    for (int c = 0; c < conns; c++) {
        double interval = 1e9 * conns / rate;
        jobs[c] = (struct job){argv[2], atoi(argv[3]), interval,
                               start + (int64_t)(interval * c / conns), start + (int64_t)(secs * 1e9),
                               calloc(per, sizeof(int64_t)), 0};
        pthread_create(&th[c], NULL, client_thread, &jobs[c]);
    }
    long total = 0;
    for (int c = 0; c < conns; c++) { pthread_join(th[c], NULL); total += jobs[c].n; }
    int64_t *all = malloc(sizeof(int64_t) * (total ? total : 1));
    long k = 0;
    for (int c = 0; c < conns; c++) for (long i = 0; i < jobs[c].n; i++) all[k++] = jobs[c].lat[i];
    qsort(all, total, sizeof(int64_t), cmp64);
#define PCT(p) (total ? all[(long)((total - 1) * (p))] / 1000.0 : 0.0)
    printf("%ld %.1f %.1f %.1f %.1f\n", total, PCT(0.50), PCT(0.90), PCT(0.99), total ? all[total - 1] / 1000.0 : 0.0);
    if (argc == 9) {
        /* The latency distribution for CDF plots: percentiles 0..99 by 1, then the tail. */
        static const double tail[] = {0.995, 0.999, 1.0};
        for (int q = 0; q < 100; q++) printf("%s%.1f", q ? " " : "", PCT(q / 100.0));
        for (int q = 0; q < 3; q++) printf(" %.1f", PCT(tail[q]));
        printf("\n");
    }
    return 0;
}
