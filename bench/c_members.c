/*
 * The members side of the fan-out benchmarks, in C.
 *
 * With picows the members process still runs a Python callback, two regex
 * searches and a counter update per delivery: about 9 us, so it fills its
 * core near 100-120k deliveries/s, which is where the servers being compared
 * were.  Here a delivery is a frame header, two memmem() calls and a strtod:
 * well under a microsecond, so the servers' limits show instead of ours.
 *
 * It speaks the same line protocol with bench/cross_instance.py as
 * fast_generator.py's members (events as JSON lines on stdout, commands on
 * stdin) and reports the same result fields.  Plain epoll, one thread.
 *
 *   cc -O2 -o c_members c_members.c -lm
 *   c_members members SPEC_JSON        (started by cross_instance.py)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WARMUP 2.0
#define DRAIN_IDLE 3.0
#define CONNECT_CONCURRENCY 200
#define READ_CHUNK 65536

enum state { IDLE, CONNECTING, HANDSHAKE, JOINING, OPEN, CLOSED };

struct conn {
    int fd;
    enum state state;
    int room;
    int index;
    long long last_id; /* -1: none yet */
    char *buf;
    size_t len, cap;
};

enum phase { SETUP, WARMUP_PHASE, MEASURE, DRAIN, DONE };
static const char *phase_names[] = {"setup", "warmup", "measure", "drain", "done"};

static struct {
    enum phase phase;
    double t0, window_start, window_end;
    long long received, arrivals, arrivals_in_window, duplicates, gaps;
    double *latency;
    size_t nlat, caplat;
    long long *timeline;
    size_t ntimeline;
    long long closed_member;
    char err_code[16][64];
    long long err_count[16];
    int nerr;
} st;

static double now_wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_now(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void emit(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static void fail(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *p = msg; *p; p++)
        if (*p == '"' || *p == '\\') *p = '\'';
    emit("{\"event\": \"result\", \"role\": \"members\", \"error\": \"%s\"}", msg);
    exit(1);
}

static double spec_number(const char *spec, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(spec, pat);
    if (!p) fail("members: spec has no %s", key);
    return strtod(p + strlen(pat), NULL);
}

static void count_error(const char *code, size_t n) {
    if (n >= 63) n = 63;
    for (int i = 0; i < st.nerr; i++)
        if (strlen(st.err_code[i]) == n && !memcmp(st.err_code[i], code, n)) {
            st.err_count[i]++;
            return;
        }
    if (st.nerr == 16) return;
    memcpy(st.err_code[st.nerr], code, n);
    st.err_code[st.nerr][n] = 0;
    for (char *p = st.err_code[st.nerr]; *p; p++)
        if (*p == '"' || *p == '\\') *p = '\'';
    st.err_count[st.nerr++] = 1;
}

/* What fast_generator.py's Stats.delivered does, for one delivery. */
static void delivered(struct conn *c, long long mid, double now, int has_sent, double sent_at) {
    st.arrivals++;
    if (st.window_start <= now && now < st.window_end) st.arrivals_in_window++;
    size_t second = st.t0 > 0 ? (size_t)(now - st.t0) : 0;
    if (second >= st.ntimeline) {
        st.timeline = realloc(st.timeline, (second + 1) * sizeof *st.timeline);
        memset(st.timeline + st.ntimeline, 0, (second + 1 - st.ntimeline) * sizeof *st.timeline);
        st.ntimeline = second + 1;
    }
    st.timeline[second]++;
    if (c->last_id >= 0) {
        if (mid <= c->last_id) {
            st.duplicates++;
            return;
        }
        if (mid != c->last_id + 1) st.gaps += mid - c->last_id - 1;
    }
    if (has_sent) {
        st.received++;
        if (st.nlat == st.caplat) {
            st.caplat = st.caplat ? st.caplat * 2 : 1 << 20;
            st.latency = realloc(st.latency, st.caplat * sizeof *st.latency);
        }
        st.latency[st.nlat++] = now - sent_at;
    }
    c->last_id = mid;
}

static const char *find(const char *hay, size_t n, const char *needle) {
    return memmem(hay, n, needle, strlen(needle));
}

static int connected_joined, to_connect_next;

static void text_frame(struct conn *c, const char *p, size_t n, double now) {
    static const char message_prefix[] = "{\"type\":\"message\"";
    if (n >= sizeof message_prefix - 1 && !memcmp(p, message_prefix, sizeof message_prefix - 1)) {
        const char *id = find(p, n, "\"id\":");
        if (!id) {
            count_error("bad message frame", 17);
            return;
        }
        long long mid = strtoll(id + 5, NULL, 10);
        const char *body = find(p, n, "\"body\":\"");
        int has_sent = 0;
        double sent_at = 0;
        if (body) {
            char *end;
            sent_at = strtod(body + 8, &end);
            has_sent = end[0] == '|' && end[1] == '1' && end[2] == '|';
        }
        delivered(c, mid, now, has_sent, sent_at);
        return;
    }
    const char *type = find(p, n, "\"type\":");
    if (!type) return;
    const char *t = type + 7;
    while (*t == ' ') t++;
    if (!strncmp(t, "\"joined\"", 8)) {
        const char *last = find(p, n, "\"last_id\":");
        long long lid = 0;
        if (last) lid = strtoll(last + 10, NULL, 10); /* null parses as 0 */
        c->last_id = lid;
        if (c->state == JOINING) {
            c->state = OPEN;
            connected_joined++;
        }
    } else if (!strncmp(t, "\"error\"", 7)) {
        const char *code = find(p, n, "\"code\":");
        const char *cs = code ? code + 7 : "\"?\"";
        while (*cs == ' ') cs++;
        if (*cs == '"') cs++;
        const char *ce = cs;
        while (ce < p + n && *ce != '"' && *ce != ',' && *ce != '}') ce++;
        count_error(cs, ce - cs);
        if (c->state == JOINING) fail("members: join failed: %.*s", (int)(n > 200 ? 200 : n), p);
    }
}

static void send_all(struct conn *c, const void *data, size_t n) {
    /* Only small frames (join, pong, close) go this way, on an idle socket. */
    const char *p = data;
    while (n) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return;
        }
        p += w;
        n -= w;
    }
}

static void send_frame(struct conn *c, int opcode, const char *payload, size_t n) {
    unsigned char f[14 + 256];
    if (n > 256) n = 256;
    size_t h = 0;
    f[h++] = 0x80 | opcode;
    if (n < 126) {
        f[h++] = 0x80 | n;
    } else {
        f[h++] = 0x80 | 126;
        f[h++] = n >> 8;
        f[h++] = n & 0xff;
    }
    unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
    memcpy(f + h, mask, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) f[h + i] = payload[i] ^ mask[i & 3];
    send_all(c, f, h + n);
}

static void close_conn(struct conn *c, int epfd) {
    if (c->state == CLOSED) return;
    if (c->state != OPEN && st.phase != DONE) fail("members: closed before joining");
    if (c->state == OPEN && st.phase != DONE) st.closed_member++;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = CLOSED;
}

/* Parse whatever whole frames are buffered; keep the rest. */
static void frames(struct conn *c, int epfd) {
    double now = now_wall();
    size_t pos = 0;
    const unsigned char *b = (const unsigned char *)c->buf;
    while (c->len - pos >= 2) {
        const unsigned char *h = b + pos;
        int opcode = h[0] & 0x0f;
        int masked = h[1] & 0x80;
        uint64_t n = h[1] & 0x7f;
        size_t hl = 2;
        if (n == 126) {
            if (c->len - pos < 4) break;
            n = ((uint64_t)h[2] << 8) | h[3];
            hl = 4;
        } else if (n == 127) {
            if (c->len - pos < 10) break;
            n = 0;
            for (int i = 0; i < 8; i++) n = (n << 8) | h[2 + i];
            hl = 10;
        }
        if (masked) hl += 4;
        if (c->len - pos < hl + n) break;
        const char *payload = (const char *)h + hl;
        if (!(h[0] & 0x80) || opcode == 0) count_error("fragmented frame", 16);
        else if (opcode == 1) text_frame(c, payload, n, now);
        else if (opcode == 9) send_frame(c, 10, payload, n);
        else if (opcode == 8) {
            close_conn(c, epfd);
            return;
        }
        pos += hl + n;
    }
    memmove(c->buf, c->buf + pos, c->len - pos);
    c->len -= pos;
}

static void readable(struct conn *c, int epfd) {
    for (;;) {
        if (c->cap - c->len < READ_CHUNK / 4) {
            c->cap = c->cap ? c->cap * 2 : READ_CHUNK;
            c->buf = realloc(c->buf, c->cap);
        }
        size_t space = c->cap - c->len;
        ssize_t r = recv(c->fd, c->buf + c->len, space, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return;
            close_conn(c, epfd);
            return;
        }
        if (r == 0) {
            close_conn(c, epfd);
            return;
        }
        c->len += r;
        if (c->state == HANDSHAKE) {
            char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
            if (!end) continue;
            if (c->len < 12 || memcmp(c->buf + 9, "101", 3))
                fail("members: handshake refused: %.*s", (int)(c->len > 120 ? 120 : c->len),
                     c->buf);
            size_t hl = end + 4 - c->buf;
            memmove(c->buf, c->buf + hl, c->len - hl);
            c->len -= hl;
            c->state = JOINING;
            char join[64];
            int jn = snprintf(join, sizeof join, "{\"type\": \"join\", \"room\": \"bench%d\", \"ref\": 0}",
                              c->room);
            send_frame(c, 1, join, jn);
        }
        frames(c, epfd);
        if (c->state == CLOSED || (size_t)r < space) return;
    }
}

static int port;

static void start_connect(struct conn *c, int epfd) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) fail("members: socket: %s", strerror(errno));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS)
        fail("members: connect: %s", strerror(errno));
    c->state = CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
}

static void writable(struct conn *c, int epfd) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) fail("members: connect: %s", strerror(err));
    char req[256];
    int n = snprintf(req, sizeof req,
                     "GET /ws?user=m%d_%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     c->room, c->index, port);
    send_all(c, req, n);
    c->state = HANDSHAKE;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double p) {
    if (!st.nlat) return NAN;
    long k = (long)ceil(p / 100.0 * st.nlat) - 1;
    if (k < 0) k = 0;
    if (k > (long)st.nlat - 1) k = st.nlat - 1;
    return st.latency[k];
}

static void number(char *out, size_t n, double v) {
    if (isnan(v)) snprintf(out, n, "NaN");
    else snprintf(out, n, "%.6f", v);
}

int main(int argc, char **argv) {
    if (argc != 3 || strcmp(argv[1], "members")) {
        fprintf(stderr, "usage: c_members members SPEC_JSON\n");
        return 2;
    }
    const char *spec = argv[2];
    int rooms = (int)spec_number(spec, "rooms");
    int members = (int)spec_number(spec, "members");
    double seconds = spec_number(spec, "seconds");
    double drain_limit = spec_number(spec, "drain");
    double deadline = now_wall() + spec_number(spec, "deadline");
    port = (int)spec_number(spec, "port_b");
    int total = rooms * members;
    struct conn *conns = calloc(total, sizeof *conns);
    for (int r = 0, k = 0; r < rooms; r++)
        for (int i = 0; i < members; i++, k++) {
            conns[k].room = r;
            conns[k].index = i;
            conns[k].last_id = -1;
        }
    int epfd = epoll_create1(0);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &sev);
    st.window_start = st.window_end = INFINITY;

    char line[4096];
    size_t line_len = 0;
    long long expected = -1;
    int window_over = 0, stdin_open = 1;
    double cpu_measure = 0, cpu_end = 0, measure = 0, end = 0;
    long long last_arrivals = -1;
    double last_progress = 0;
    const char *drain_end = NULL;
    struct epoll_event events[256];

    while (!drain_end) {
        while (to_connect_next < total && to_connect_next - connected_joined < CONNECT_CONCURRENCY)
            start_connect(&conns[to_connect_next++], epfd);
        if (connected_joined == total && st.phase == SETUP && to_connect_next == total) {
            st.phase = WARMUP_PHASE; /* connected; waiting for "start" */
            st.t0 = 0;
            emit("{\"event\": \"connected\", \"connections\": %d}", total);
        }
        double now = now_wall();
        if (now > deadline) fail("members: deadline reached");
        double next = now + 0.1;
        if (st.phase == WARMUP_PHASE && st.window_start < next) next = st.window_start;
        if (st.phase == MEASURE && st.window_end < next) next = st.window_end;
        int timeout = next > now ? (int)((next - now) * 1000) + 1 : 0;
        int n = epoll_wait(epfd, events, 256, timeout);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c) {
                for (;;) {
                    ssize_t r = read(0, line + line_len, sizeof line - 1 - line_len);
                    if (r == 0) {
                        stdin_open = 0;
                        epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
                        break;
                    }
                    if (r < 0) break;
                    line_len += r;
                    line[line_len] = 0;
                    char *nl;
                    while ((nl = memchr(line, '\n', line_len))) {
                        *nl = 0;
                        if (strstr(line, "\"start\"")) {
                            st.t0 = spec_number(line, "t");
                            st.window_start = st.t0 + WARMUP;
                            st.window_end = st.window_start + seconds;
                        } else if (strstr(line, "\"measure_end\"")) {
                            expected = (long long)spec_number(line, "sent") * members;
                        }
                        size_t used = nl + 1 - line;
                        memmove(line, nl + 1, line_len - used);
                        line_len -= used;
                    }
                }
                continue;
            }
            if (c->state == CONNECTING && (events[i].events & (EPOLLOUT | EPOLLERR)))
                writable(c, epfd);
            else if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                readable(c, epfd);
        }
        now = now_wall();
        if (!stdin_open && st.phase != DONE && !(window_over && expected >= 0))
            fail("members: parent closed stdin in phase %s", phase_names[st.phase]);
        if (st.phase == WARMUP_PHASE && now >= st.window_start) {
            st.phase = MEASURE;
            cpu_measure = cpu_now();
            measure = now;
        }
        if (st.phase == MEASURE && now >= st.window_end) {
            st.phase = DRAIN;
            cpu_end = cpu_now();
            end = now;
            window_over = 1;
        }
        if (window_over && expected >= 0) {
            if (st.received >= expected) drain_end = "everything arrived";
            else if (st.arrivals != last_arrivals) {
                last_arrivals = st.arrivals;
                last_progress = now;
            } else if (now - last_progress > DRAIN_IDLE)
                drain_end = "stalled: nothing arrived for 3s";
            if (!drain_end && now - end > drain_limit) {
                static char msg[96];
                snprintf(msg, sizeof msg, "--drain limit of %gs reached while arriving",
                         drain_limit);
                drain_end = msg;
            }
        }
    }
    double drained = now_wall();
    st.phase = DONE;
    qsort(st.latency, st.nlat, sizeof *st.latency, cmp_double);
    char p50[32], p90[32], p99[32], p100[32];
    number(p50, sizeof p50, percentile(50) * 1000);
    number(p90, sizeof p90, percentile(90) * 1000);
    number(p99, sizeof p99, percentile(99) * 1000);
    number(p100, sizeof p100, percentile(100) * 1000);
    char errors[2048] = "{";
    for (int i = 0; i < st.nerr; i++) {
        size_t l = strlen(errors);
        snprintf(errors + l, sizeof errors - l, "%s\"%s\": %lld", i ? ", " : "", st.err_code[i],
                 st.err_count[i]);
    }
    strcat(errors, "}");
    char closed[64] = "{}";
    if (st.closed_member) snprintf(closed, sizeof closed, "{\"member\": %lld}", st.closed_member);
    size_t tl_cap = 32 + st.ntimeline * 24;
    char *tl = malloc(tl_cap);
    size_t tl_len = snprintf(tl, tl_cap, "[");
    for (size_t i = 0; i < st.ntimeline; i++)
        tl_len += snprintf(tl + tl_len, tl_cap - tl_len, "%s%lld", i ? ", " : "", st.timeline[i]);
    snprintf(tl + tl_len, tl_cap - tl_len, "]");
    emit("{\"event\": \"result\", \"role\": \"members\", \"drain_end\": \"%s\", \"cpu\": %.6f,"
         " \"errors\": %s, \"closed_during_run\": %s, \"drain\": %.6f, \"received\": %lld,"
         " \"duplicates\": %lld, \"gaps\": %lld, \"arrivals_in_window\": %lld,"
         " \"timeline\": %s, \"latency_ms\": {\"50\": %s, \"90\": %s, \"99\": %s, \"100\": %s}}",
         drain_end, (cpu_end - cpu_measure) / (end - measure), errors, closed, drained - end,
         st.received, st.duplicates, st.gaps, st.arrivals_in_window, tl, p50, p90, p99, p100);
    for (int k = 0; k < total; k++)
        if (conns[k].state == OPEN) {
            send_frame(&conns[k], 8, "\x03\xe8", 2);
            close(conns[k].fd);
        }
    return 0;
}
