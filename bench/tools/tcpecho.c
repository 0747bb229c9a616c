/* tcpecho: epoll TCP echo server, the upstream of bench/'s short-connection and
 * idle cases. Written in C so that the upstream costs little CPU next to the
 * proxy under test (a Python echo server on the same core was the bottleneck,
 * which hid how fast the proxies really are). Single thread, level-triggered.
 *
 *   tcpecho PORT [HOST]      prints READY when listening; SIGTERM stops it.
 *
 * Built by bench/ctools.py with the system C compiler; bench/echo.py is the
 * fallback when there is none.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 512

/* Echo payloads are a few hundred bytes, so a write never stays partial on a
 * fresh socket; if one ever does, finish it blocking rather than keep per-socket
 * buffers: correctness over an edge case that the bench never hits. */
static int write_all(int fd, const char *buf, ssize_t len) {
    int blocking = 0;
    while (len > 0) {
        ssize_t n = write(fd, buf, (size_t)len);
        if (n > 0) {
            buf += n;
            len -= n;
        } else if (n < 0 && errno == EAGAIN && !blocking) {
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
            blocking = 1;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            return -1;
        }
    }
    if (blocking) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT [HOST]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    const char *host = argc > 2 ? argv[2] : "127.0.0.1";
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "bad host %s\n", host);
        return 2;
    }
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("READY\n");
    fflush(stdout);
    static struct epoll_event events[MAX_EVENTS];
    static char buf[65536];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break; /* EAGAIN, or EMFILE: retried on the next event */
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                if (write_all(fd, buf, r) < 0) close(fd);
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(fd); /* peer finished (or failed): close our side too */
            }
        }
    }
}
