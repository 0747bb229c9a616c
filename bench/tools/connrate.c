/* connrate: short-connection load generator for bench/'s conn_rate case.
 *
 *   connrate HOST PORT CONCURRENCY DURATION_S MAX_CONNECTIONS HELLO_FILE
 *
 * Keeps CONCURRENCY connections in flight: each connects, sends the bytes of
 * HELLO_FILE (a TLS ClientHello with SNI, built by bench/hello.py), reads until
 * the same number of bytes came back from the echo upstream, closes, and the
 * slot starts the next one. New connections start until DURATION_S or
 * MAX_CONNECTIONS; in-flight ones then finish (each bounded by 5 s). Prints one
 * JSON line with the same keys as bench/connrate.py.
 *
 * C because a Python client on one core tops out near the rate a C proxy
 * sustains, which would compress every ratio towards 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CONN_TIMEOUT 5.0
#define MAX_ERRNO 256

struct slot {
    int fd;
    int sent; /* 0: connecting, 1: hello sent, reading the echo */
    size_t got;
    double started;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct sockaddr_in target;
static int ep;
static char *hello;
static size_t hello_len;
static long ok_count, failed_count, started_count, short_echo, timeouts;
static long errno_count[MAX_ERRNO];

static void fail(struct slot *s, int err) {
    failed_count++;
    if (err > 0 && err < MAX_ERRNO) errno_count[err]++;
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
}

static void start(struct slot *s, unsigned idx) {
    s->got = 0;
    s->sent = 0;
    s->started = now();
    started_count++;
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s->fd < 0) {
        fail(s, errno);
        return;
    }
    if (connect(s->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        fail(s, errno);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = idx};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT CONCURRENCY DURATION_S MAX_CONNECTIONS HELLO_FILE\n",
                argv[0]);
        return 2;
    }
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1) {
        fprintf(stderr, "bad host %s\n", argv[1]);
        return 2;
    }
    int conc = atoi(argv[3]);
    double duration = atof(argv[4]);
    long max_conn = atol(argv[5]);
    FILE *f = fopen(argv[6], "rb");
    if (!f) {
        perror(argv[6]);
        return 2;
    }
    hello = malloc(65536);
    hello_len = fread(hello, 1, 65536, f);
    fclose(f);
    if (conc < 1 || hello_len == 0) {
        fprintf(stderr, "need concurrency >= 1 and a non-empty hello\n");
        return 2;
    }

    ep = epoll_create1(0);
    struct slot *slots = calloc((size_t)conc, sizeof *slots);
    struct epoll_event *events = calloc((size_t)conc, sizeof *events);
    static char buf[65536];
    double t0 = now(), deadline = t0 + duration, last_scan = t0;
    for (int i = 0; i < conc; i++) {
        slots[i].fd = -1;
        start(&slots[i], (unsigned)i);
    }
    for (;;) {
        double t = now();
        int more = t < deadline && started_count < max_conn;
        int active = 0;
        if (t - last_scan > 0.1) { /* per-connection timeout */
            last_scan = t;
            for (int i = 0; i < conc; i++)
                if (slots[i].fd >= 0 && t - slots[i].started > CONN_TIMEOUT) {
                    timeouts++;
                    fail(&slots[i], 0);
                    if (more) start(&slots[i], (unsigned)i);
                }
        }
        for (int i = 0; i < conc; i++) {
            if (slots[i].fd < 0 && more) start(&slots[i], (unsigned)i);
            if (slots[i].fd >= 0) active++;
        }
        if (!active) break;
        int n = epoll_wait(ep, events, conc, 100);
        for (int e = 0; e < n; e++) {
            unsigned idx = events[e].data.u32;
            struct slot *s = &slots[idx];
            if (s->fd < 0) continue;
            if (!s->sent) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    fail(s, err);
                } else if (write(s->fd, hello, hello_len) != (ssize_t)hello_len) {
                    fail(s, errno);
                } else {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = idx};
                    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                    s->sent = 1;
                }
            } else if (events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                ssize_t r = read(s->fd, buf, sizeof buf);
                if (r > 0) {
                    s->got += (size_t)r;
                    if (s->got >= hello_len) {
                        ok_count++;
                        close(s->fd);
                        s->fd = -1;
                    }
                } else if (r == 0) {
                    short_echo++;
                    fail(s, 0);
                } else if (errno != EAGAIN && errno != EINTR) {
                    fail(s, errno);
                }
            }
            if (s->fd < 0 && now() < deadline && started_count < max_conn) start(s, idx);
        }
    }
    double elapsed = now() - t0;
    printf("{\"connections\": %ld, \"failed\": %ld, \"errors\": {", ok_count, failed_count);
    int first = 1;
    for (int i = 1; i < MAX_ERRNO; i++)
        if (errno_count[i]) {
            printf("%s\"%s\": %ld", first ? "" : ", ", strerrorname_np(i) ? strerrorname_np(i) : "?",
                   errno_count[i]);
            first = 0;
        }
    if (short_echo) printf("%s\"short_echo\": %ld", first ? "" : ", ", short_echo), first = 0;
    if (timeouts) printf("%s\"timeout\": %ld", first ? "" : ", ", timeouts), first = 0;
    printf("}, \"elapsed_s\": %.6f, \"conn_per_s\": %.3f, \"concurrency\": %d, "
           "\"hello_bytes\": %zu, \"client\": \"c\"}\n",
           elapsed, elapsed > 0 ? (double)ok_count / elapsed : 0.0, conc, hello_len);
    return 0;
}
