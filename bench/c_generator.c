/*
 * The load generator of the fan-out benchmarks, in C: members and senders.
 *
 * With picows the members process still runs a Python callback, two regex
 * searches and a counter update per delivery: about 9 us, so it fills its
 * core near 100-120k deliveries/s, which is where the servers being compared
 * were.  Here a delivery is a frame header, two memmem() calls and a strtod:
 * well under a microsecond, so the servers' limits show instead of ours.
 * The picows senders, a Python call per send and per ack, did not get far
 * past 20k messages/s from thousands of connections; here a send is one
 * snprintf, a masked copy and one send().
 *
 * It speaks the same line protocol with bench/cross_instance.py as
 * fast_generator.py (events as JSON lines on stdout, commands on stdin for
 * the members) and reports the same result fields.  Plain epoll, one thread.
 *
 *   cc -O2 -Wall -o c_generator c_generator.c -lm
 *   c_generator members|senders SPEC_JSON      (started by cross_instance.py)
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
#define TICK 0.005
#define BATCH 0.001 /* the senders' tick from 1,000 messages/s up */
#define CONNECT_CONCURRENCY 200
#define READ_CHUNK 65536
#define MAX_EVENTS 512

enum state { IDLE, CONNECTING, HANDSHAKE, JOINING, OPEN, CLOSED };

struct conn {
    int fd;
    enum state state;
    int room;
    int index;
    long long last_id; /* -1: none yet */
    char *buf;         /* what was read and not parsed yet */
    size_t len, cap;
    char *out;         /* what send() did not take yet; sent on EPOLLOUT */
    size_t out_off, out_len, out_cap;
};

enum phase { SETUP, WARMUP_PHASE, MEASURE, DRAIN, DONE };
static const char *phase_names[] = {"setup", "warmup", "measure", "drain", "done"};

static struct {
    enum phase phase;
    /* members */
    double t0, window_start, window_end;
    long long received, arrivals, arrivals_in_window, duplicates, gaps;
    double *latency;
    size_t nlat, caplat;
    long long *timeline;
    size_t ntimeline;
    long long closed_member;
    /* senders */
    long long sent, window_sent, acks, window_acks, first_window, end_index;
    double pacing_lag;
    double *sent_at; /* per seq; 0 once acked */
    double *ack_latency;
    size_t nack, capack;
    long long closed_sender;
    /* both */
    char err_code[16][64];
    long long err_count[16];
    int nerr;
} st;

static int senders; /* the role: 0 members, 1 senders */
static const char *role = "members";
static int epfd, port;
static int connected_joined, to_connect_next;

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
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20) *p = '\'';
    emit("{\"event\": \"result\", \"role\": \"%s\", \"error\": \"%s: %s\"}", role, role, msg);
    exit(1);
}

static double spec_number(const char *spec, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(spec, pat);
    if (!p) fail("spec has no %s", key);
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
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20) *p = '\'';
    st.err_count[st.nerr++] = 1;
}

static void push(double **v, size_t *n, size_t *cap, double x) {
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 1 << 16;
        *v = realloc(*v, *cap * sizeof **v);
    }
    (*v)[(*n)++] = x;
}

static const char *find(const char *hay, size_t n, const char *needle) {
    return memmem(hay, n, needle, strlen(needle));
}

/* Where the value of key (given with its quotes and colon) starts, after any spaces;
 * NULL if the frame has no such key. */
static const char *value_of(const char *p, size_t n, const char *key) {
    const char *v = find(p, n, key);
    if (!v) return NULL;
    v += strlen(key);
    while (v < p + n && *v == ' ') v++;
    return v;
}

/* -- sending: one send() per frame; what the socket does not take waits for EPOLLOUT -- */

static void want_out(struct conn *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void queue(struct conn *c, const char *p, size_t n) {
    if (c->out_len + n > c->out_cap && c->out_off) { /* make room at the front first */
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    if (c->out_len + n > c->out_cap) {
        while (c->out_len + n > c->out_cap) c->out_cap = c->out_cap ? c->out_cap * 2 : 16384;
        c->out = realloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

/* Send what is queued; returns 1 when nothing is left. */
static int flush_out(struct conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return 0;
            c->out_off = c->out_len = 0; /* broken: reading will see the error and close */
            return 1;
        }
        c->out_off += w;
    }
    c->out_off = c->out_len = 0;
    return 1;
}

static void send_bytes(struct conn *c, const char *p, size_t n) {
    if (c->out_len > c->out_off) { /* frames already waiting: keep the order */
        queue(c, p, n);
        return;
    }
    for (;;) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w == (ssize_t)n) return;
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) return; /* broken: reading will see the error and close */
            w = 0;
        }
        queue(c, p + w, n - w);
        want_out(c, 1);
        return;
    }
}

static void send_frame(struct conn *c, int opcode, const char *payload, size_t n) {
    char small[14 + 512];
    char *f = n <= 512 ? small : malloc(14 + n);
    size_t h = 0;
    f[h++] = 0x80 | opcode;
    if (n < 126) {
        f[h++] = 0x80 | n;
    } else if (n < 65536) {
        f[h++] = 0x80 | 126;
        f[h++] = n >> 8;
        f[h++] = n & 0xff;
    } else {
        f[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) f[h++] = ((uint64_t)n >> (8 * i)) & 0xff;
    }
    static const unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
    memcpy(f + h, mask, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) f[h + i] = payload[i] ^ mask[i & 3];
    send_bytes(c, f, h + n);
    if (f != small) free(f);
}

/* -- members ------------------------------------------------------------------------ */

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
        push(&st.latency, &st.nlat, &st.caplat, now - sent_at);
    }
    c->last_id = mid;
}

static void member_message(struct conn *c, const char *p, size_t n, double now) {
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
}

/* -- senders ------------------------------------------------------------------------ */

/* What cross_instance.py's Stats.acked does. */
static void acked(const char *p, size_t n, double now) {
    st.acks++;
    const char *r = value_of(p, n, "\"ref\":");
    if (!r || r == p + n || *r < '0' || *r > '9') return; /* none, null, or not ours */
    long long k = strtoll(r, NULL, 10);
    if (k < 0 || k >= st.end_index) return;
    double sent_at = st.sent_at[k];
    st.sent_at[k] = 0;
    if (k >= st.first_window) {
        st.window_acks++;
        if (sent_at > 0) push(&st.ack_latency, &st.nack, &st.capack, now - sent_at);
    }
}

static struct conn *conns;
static int total;
static double start, rate;

/* What Stats.next_send and fast_generator.py's send_one do, for seq st.sent. */
static void send_one(double now) {
    long long k = st.sent++;
    int r = (int)(k % total);
    struct conn *c = &conns[r];
    double lag = now - (start + k / rate);
    if (lag > st.pacing_lag) st.pacing_lag = lag;
    int w = k >= st.first_window;
    if (w) st.window_sent++;
    st.sent_at[k] = now;
    if (c->state != OPEN) {
        count_error("sender gone", 11);
        return;
    }
    char frame[160];
    int fn = snprintf(frame, sizeof frame,
                      "{\"type\": \"send\", \"room\": \"bench%d\", \"body\": \"%.6f|%d|%lld\","
                      " \"ref\": %lld}",
                      r, now, w, k, k);
    send_frame(c, 1, frame, fn);
}

/* -- both: frames in ------------------------------------------------------------------ */

static void text_frame(struct conn *c, const char *p, size_t n, double now) {
    static const char message_prefix[] = "{\"type\":\"message\"";
    static const char ack_prefix[] = "{\"type\":\"ack\"";
    if (n >= sizeof message_prefix - 1 && !memcmp(p, message_prefix, sizeof message_prefix - 1)) {
        if (!senders) member_message(c, p, n, now);
        return; /* a sender is a member of its room too; its copies are not counted */
    }
    if (senders && n >= sizeof ack_prefix - 1 && !memcmp(p, ack_prefix, sizeof ack_prefix - 1)) {
        acked(p, n, now);
        return;
    }
    const char *t = value_of(p, n, "\"type\":");
    size_t left = t ? (size_t)(p + n - t) : 0;
    if (left >= 5 && !memcmp(t, "\"ack\"", 5)) {
        if (senders) acked(p, n, now);
    } else if (left >= 8 && !memcmp(t, "\"joined\"", 8)) {
        const char *last = find(p, n, "\"last_id\":");
        long long lid = 0;
        if (last) lid = strtoll(last + 10, NULL, 10); /* null parses as 0 */
        c->last_id = lid;
        if (c->state == JOINING) {
            c->state = OPEN;
            connected_joined++;
        }
    } else if (left >= 7 && !memcmp(t, "\"error\"", 7)) {
        const char *cs = value_of(p, n, "\"code\":");
        if (cs) {
            if (cs < p + n && *cs == '"') cs++;
            const char *ce = cs;
            while (ce < p + n && *ce != '"' && *ce != ',' && *ce != '}') ce++;
            count_error(cs, ce - cs);
        } else {
            count_error("None", 4); /* str(msg.get("code")) in Python */
        }
        if (c->state == JOINING) fail("join failed: %.*s", (int)(n > 200 ? 200 : n), p);
    }
}

static void close_conn(struct conn *c) {
    if (c->state == CLOSED) return;
    if (c->state != OPEN && st.phase != DONE) fail("closed before joining");
    if (c->state == OPEN && st.phase != DONE) {
        if (senders) st.closed_sender++;
        else st.closed_member++;
    }
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = CLOSED;
    c->out_off = c->out_len = 0;
}

/* Parse whatever whole frames are buffered; keep the rest. */
static void frames(struct conn *c) {
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
            close_conn(c);
            return;
        }
        if (c->state == CLOSED) return;
        pos += hl + n;
    }
    memmove(c->buf, c->buf + pos, c->len - pos);
    c->len -= pos;
}

static void readable(struct conn *c) {
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
            close_conn(c);
            return;
        }
        if (r == 0) {
            close_conn(c);
            return;
        }
        c->len += r;
        if (c->state == HANDSHAKE) {
            char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
            if (!end) continue;
            if (c->len < 12 || memcmp(c->buf + 9, "101", 3))
                fail("handshake refused: %.*s", (int)(c->len > 120 ? 120 : c->len), c->buf);
            size_t hl = end + 4 - c->buf;
            memmove(c->buf, c->buf + hl, c->len - hl);
            c->len -= hl;
            c->state = JOINING;
            char join[64];
            int jn = snprintf(join, sizeof join,
                              "{\"type\": \"join\", \"room\": \"bench%d\", \"ref\": 0}", c->room);
            send_frame(c, 1, join, jn);
        }
        frames(c);
        if (c->state == CLOSED || (size_t)r < space) return;
    }
}

static void start_connect(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) fail("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS)
        fail("connect: %s", strerror(errno));
    c->state = CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
}

static void connected(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) fail("connect: %s", strerror(err));
    char user[32], req[256];
    if (senders) snprintf(user, sizeof user, "s%d", c->room);
    else snprintf(user, sizeof user, "m%d_%d", c->room, c->index);
    int n = snprintf(req, sizeof req,
                     "GET /ws?user=%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     user, port);
    c->state = HANDSHAKE;
    want_out(c, 0);
    send_bytes(c, req, n);
}

/* One epoll_wait and what it reports; fd 0 (data.ptr NULL) goes to on_stdin. */
static int poll_once(int timeout, void (*on_stdin)(void)) {
    static struct epoll_event events[MAX_EVENTS];
    int n = epoll_wait(epfd, events, MAX_EVENTS, timeout);
    for (int i = 0; i < n; i++) {
        struct conn *c = events[i].data.ptr;
        uint32_t e = events[i].events;
        if (!c) {
            on_stdin();
            continue;
        }
        if (c->state == CLOSED) continue;
        if (c->state == CONNECTING) {
            if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) connected(c);
            continue;
        }
        if ((e & EPOLLOUT) && flush_out(c)) want_out(c, 0);
        if (e & (EPOLLIN | EPOLLHUP | EPOLLERR)) readable(c);
    }
    return n;
}

static void connect_more(void) {
    while (to_connect_next < total && to_connect_next - connected_joined < CONNECT_CONCURRENCY)
        start_connect(&conns[to_connect_next++]);
}

static int ms_until(double t, double now) {
    return t > now ? (int)ceil((t - now) * 1000) : 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* A JSON number as Python's json writes it: NaN for what is not one. */
static void number(char *out, size_t size, double v) {
    if (isfinite(v)) snprintf(out, size, "%.6f", v);
    else snprintf(out, size, "NaN");
}

/* Nearest rank, of sorted values, in ms; NaN when there are none. */
static void percentile_ms(char *out, size_t size, const double *v, size_t n, double p) {
    long k = (long)ceil(p / 100.0 * n) - 1;
    if (k < 0) k = 0;
    if (k > (long)n - 1) k = n - 1;
    number(out, size, n ? v[k] * 1000 : NAN);
}

static void errors_json(char *errors, size_t size) {
    snprintf(errors, size, "{");
    for (int i = 0; i < st.nerr; i++) {
        size_t l = strlen(errors);
        snprintf(errors + l, size - l, "%s\"%s\": %lld", i ? ", " : "", st.err_code[i],
                 st.err_count[i]);
    }
    strcat(errors, "}");
}

static void close_all(void) {
    for (int k = 0; k < total; k++)
        if (conns[k].state == OPEN) {
            send_frame(&conns[k], 8, "\x03\xe8", 2);
            close(conns[k].fd);
        }
}

/* The drain: until everything is in, nothing moves for DRAIN_IDLE, or the limit passes. */
static const char *drain_check(int done, long long progress, double now, double end,
                               double limit) {
    static long long last_value = -1;
    static double last_at = -1;
    static char msg[96];
    if (last_at < 0) last_at = now;
    if (done) return "everything arrived";
    if (progress != last_value) {
        last_value = progress;
        last_at = now;
    } else if (now - last_at > DRAIN_IDLE) {
        return "stalled: nothing arrived for 3s";
    }
    if (now - end > limit) {
        snprintf(msg, sizeof msg, "--drain limit of %gs reached while arriving", limit);
        return msg;
    }
    return NULL;
}

/* -- the members' main loop ------------------------------------------------------------ */

static char line[4096];
static size_t line_len;
static long long expected = -1;
static int stdin_open = 1;
static double seconds;
static int members;

static void members_stdin(void) {
    for (;;) {
        ssize_t r = read(0, line + line_len, sizeof line - 1 - line_len);
        if (r == 0) {
            stdin_open = 0;
            epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
            return;
        }
        if (r < 0) return;
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
        if (line_len == sizeof line - 1) line_len = 0; /* a line too long to be ours */
    }
}

static void no_stdin(void) {}

static int run_members(const char *spec, double deadline) {
    int rooms = (int)spec_number(spec, "rooms");
    members = (int)spec_number(spec, "members");
    seconds = spec_number(spec, "seconds");
    double drain_limit = spec_number(spec, "drain");
    port = (int)spec_number(spec, "port_b");
    total = rooms * members;
    conns = calloc(total, sizeof *conns);
    for (int r = 0, k = 0; r < rooms; r++)
        for (int i = 0; i < members; i++, k++) {
            conns[k].room = r;
            conns[k].index = i;
            conns[k].last_id = -1;
        }
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &sev);
    st.window_start = st.window_end = INFINITY;

    int window_over = 0;
    double cpu_measure = 0, cpu_end = 0, measure = 0, end = 0;
    const char *drain_end = NULL;

    while (!drain_end) {
        connect_more();
        if (connected_joined == total && st.phase == SETUP && to_connect_next == total) {
            st.phase = WARMUP_PHASE; /* connected; waiting for "start" */
            st.t0 = 0;
            emit("{\"event\": \"connected\", \"connections\": %d}", total);
        }
        double now = now_wall();
        if (now > deadline) fail("deadline reached");
        double next = now + 0.1;
        if (st.phase == WARMUP_PHASE && st.window_start < next) next = st.window_start;
        if (st.phase == MEASURE && st.window_end < next) next = st.window_end;
        poll_once(ms_until(next, now), members_stdin);
        now = now_wall();
        if (!stdin_open && st.phase != DONE && !(window_over && expected >= 0))
            fail("parent closed stdin in phase %s", phase_names[st.phase]);
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
        if (window_over && expected >= 0)
            drain_end = drain_check(st.received >= expected, st.arrivals, now, end, drain_limit);
    }
    double drained = now_wall();
    st.phase = DONE;
    qsort(st.latency, st.nlat, sizeof *st.latency, cmp_double);
    char p50[32], p90[32], p99[32], p100[32];
    percentile_ms(p50, sizeof p50, st.latency, st.nlat, 50);
    percentile_ms(p90, sizeof p90, st.latency, st.nlat, 90);
    percentile_ms(p99, sizeof p99, st.latency, st.nlat, 99);
    percentile_ms(p100, sizeof p100, st.latency, st.nlat, 100);
    char errors[2048];
    errors_json(errors, sizeof errors);
    char closed[64] = "{}";
    if (st.closed_member) snprintf(closed, sizeof closed, "{\"member\": %lld}", st.closed_member);
    size_t tl_cap = 32 + st.ntimeline * 24;
    char *tl = malloc(tl_cap);
    size_t tl_len = snprintf(tl, tl_cap, "[");
    for (size_t i = 0; i < st.ntimeline; i++)
        tl_len += snprintf(tl + tl_len, tl_cap - tl_len, "%s%lld", i ? ", " : "", st.timeline[i]);
    snprintf(tl + tl_len, tl_cap - tl_len, "]");
    char cpu[32];
    number(cpu, sizeof cpu, (cpu_end - cpu_measure) / (end - measure));
    emit("{\"event\": \"result\", \"role\": \"members\", \"drain_end\": \"%s\", \"cpu\": %s,"
         " \"errors\": %s, \"closed_during_run\": %s, \"drain\": %.6f, \"received\": %lld,"
         " \"duplicates\": %lld, \"gaps\": %lld, \"arrivals_in_window\": %lld,"
         " \"timeline\": %s, \"latency_ms\": {\"50\": %s, \"90\": %s, \"99\": %s, \"100\": %s}}",
         drain_end, cpu, errors, closed, drained - end, st.received, st.duplicates, st.gaps,
         st.arrivals_in_window, tl, p50, p90, p99, p100);
    close_all();
    return 0;
}

/* -- the senders' main loop: open-loop pacing, seq k is due at start + k / rate ---------- */

static int run_senders(const char *spec, double deadline) {
    int rooms = (int)spec_number(spec, "rooms");
    rate = spec_number(spec, "rate");
    seconds = spec_number(spec, "seconds");
    double drain_limit = spec_number(spec, "drain");
    port = (int)spec_number(spec, "port_a");
    total = rooms;
    conns = calloc(total, sizeof *conns);
    for (int r = 0; r < rooms; r++) {
        conns[r].room = r;
        conns[r].last_id = -1;
    }
    st.first_window = (long long)rint(WARMUP * rate); /* rint: half to even, as round() */
    st.end_index = (long long)rint((WARMUP + seconds) * rate);
    st.sent_at = calloc(st.end_index > 0 ? st.end_index : 1, sizeof *st.sent_at);

    double measure_at = 0, end_at = 0;
    double cpu_measure = 0, cpu_end = 0, measure = 0, end = 0;
    const char *drain_end = NULL;
    int batch = rate * BATCH >= 1, backlog = 0;
    double last_wake = 0;

    while (!drain_end) {
        double now = now_wall();
        if (st.phase == SETUP) {
            connect_more();
            if (connected_joined == total && to_connect_next == total) {
                emit("{\"event\": \"connected\", \"connections\": %d}", total);
                now = now_wall();
                start = now;
                measure_at = now + WARMUP;
                end_at = now + WARMUP + seconds;
                st.phase = WARMUP_PHASE;
                emit("{\"event\": \"start\", \"t\": %.6f}", start);
            }
        }
        if (st.phase == WARMUP_PHASE || st.phase == MEASURE) {
            /* A tick: what fast_generator.py's tick does, however late it comes. */
            if (st.phase == WARMUP_PHASE && now >= measure_at) {
                st.phase = MEASURE;
                cpu_measure = cpu_now();
                measure = now;
                emit("{\"event\": \"measure_start\"}");
            }
            long long due = (long long)((now - start) * rate) + 1;
            if (due > st.end_index) due = st.end_index;
            while (st.sent < due) send_one(now);
            if (st.phase == MEASURE && now >= end_at) {
                st.phase = DRAIN;
                cpu_end = cpu_now();
                end = now;
                emit("{\"event\": \"measure_end\", \"sent\": %lld}", st.window_sent);
            }
        }
        if (st.phase == DRAIN) {
            drain_end = drain_check(st.window_acks >= st.window_sent, st.acks, now, end,
                                    drain_limit);
            if (drain_end) break;
        }
        if (now > deadline) fail("deadline reached");
        double next = now + 0.1;
        if (st.phase == WARMUP_PHASE || st.phase == MEASURE) {
            next = now + TICK; /* or sooner: when the next send is due */
            if (st.sent < st.end_index && start + st.sent / rate < next)
                next = start + st.sent / rate;
            if (st.phase == WARMUP_PHASE && measure_at < next) next = measure_at;
            if (end_at < next) next = end_at;
        }
        if (st.phase == SETUP || !batch) {
            poll_once(ms_until(next, now), no_stdin);
            continue;
        }
        /* Woken by every ack, the loop would sleep and wake tens of thousands of times a
         * second, and on a VM a wake-up costs about what a send does.  So with a send due
         * every BATCH or more often it wakes every BATCH, sends what is due and reads what
         * arrived meanwhile (an ack's time is then up to BATCH late), and does not sleep
         * while epoll has more to report than one call takes. */
        double nap = last_wake + BATCH - now_wall();
        if (!backlog && nap > 0) {
            struct timespec ts = {.tv_sec = (time_t)nap, .tv_nsec = (long)(fmod(nap, 1.0) * 1e9)};
            nanosleep(&ts, NULL);
        }
        last_wake = now_wall();
        backlog = poll_once(0, no_stdin) == MAX_EVENTS;
    }
    double drained = now_wall();
    st.phase = DONE;
    qsort(st.ack_latency, st.nack, sizeof *st.ack_latency, cmp_double);
    char p50[32], p99[32];
    percentile_ms(p50, sizeof p50, st.ack_latency, st.nack, 50);
    percentile_ms(p99, sizeof p99, st.ack_latency, st.nack, 99);
    char errors[2048];
    errors_json(errors, sizeof errors);
    char closed[64] = "{}";
    if (st.closed_sender) snprintf(closed, sizeof closed, "{\"sender\": %lld}", st.closed_sender);
    char cpu[32];
    number(cpu, sizeof cpu, (cpu_end - cpu_measure) / (end - measure));
    emit("{\"event\": \"result\", \"role\": \"senders\", \"drain_end\": \"%s\", \"cpu\": %s,"
         " \"errors\": %s, \"closed_during_run\": %s, \"drain\": %.6f, \"sent\": %lld,"
         " \"acks\": %lld, \"window\": %.6f, \"pacing_lag_ms\": %.6f,"
         " \"ack_latency_ms\": {\"50\": %s, \"99\": %s}}",
         drain_end, cpu, errors, closed, drained - end, st.window_sent, st.window_acks,
         end - measure, st.pacing_lag * 1000, p50, p99);
    close_all();
    return 0;
}

/* Each connection is a descriptor: the parent raised the limit; take what it allows. */
static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "members") && strcmp(argv[1], "senders"))) {
        fprintf(stderr, "usage: c_generator members|senders SPEC_JSON\n");
        return 2;
    }
    senders = !strcmp(argv[1], "senders");
    role = argv[1];
    const char *spec = argv[2];
    double deadline = now_wall() + spec_number(spec, "deadline");
    raise_fd_limit();
    epfd = epoll_create1(0);
    return senders ? run_senders(spec, deadline) : run_members(spec, deadline);
}
