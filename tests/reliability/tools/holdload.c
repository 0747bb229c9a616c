/* holdload: hold many relayed connections with periodic echoes, plus a churn of short ones.
 *
 *   holdload HOST PORT HOLD HOLD_S ECHO_EVERY_S CHURN_PER_S CHURN_S HELLO_FILE
 *
 * Opens HOLD connections (each sends the bytes of HELLO_FILE, e.g. a TLS
 * ClientHello the edge routes by SNI, and waits for them to come back from the
 * echo upstream), prints "HELD n" on stdout once all are up, then holds them
 * HOLD_S seconds: every ECHO_EVERY_S seconds each one sends 16 bytes and must
 * get them back. Meanwhile (from the start) CHURN_PER_S short connections per
 * second: connect, hello, echo, close, for CHURN_S seconds. With HOLD = 0 it is
 * a paced short-connection generator (the reload case).
 *
 * Every failure is counted by kind (connect error, reset, early close, a reply
 * that differs, 10 s without the expected echo). Ends with one JSON line.
 * C and one epoll loop: 9,000 sockets with echoes cost a Python client more
 * CPU than the edge under test, on a 2-core machine.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REPLY_TIMEOUT 10.0
#define PING_LEN 16

enum { CONNECTING, HELLO_WAIT, IDLE, PING_WAIT, DONE };

struct conn {
    int fd;
    int state;
    int churn; /* 1: a short connection, closed after its hello echo */
    size_t want, got;
    double since; /* when the current wait started */
    double next_ping;
    double hello_rtt_max;
};

static struct sockaddr_in target;
static int ep;
static char *hello;
static size_t hello_len;
static char ping[PING_LEN];
static long n_connect_err, n_reset, n_early_close, n_mismatch, n_timeout;
static long held_up, pings_ok, churn_ok, churn_started;
static double worst_ping, worst_hello;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void fail(struct conn *c, long *counter) {
    (*counter)++;
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = DONE;
}

static int open_conn(struct conn *c, int churn) {
    memset(c, 0, sizeof *c);
    c->churn = churn;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) {
        n_connect_err++;
        c->state = DONE;
        return -1;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = CONNECTING;
    c->since = now();
    if (connect(c->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        fail(c, &n_connect_err);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

static void send_bytes(struct conn *c, const char *buf, size_t len, int next_state) {
    ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);
    if (n != (ssize_t)len) {
        fail(c, n < 0 && errno == ECONNRESET ? &n_reset : &n_early_close);
        return;
    }
    c->state = next_state;
    c->want = len;
    c->got = 0;
    c->since = now();
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void on_event(struct conn *c, uint32_t events) {
    if (c->state == DONE) return;
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            fail(c, &n_connect_err);
            return;
        }
        send_bytes(c, hello, hello_len, HELLO_WAIT);
        return;
    }
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP))) return;
    char buf[65536];
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n < 0) {
        if (errno == EAGAIN) return;
        fail(c, errno == ECONNRESET ? &n_reset : &n_early_close);
        return;
    }
    if (n == 0) {
        fail(c, &n_early_close);
        return;
    }
    if (c->state == IDLE) {
        fail(c, &n_mismatch); /* bytes nobody asked for */
        return;
    }
    const char *expect = c->state == HELLO_WAIT ? hello : ping;
    if (c->got + (size_t)n > c->want || memcmp(buf, expect + c->got, (size_t)n) != 0) {
        fail(c, &n_mismatch);
        return;
    }
    c->got += (size_t)n;
    if (c->got < c->want) return;
    double rtt = now() - c->since;
    if (c->state == HELLO_WAIT) {
        if (rtt > worst_hello) worst_hello = rtt;
        if (c->churn) {
            churn_ok++;
            close(c->fd);
            c->fd = -1;
            c->state = DONE;
            return;
        }
        held_up++;
    } else {
        pings_ok++;
        if (rtt > worst_ping) worst_ping = rtt;
    }
    c->state = IDLE;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s HOST PORT HOLD HOLD_S ECHO_EVERY_S CHURN_PER_S CHURN_S HELLO_FILE\n", argv[0]);
        return 2;
    }
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1) return 2;
    long hold = atol(argv[3]);
    double hold_s = atof(argv[4]), every = atof(argv[5]), churn_rate = atof(argv[6]), churn_s = atof(argv[7]);
    FILE *f = fopen(argv[8], "rb");
    if (!f) {
        perror(argv[8]);
        return 2;
    }
    hello = malloc(65536);
    hello_len = fread(hello, 1, 65536, f);
    fclose(f);
    memcpy(ping, "ping-0123456789\n", PING_LEN);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max; /* the hard limit (20,000 here): HOLD + churn in flight fit below it */
    setrlimit(RLIMIT_NOFILE, &rl);

    ep = epoll_create1(0);
    long churn_total = (long)(churn_rate * churn_s);
    struct conn *held = calloc((size_t)(hold ? hold : 1), sizeof *held);
    struct conn *churn = calloc((size_t)(churn_total ? churn_total : 1), sizeof *churn);
    double t0 = now(), hold_from = 0, hold_until = 0;
    long opened = 0;
    struct epoll_event evs[1024];
    int reported = 0;

    for (;;) {
        double t = now();
        /* ramp: open held connections a few hundred at a time, so the accept queue never overflows */
        long in_ramp = opened - held_up - n_connect_err - n_reset - n_early_close - n_mismatch - n_timeout;
        while (opened < hold && in_ramp < 256) {
            open_conn(&held[opened], 0);
            opened++;
            in_ramp++;
        }
        if (!reported && hold && opened == hold && in_ramp <= 0) {
            reported = 1;
            hold_from = t;
            hold_until = t + hold_s;
            for (long i = 0; i < hold; i++) held[i].next_ping = t + every * (double)(i % 1000) / 1000.0;
            printf("HELD %ld %.2f\n", held_up, t - t0);
            fflush(stdout);
        }
        /* churn, paced from the start */
        while (churn_started < churn_total && churn_started < (long)((t - t0) * churn_rate)) {
            open_conn(&churn[churn_started], 1);
            churn_started++;
        }
        if (reported) {
            for (long i = 0; i < hold; i++) {
                struct conn *c = &held[i];
                if (c->state == IDLE && t < hold_until && t >= c->next_ping) {
                    c->next_ping += every;
                    send_bytes(c, ping, PING_LEN, PING_WAIT);
                }
            }
        }
        /* no reply in time: a failure */
        for (long i = 0; i < opened; i++) {
            struct conn *c = &held[i];
            if ((c->state == CONNECTING || c->state == HELLO_WAIT || c->state == PING_WAIT) &&
                t - c->since > REPLY_TIMEOUT)
                fail(c, &n_timeout);
        }
        for (long i = 0; i < churn_started; i++) {
            struct conn *c = &churn[i];
            if (c->state != DONE && c->state != IDLE && t - c->since > REPLY_TIMEOUT) fail(c, &n_timeout);
        }
        int churn_busy = 0;
        for (long i = 0; i < churn_started && !churn_busy; i++) churn_busy = churn[i].state != DONE;
        int pings_busy = 0;
        for (long i = 0; i < hold && !pings_busy; i++)
            pings_busy = held[i].state == PING_WAIT || held[i].state == CONNECTING || held[i].state == HELLO_WAIT;
        int hold_done = hold == 0 || (reported && t >= hold_until && !pings_busy) || (t - t0 > hold_s + 120);
        if (hold_done && churn_started >= churn_total && !churn_busy) break;
        if (t - t0 > hold_s + churn_s + 180) break; /* a hard bound whatever happens */
        int n = epoll_wait(ep, evs, 1024, 5);
        for (int i = 0; i < n; i++) on_event((struct conn *)evs[i].data.ptr, evs[i].events);
    }
    long still_held = 0;
    for (long i = 0; i < hold; i++) {
        if (held[i].state == IDLE) still_held++;
        if (held[i].fd >= 0) close(held[i].fd);
    }
    printf("{\"held\": %ld, \"held_at_end\": %ld, \"hold_seconds\": %.1f, \"pings_ok\": %ld, "
           "\"churn_started\": %ld, \"churn_ok\": %ld, \"connect_errors\": %ld, \"resets\": %ld, "
           "\"early_closes\": %ld, \"mismatches\": %ld, \"timeouts\": %ld, \"worst_ping_ms\": %.1f, "
           "\"worst_hello_ms\": %.1f}\n",
           held_up, still_held, reported ? now() - hold_from : 0.0, pings_ok, churn_started, churn_ok,
           n_connect_err, n_reset, n_early_close, n_mismatch, n_timeout, worst_ping * 1e3, worst_hello * 1e3);
    return 0;
}
