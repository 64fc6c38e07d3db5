/* A fast echo backend for the gatewayd benchmark (bench/run.py compiles it).
 *
 *   echo_backend ws  PORT   answer one WebSocket upgrade (RFC 6455 4.2.2: 101 with
 *                           Sec-WebSocket-Accept), then echo every byte as is
 *   echo_backend tcp PORT   echo every byte from the start (the target of a tcp:// bridge)
 *
 * Echoing the client's bytes as is (masked frames included) is all a passthrough
 * proxy needs: it never looks at frames after the 101, and the load generator
 * knows what to expect back. One thread, epoll, non-blocking sockets, one buffer
 * per connection: a read is echoed before the next read (backpressure), so the
 * backend never holds more than one buffer per connection. It listens on
 * 127.0.0.1 only and prints "ready" once listening. SIGUSR1 prints its own CPU
 * time (so the bench can show that the backend is not the bottleneck).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define HEAD_MAX 8192

typedef struct conn {
    int fd;
    int upgraded;      /* ws mode: 101 sent */
    char *buf;         /* BUF bytes: pending echo (or the request head) */
    size_t len, off;   /* bytes in buf, bytes of them already written */
    int want_out;      /* registered for EPOLLOUT */
} conn;

static int ws_mode;
static int ep;
static volatile sig_atomic_t report;

static void on_usr1(int sig) { (void)sig; report = 1; }

static void drop(conn *c) {
    close(c->fd);
    free(c->buf);
    free(c);
}

static void set_events(conn *c, int out) {
    struct epoll_event ev = {.events = out ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    if (c->want_out != out) {
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = out;
    }
}

/* Write what is pending; returns -1 on error, 0 when all was written, 1 when blocked. */
static int flush(conn *c) {
    while (c->off < c->len) {
        ssize_t n = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) return 1;
            if (errno == EINTR) continue;
            return -1;
        }
        c->off += (size_t)n;
    }
    c->len = c->off = 0;
    return 0;
}

static const char GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* ws mode: the request head is in buf[0:len]; answer 101 (and keep what follows). */
static int answer_upgrade(conn *c) {
    char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (!end) return c->len < HEAD_MAX ? 1 : -1;
    size_t head = (size_t)(end - c->buf) + 4;
    char key[128] = {0};
    for (char *line = c->buf; line < end;) {
        char *eol = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        if (!eol) break;
        if (eol - line > 18 && strncasecmp(line, "sec-websocket-key:", 18) == 0) {
            char *v = line + 18;
            while (*v == ' ') v++;
            size_t n = (size_t)(eol - v);
            if (n >= sizeof(key) - sizeof(GUID)) return -1;
            memcpy(key, v, n);
            memcpy(key + n, GUID, sizeof(GUID) - 1);
        }
        line = eol + 2;
    }
    if (!key[0]) return -1;
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1((unsigned char *)key, strlen(key), digest);
    char accept[64];
    EVP_EncodeBlock((unsigned char *)accept, digest, SHA_DIGEST_LENGTH);
    char answer[256];
    int n = snprintf(answer, sizeof answer,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", accept);
    /* The answer, then any bytes the client sent after its head (echoed). */
    size_t rest = c->len - head;
    memmove(c->buf + n, c->buf + head, rest);
    memcpy(c->buf, answer, (size_t)n);
    c->len = (size_t)n + rest;
    c->off = 0;
    c->upgraded = 1;
    return 0;
}

static void on_readable(conn *c) {
    for (;;) {
        size_t room = BUF - c->len;
        if (room == 0) break;
        ssize_t n = recv(c->fd, c->buf + c->len, room, 0);
        if (n == 0) { drop(c); return; }
        if (n < 0) {
            if (errno == EAGAIN) break;
            if (errno == EINTR) continue;
            drop(c);
            return;
        }
        c->len += (size_t)n;
        if (!c->upgraded) {
            int r = answer_upgrade(c);
            if (r < 0) { drop(c); return; }
            if (r > 0) continue;
        }
        int r = flush(c);
        if (r < 0) { drop(c); return; }
        if (r > 0) { set_events(c, 1); return; }
    }
}

static void on_writable(conn *c) {
    int r = flush(c);
    if (r < 0) { drop(c); return; }
    if (r == 0) {
        set_events(c, 0);
        on_readable(c);
    }
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "ws") && strcmp(argv[1], "tcp"))) {
        fprintf(stderr, "usage: %s ws|tcp PORT\n", argv[0]);
        return 2;
    }
    ws_mode = strcmp(argv[1], "ws") == 0;
    signal(SIGPIPE, SIG_IGN);
    signal(SIGUSR1, on_usr1);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 65535)) {
        perror("echo_backend: bind/listen");
        return 1;
    }
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (report) {
            report = 0;
            struct rusage ru;
            getrusage(RUSAGE_SELF, &ru);
            printf("cpu %.6f\n", ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                                   ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
            fflush(stdout);
        }
        for (int i = 0; i < n; i++) {
            conn *c = events[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    nc->upgraded = !ws_mode;
                    nc->buf = malloc(BUF);
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
            } else if (events[i].events & EPOLLOUT) {
                on_writable(c);
            } else {
                on_readable(c);
            }
        }
    }
}
