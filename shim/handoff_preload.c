/*
 * libedgeward_handoff.so: lets an unmodified server (nginx, prosody...) take connections that
 * edgeward hands over (docs/handoff-protocol.md), by LD_PRELOAD.
 *
 *   EDGEWARD_HANDOFF="127.0.0.1:8443=/run/nginx/handoff.sock[,ADDR=PATH...]" \
 *   LD_PRELOAD=/path/to/libedgeward_handoff.so nginx
 *
 * bind() of a TCP socket to a listed ADDR binds nothing on the network: the socket becomes a
 * Unix stream socket listening at PATH (same descriptor number, same O_NONBLOCK/FD_CLOEXEC), the
 * handoff endpoint edgeward connects to. The server's event loop watches it as its listening
 * socket; its accept()/accept4() on it then takes one handoff: reads the record and the client
 * socket, acknowledges, and returns the client socket with the client's address (from the
 * record: also right behind a trusted PROXY header) as accept() would. A bad or refused handoff
 * answers EAGAIN, as an accept with nothing pending does. Everything else passes through.
 *
 * The environment is read once when the library is loaded, so servers that clear the
 * environment of their worker processes (nginx) keep the setting across fork().
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_MAPS 16
#define MAX_RECORD 4096
#define RECORD_WAIT_MS 1000 /* the edge sends the record right after connecting */

struct map {
    struct sockaddr_storage addr; /* the TCP address the server binds */
    socklen_t addrlen;
    char path[108];               /* the Unix socket it becomes */
    int fd;                       /* the descriptor, once bound (-1 before) */
};

static struct map maps[MAX_MAPS];
static int nmaps;
static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);

static void note(const char *msg) {
    /* stderr is the server's error log or terminal; one short line per problem */
    char line[256];
    int n = snprintf(line, sizeof line, "edgeward-handoff: %s\n", msg);
    if (n > 0) {
        ssize_t w = write(2, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1));
        (void)w;
    }
}

static int parse_addr(const char *text, size_t len, struct sockaddr_storage *out, socklen_t *outlen) {
    char host[64];
    const char *colon = NULL;
    if (len == 0 || len >= sizeof host + 8)
        return -1;
    for (size_t i = len; i > 0; i--)
        if (text[i - 1] == ':') { colon = text + i - 1; break; }
    if (colon == NULL)
        return -1;
    size_t hlen = (size_t)(colon - text);
    long port = strtol(colon + 1, NULL, 10);
    if (port <= 0 || port > 65535)
        return -1;
    if (hlen >= 2 && text[0] == '[' && text[hlen - 1] == ']') {
        text++;
        hlen -= 2;
    }
    if (hlen == 0 || hlen >= sizeof host)
        return -1;
    memcpy(host, text, hlen);
    host[hlen] = '\0';
    memset(out, 0, sizeof *out);
    struct sockaddr_in *in4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *outlen = sizeof *in4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *outlen = sizeof *in6;
        return 0;
    }
    return -1;
}

__attribute__((constructor)) static void setup(void) {
    real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    real_accept4 = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    const char *spec = getenv("EDGEWARD_HANDOFF");
    if (spec == NULL)
        return;
    while (*spec && nmaps < MAX_MAPS) {
        const char *end = strchr(spec, ',');
        size_t len = end ? (size_t)(end - spec) : strlen(spec);
        const char *eq = memchr(spec, '=', len);
        struct map *m = &maps[nmaps];
        size_t plen = eq ? len - (size_t)(eq - spec) - 1 : 0;
        if (eq == NULL || plen == 0 || plen >= sizeof m->path || eq[1] != '/' ||
            parse_addr(spec, (size_t)(eq - spec), &m->addr, &m->addrlen) != 0) {
            note("ignoring a malformed EDGEWARD_HANDOFF entry (write ADDR:PORT=/absolute/path)");
        } else {
            memcpy(m->path, eq + 1, plen);
            m->path[plen] = '\0';
            m->fd = -1;
            nmaps++;
        }
        if (end == NULL)
            break;
        spec = end + 1;
    }
}

static struct map *map_for_addr(const struct sockaddr *sa, socklen_t len) {
    for (int i = 0; i < nmaps; i++) {
        const struct sockaddr_storage *a = &maps[i].addr;
        if (sa->sa_family != a->ss_family)
            continue;
        if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
            const struct sockaddr_in *x = (const struct sockaddr_in *)sa, *y = (const struct sockaddr_in *)a;
            if (x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr)
                return &maps[i];
        } else if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
            const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)sa, *y = (const struct sockaddr_in6 *)a;
            if (x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, 16) == 0)
                return &maps[i];
        }
    }
    return NULL;
}

int bind(int fd, const struct sockaddr *sa, socklen_t len) {
    struct map *m = (nmaps && sa != NULL) ? map_for_addr(sa, len) : NULL;
    if (m == NULL)
        return real_bind(fd, sa, len);
    int u = socket(AF_UNIX, SOCK_STREAM, 0);
    if (u < 0)
        return -1;
    struct sockaddr_un un;
    memset(&un, 0, sizeof un);
    un.sun_family = AF_UNIX;
    memcpy(un.sun_path, m->path, strlen(m->path) + 1);
    struct stat st;
    if (lstat(m->path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(m->path); /* a stale endpoint of an earlier run */
    int flags = fcntl(fd, F_GETFL), fdflags = fcntl(fd, F_GETFD);
    if (real_bind(u, (struct sockaddr *)&un, sizeof un) != 0 || dup2(u, fd) < 0) {
        int e = errno;
        close(u);
        errno = e;
        return -1;
    }
    close(u);
    if (flags >= 0)
        fcntl(fd, F_SETFL, flags);
    if (fdflags >= 0)
        fcntl(fd, F_SETFD, fdflags);
    chmod(m->path, 0660);
    m->fd = fd;
    return 0;
}

static struct map *map_for_fd(int fd) {
    for (int i = 0; i < nmaps; i++) {
        if (maps[i].fd != fd)
            continue;
        /* The descriptor number may have been closed and reused: check it is still our socket. */
        struct sockaddr_un un;
        socklen_t len = sizeof un;
        if (getsockname(fd, (struct sockaddr *)&un, &len) == 0 && un.sun_family == AF_UNIX &&
            strncmp(un.sun_path, maps[i].path, sizeof un.sun_path) == 0)
            return &maps[i];
    }
    return NULL;
}

static uint16_t u16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* The client address of a complete record, as a sockaddr; -1 for a malformed record. */
static int record_client(const unsigned char *buf, size_t n, struct sockaddr_storage *out, socklen_t *outlen) {
    if (n < 8 || memcmp(buf, "EWHO", 4) != 0 || buf[4] != 1 || (buf[5] & ~1u) != 0)
        return -1;
    size_t end = 8 + (size_t)u16(buf + 6);
    if (end != n)
        return -1;
    int have_service = 0, have_client = 0;
    memset(out, 0, sizeof *out);
    for (size_t pos = 8; pos < end;) {
        if (pos + 3 > end)
            return -1;
        unsigned type = buf[pos];
        size_t vlen = u16(buf + pos + 1);
        const unsigned char *v = buf + pos + 3;
        pos += 3 + vlen;
        if (pos > end)
            return -1;
        if (type == 1) {
            have_service = vlen > 0;
        } else if (type == 2) {
            struct sockaddr_in *in4 = (struct sockaddr_in *)out;
            struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)out;
            if (vlen == 6) {
                in4->sin_family = AF_INET;
                memcpy(&in4->sin_addr, v, 4);
                memcpy(&in4->sin_port, v + 4, 2);
                *outlen = sizeof *in4;
            } else if (vlen == 18) {
                in6->sin6_family = AF_INET6;
                memcpy(&in6->sin6_addr, v, 16);
                memcpy(&in6->sin6_port, v + 16, 2);
                *outlen = sizeof *in6;
            } else {
                return -1;
            }
            have_client = 1;
        }
    }
    return have_service && have_client ? 0 : -1;
}

/* One handoff from a fresh control connection: the client socket, or -1. */
static int take_handoff(int ctl, struct sockaddr_storage *client, socklen_t *clientlen) {
    unsigned char buf[MAX_RECORD];
    size_t have = 0;
    int fd = -1;
    for (;;) {
        struct pollfd p = {ctl, POLLIN, 0};
        if (poll(&p, 1, RECORD_WAIT_MS) != 1)
            goto bad;
        char cbuf[CMSG_SPACE(4 * sizeof(int))];
        struct iovec iov = {buf + have, sizeof buf - have};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf;
        msg.msg_controllen = sizeof cbuf;
        ssize_t n = recvmsg(ctl, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n <= 0 || (msg.msg_flags & MSG_CTRUNC))
            goto bad;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *fds = (int *)CMSG_DATA(c);
            for (size_t i = 0; i < k; i++) {
                if (fd < 0) {
                    fd = fds[i];
                } else {
                    close(fds[i]);
                    goto bad; /* exactly one descriptor */
                }
            }
        }
        have += (size_t)n;
        if (have >= 8 && memcmp(buf, "EWHO", 4) == 0 && have >= 8 + (size_t)u16(buf + 6))
            break;
        if (have >= sizeof buf || (have >= 4 && memcmp(buf, "EWHO", 4) != 0))
            goto bad;
    }
    int type = 0, domain = 0;
    socklen_t ol = sizeof type;
    if (fd < 0 || record_client(buf, have, client, clientlen) != 0 ||
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &ol) != 0 || type != SOCK_STREAM ||
        (ol = sizeof domain, getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &ol)) != 0 ||
        (domain != AF_INET && domain != AF_INET6))
        goto bad;
    /* Committed only if the acknowledgement goes out: else the edge gave up and serves it itself. */
    if (send(ctl, "\0", 1, MSG_NOSIGNAL) != 1) {
        close(fd);
        return -1;
    }
    return fd;
bad:
    if (fd >= 0)
        close(fd);
    send(ctl, "\3", 1, MSG_NOSIGNAL | MSG_DONTWAIT); /* bad record */
    note("a handoff was not taken (bad record or descriptor, or no record in time)");
    return -1;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags) {
    struct map *m = nmaps ? map_for_fd(fd) : NULL;
    if (m == NULL)
        return real_accept4(fd, addr, addrlen, flags);
    int ctl = real_accept4(fd, NULL, NULL, SOCK_CLOEXEC);
    if (ctl < 0)
        return -1;
    struct sockaddr_storage client;
    socklen_t clientlen = 0;
    int c = take_handoff(ctl, &client, &clientlen);
    close(ctl);
    if (c < 0) {
        errno = EAGAIN; /* like an accept with nothing pending: servers just wait for the next */
        return -1;
    }
    /* The received socket shares its flags with the edge's copy: set what the caller asked for. */
    int fl = fcntl(c, F_GETFL);
    if (fl >= 0)
        fcntl(c, F_SETFL, (flags & SOCK_NONBLOCK) ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
    fcntl(c, F_SETFD, (flags & SOCK_CLOEXEC) ? FD_CLOEXEC : 0);
    if (addr != NULL && addrlen != NULL) {
        socklen_t n = *addrlen < clientlen ? *addrlen : clientlen;
        memcpy(addr, &client, n);
        *addrlen = clientlen;
    }
    return c;
}

int accept(int fd, struct sockaddr *addr, socklen_t *addrlen) {
    return accept4(fd, addr, addrlen, 0);
}
