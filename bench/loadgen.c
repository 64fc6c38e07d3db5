/* Load generator for the gatewayd benchmark (bench/run.py compiles and drives it).
 *
 *   loadgen MODE PORT [options]       one JSON line of results on stdout
 *
 * Modes (every connection: TCP, full TLS 1.3 handshake with SNI, WebSocket upgrade,
 * "101" awaited, then):
 *   handshake  close at once (close_notify) and start over; -c in flight
 *   echo       ping-pong: one masked 64-byte message, wait for its echo, again (-c conns)
 *   latency    open loop: -r messages/s in total, round robin over -c connections;
 *              latency from the scheduled send time to the end of the echo
 *   bulk       -c connections each send -s bytes as one message and wait for its echo
 *   hold       open -n connections, exchange one message on each, print "held N",
 *              keep them open until stdin closes (gives up opening after -d seconds)
 * -d seconds of measurement after -w seconds of warm-up (not counted).
 * -b: the server answers with its own WebSocket frames (a tcp:// bridge); otherwise it
 *     echoes our bytes as is (a passthrough proxy in front of echo_backend ws).
 *
 * One thread, epoll, non-blocking OpenSSL (no session resumption: every handshake is
 * full; peer verification off, the handshake's signature check stays). The result
 * includes our own CPU time, to show the generator is not the bottleneck.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { HANDSHAKE, ECHO, LATENCY, BULK, HOLD };
enum state { CONNECTING, TLS, UPGRADE_SEND, UPGRADE_READ, OPEN, IDLE };

typedef struct conn {
    int fd;
    SSL *ssl;
    enum state st;
    int index;
    /* output: out[0:out_len], out_off written */
    const unsigned char *out;
    size_t out_len, out_off;
    /* input accounting */
    char head[4096];
    size_t head_len;
    size_t expect;      /* bytes (raw mode) or payload bytes (bridge mode) still to come */
    int busy;           /* a message is in flight */
    double sent_at;     /* scheduled send time (latency mode) */
    /* bridge-mode frame parser */
    unsigned char fh[14];
    size_t fh_len, fh_need;
    uint64_t frame_left;
    int events;
} conn;

static enum mode mode;
static int bridge;
static int port;
static int concurrency = 64;
static int total_conns = 5000;
static double duration = 5, warmup = 1, rate = 2000;
static size_t size = 64;
static SSL_CTX *ctx;
static int ep;
static conn **conns;
static int nconns;
static unsigned char *message;   /* the masked frame we send */
static size_t message_len;
static size_t reply_len;         /* raw mode: bytes that come back per message */
static double t_start, t_measure, t_end;
static long long done_count, errors, opened;
static double *lat;
static size_t nlat, cap_lat;
static char upgrade[512];
static size_t upgrade_len;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void build_message(void) {
    static const unsigned char mask[4] = {0x37, 0xfa, 0x21, 0x3d};
    size_t h = size < 126 ? 2 : size < 65536 ? 4 : 10;
    message_len = h + 4 + size;
    message = malloc(message_len);
    message[0] = 0x82; /* FIN, binary */
    if (h == 2) {
        message[1] = 0x80 | (unsigned char)size;
    } else if (h == 4) {
        message[1] = 0x80 | 126;
        message[2] = (unsigned char)(size >> 8);
        message[3] = (unsigned char)size;
    } else {
        message[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++) message[2 + i] = (unsigned char)((uint64_t)size >> (56 - 8 * i));
    }
    memcpy(message + h, mask, 4);
    for (size_t i = 0; i < size; i++) message[h + 4 + i] = (unsigned char)('a' + i % 26) ^ mask[i % 4];
    reply_len = message_len;
    upgrade_len = (size_t)snprintf(upgrade, sizeof upgrade,
        "GET /echo HTTP/1.1\r\nHost: bench.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
        bridge ? "Sec-WebSocket-Protocol: binary\r\n" : "");
}

static void want(conn *c, int events) {
    if (c->events == events) return;
    struct epoll_event ev = {.events = (uint32_t)events, .data.ptr = c};
    epoll_ctl(ep, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev);
    c->events = events;
}

static void start(conn *c);
#define restart(c, failed) restart_at((c), (failed), __LINE__)

static void finish(conn *c, int failed) {
    if (failed) errors++;
    if (c->ssl) {
        if (!failed && c->st >= OPEN) SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    close(c->fd);
    c->fd = -1;
    c->events = 0;
}

static int debug_left = -1;

static void restart_at(conn *c, int failed, int line) {
    if (failed && debug_left > 0) {
        debug_left--;
        fprintf(stderr, "loadgen: connection %d failed in state %d (line %d, errno %d: %s)\n",
                c->index, c->st, line, errno, strerror(errno));
        ERR_print_errors_fp(stderr);
    }
    finish(c, failed);
    if (now() < t_end) start(c);
}

static void start(conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->st = CONNECTING;
    c->head_len = 0;
    c->busy = 0;
    c->out = NULL;
    c->out_len = c->out_off = 0;
    c->fh_len = 0;
    c->fh_need = 2;
    c->frame_left = 0;
    c->events = 0;
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) && errno != EINPROGRESS) {
        if (debug_left > 0) { debug_left--; fprintf(stderr, "loadgen: connect: %s\n", strerror(errno)); }
        errors++;
        close(c->fd);
        c->fd = -1;
        return;
    }
    want(c, EPOLLOUT);
}

static void send_message(conn *c, double at) {
    c->out = message;
    c->out_len = message_len;
    c->out_off = 0;
    c->busy = 1;
    c->sent_at = at;
    c->expect = bridge ? size : reply_len;
}

/* Count what arrived for the message in flight; returns 1 when it is complete. */
static int consume(conn *c, const unsigned char *p, size_t n) {
    if (!bridge) {
        if (n > c->expect) return -1;
        c->expect -= n;
        return c->expect == 0;
    }
    while (n) {
        if (c->frame_left == 0 && c->fh_len < c->fh_need) {
            c->fh[c->fh_len++] = *p++;
            n--;
            if (c->fh_len == 2) {
                unsigned l = c->fh[1] & 0x7f;
                c->fh_need = 2 + (l == 126 ? 2 : l == 127 ? 8 : 0) + ((c->fh[1] & 0x80) ? 4 : 0);
            }
            if (c->fh_len == c->fh_need) {
                unsigned l = c->fh[1] & 0x7f;
                uint64_t len = l;
                if (l == 126) len = (uint64_t)c->fh[2] << 8 | c->fh[3];
                if (l == 127) { len = 0; for (int i = 0; i < 8; i++) len = len << 8 | c->fh[2 + i]; }
                int opcode = c->fh[0] & 0x0f;
                if (opcode >= 8) return -1; /* a close or ping from the bridge: not expected */
                c->frame_left = len;
                c->fh_len = 0;
                c->fh_need = 2;
                if (len == 0) continue;
            }
            continue;
        }
        size_t take = n < c->frame_left ? n : (size_t)c->frame_left;
        c->frame_left -= take;
        if (take > c->expect) return -1;
        c->expect -= take;
        p += take;
        n -= take;
    }
    return c->expect == 0;
}

static void record_latency(double v) {
    if (nlat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 65536;
        lat = realloc(lat, cap_lat * sizeof *lat);
    }
    lat[nlat++] = v;
}

static void message_done(conn *c) {
    double t = now();
    c->busy = 0;
    if (t >= t_measure && t < t_end) {
        done_count++;
        if (mode == LATENCY) record_latency(t - c->sent_at);
    }
    if (mode == ECHO || mode == BULK) {
        if (t < t_end) send_message(c, t);
    } else if (mode == HOLD) {
        c->st = IDLE;
    }
}

static void opened_conn(conn *c) {
    double t = now();
    opened++;
    if (mode == HANDSHAKE) {
        if (t >= t_measure && t < t_end) done_count++;
        c->st = OPEN; /* so that close_notify is sent */
        restart(c, 0);
        return;
    }
    c->st = OPEN;
    if (mode == ECHO || mode == BULK || mode == HOLD) send_message(c, t);
}

static void step(conn *c);

static void on_event(conn *c) {
    if (c->st == CONNECTING) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) { restart(c, 1); return; }
        c->ssl = SSL_new(ctx);
        SSL_set_fd(c->ssl, c->fd);
        SSL_set_tlsext_host_name(c->ssl, "bench.test");
        SSL_set_connect_state(c->ssl);
        c->st = TLS;
    }
    step(c);
}

static void step(conn *c) {
    unsigned char buf[65536];
    for (;;) {
        if (c->st == TLS) {
            int r = SSL_do_handshake(c->ssl);
            if (r == 1) {
                c->st = UPGRADE_SEND;
                c->out = (const unsigned char *)upgrade;
                c->out_len = upgrade_len;
                c->out_off = 0;
                continue;
            }
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_READ) { want(c, EPOLLIN); return; }
            if (e == SSL_ERROR_WANT_WRITE) { want(c, EPOLLOUT); return; }
            restart(c, 1);
            return;
        }
        int progressed = 0;
        /* write what is pending */
        while (c->out_off < c->out_len) {
            size_t chunk = c->out_len - c->out_off;
            if (chunk > 65536) chunk = 65536;
            int r = SSL_write(c->ssl, c->out + c->out_off, (int)chunk);
            if (r > 0) { c->out_off += (size_t)r; progressed = 1; continue; }
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) break;
            restart(c, 1);
            return;
        }
        if (c->st == UPGRADE_SEND && c->out_off == c->out_len) c->st = UPGRADE_READ;
        /* read what is there */
        int r = SSL_read(c->ssl, buf, sizeof buf);
        if (r > 0) {
            progressed = 1;
            if (c->st == UPGRADE_READ) {
                size_t n = (size_t)r;
                if (c->head_len + n > sizeof c->head) { restart(c, 1); return; }
                memcpy(c->head + c->head_len, buf, n);
                c->head_len += n;
                char *end = memmem(c->head, c->head_len, "\r\n\r\n", 4);
                if (end) {
                    if (c->head_len < 12 || memcmp(c->head + 9, "101", 3) != 0) {
                        restart(c, 1);
                        return;
                    }
                    opened_conn(c);
                    if (c->fd < 0 || c->st != OPEN) return; /* restarted (handshake mode) */
                }
            } else if (c->st == OPEN || c->st == IDLE) {
                if (!c->busy) { restart(c, 1); return; }
                int done = consume(c, buf, (size_t)r);
                if (done < 0) { restart(c, 1); return; }
                if (done) message_done(c);
            }
        } else {
            int e = SSL_get_error(c->ssl, r);
            if (e == SSL_ERROR_ZERO_RETURN || (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)) {
                restart(c, 1);
                return;
            }
        }
        if (!progressed) break;
    }
    want(c, EPOLLIN | (c->out_off < c->out_len ? EPOLLOUT : 0));
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s handshake|echo|latency|bulk|hold PORT [-c N] [-n N] [-d S] [-w S] [-r R] [-s BYTES] [-b]\n", argv[0]);
        return 2;
    }
    const char *m = argv[1];
    mode = !strcmp(m, "handshake") ? HANDSHAKE : !strcmp(m, "echo") ? ECHO : !strcmp(m, "latency") ? LATENCY
         : !strcmp(m, "bulk") ? BULK : HOLD;
    port = atoi(argv[2]);
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "-b")) { bridge = 1; continue; }
        if (i + 1 >= argc) return 2;
        const char *v = argv[++i];
        switch (argv[i - 1][1]) {
        case 'c': concurrency = atoi(v); break;
        case 'n': total_conns = atoi(v); break;
        case 'd': duration = atof(v); break;
        case 'w': warmup = atof(v); break;
        case 'r': rate = atof(v); break;
        case 's': size = (size_t)atoll(v); break;
        default: return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    debug_left = getenv("LOADGEN_DEBUG") ? 10 : 0;
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
    build_message();
    ep = epoll_create1(0);
    nconns = mode == HOLD ? total_conns : concurrency;
    conns = calloc((size_t)nconns, sizeof *conns);
    t_start = now();
    t_measure = t_start + warmup;
    t_end = mode == HOLD ? 1e18 : t_measure + duration;
    /* hold: open at most `concurrency` at a time */
    int next = 0;
    int in_flight_limit = mode == HOLD ? concurrency : nconns;
    for (; next < nconns && next < in_flight_limit; next++) {
        conns[next] = calloc(1, sizeof(conn));
        conns[next]->index = next;
        start(conns[next]);
    }
    double cpu0 = 0, cpu_mark = -1;
    int rr = 0;
    double next_send = t_measure - warmup / 2;
    int held_reported = 0;
    struct epoll_event events[512];
    for (;;) {
        double t = now();
        if (cpu_mark < 0 && t >= t_measure) { cpu0 = cpu_seconds(); cpu_mark = t; }
        if (t >= t_end) break;
        /* latency mode: send on schedule */
        if (mode == LATENCY) {
            while (next_send <= t) {
                for (int k = 0; k < nconns; k++) {
                    conn *c = conns[(rr + k) % nconns];
                    if (c->fd >= 0 && c->st == OPEN && !c->busy) {
                        send_message(c, next_send);
                        step(c);
                        rr = (rr + k + 1) % nconns;
                        break;
                    }
                }
                next_send += 1.0 / rate;
            }
        }
        if (mode == HOLD) {
            int idle = 0;
            for (int i = 0; i < next; i++) idle += conns[i]->fd >= 0 && conns[i]->st == IDLE;
            /* keep `concurrency` connections opening until all are held */
            while (next < nconns && next - idle < in_flight_limit) {
                conns[next] = calloc(1, sizeof(conn));
                conns[next]->index = next;
                start(conns[next]);
                next++;
            }
            /* bounded: after -d seconds report what is held, even if not all */
            if ((idle == nconns || t >= t_start + duration) && !held_reported) {
                printf("held %d\n", idle);
                fflush(stdout);
                held_reported = 1;
            }
            if (held_reported) {
                struct pollfd p = {.fd = 0, .events = POLLIN};
                if (poll(&p, 1, 0) > 0) break;
            }
        }
        double wait = 0.05;
        if (mode == LATENCY && next_send - t < wait) wait = next_send - t;
        if (wait < 0) wait = 0;
        struct timespec ts = {.tv_sec = (time_t)wait, .tv_nsec = (long)((wait - (time_t)wait) * 1e9)};
        int n = epoll_pwait2(ep, events, 512, &ts, NULL);
        for (int i = 0; i < n; i++) {
            conn *c = events[i].data.ptr;
            if (c->fd >= 0) on_event(c);
        }
        /* connections that failed to start: retry */
        if (mode != HOLD && t < t_end)
            for (int i = 0; i < nconns; i++)
                if (conns[i]->fd < 0) start(conns[i]);
    }
    double elapsed = now() - (cpu_mark > 0 ? cpu_mark : t_measure);
    double cpu = cpu_seconds() - cpu0;
    double p50 = 0, p99 = 0, p999 = 0;
    if (nlat) {
        qsort(lat, nlat, sizeof *lat, cmp);
        p50 = lat[nlat / 2];
        p99 = lat[(size_t)(nlat * 0.99)];
        p999 = lat[(size_t)(nlat * 0.999)];
    }
    printf("{\"mode\":\"%s\",\"count\":%lld,\"seconds\":%.3f,\"rate\":%.1f,\"bytes_per_s\":%.1f,"
           "\"errors\":%lld,\"opened\":%lld,\"cpu\":%.3f,\"p50_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f}\n",
           m, done_count, elapsed, done_count / elapsed, done_count * (double)size / elapsed, errors, opened,
           cpu / elapsed, p50 * 1e6, p99 * 1e6, p999 * 1e6);
    return 0;
}
