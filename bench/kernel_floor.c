/*
 * The kernel's share of a small-room message on this machine: a relay in C
 * that does nothing but what no chat server can avoid.
 *
 * For ROOMS rooms of MEMBERS members and one sender each, a load process
 * (pinned to one CPU) sends SIZE-byte messages on the senders' connections at
 * a fixed rate, and the relay (pinned to the other) reads each one with one
 * recv() and writes it with one send() to every member and back to its sender
 * (a chat server's ack and the sender's own copy, in one write). No framing,
 * no JSON, no storage, no broker: the relay's CPU per message is the floor
 * under any server's in this shape, on this kernel and this VM. A server
 * whose other work per message costs X us cannot pass 1e6 / (floor + X)
 * messages/s on one core.
 *
 *   cc -O2 -Wall -o kernel_floor kernel_floor.c
 *   kernel_floor [ROOMS MEMBERS RATE[,RATE...] [SIZE [SECONDS]]]
 *
 * Defaults: 1000 5 4000,8000,12000,16000 200 5.  Prints one line per rate:
 * messages/s relayed, the relay's CPU (% of a core, user + system, as the
 * kernel charges it to the process) and us per message, CPU 0's busy time
 * from /proc/stat (softirqs included: the whole cost, if nothing else runs
 * there), and the load process's CPU.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 512
#define WARMUP 2.0

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu_seconds(int who) {
    struct rusage u;
    getrusage(who, &u);
    return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
           u.ru_stime.tv_usec / 1e6;
}

/* Busy time of one CPU from /proc/stat, in seconds: user, system, interrupts
 * and softirqs (the loopback's receive side runs as a softirq on the sending
 * CPU, and a kernel with IRQ time accounting leaves it out of getrusage). */
static double cpu_busy(int cpu) {
    FILE *f = fopen("/proc/stat", "r");
    char line[512], want[16];
    double busy = 0;
    snprintf(want, sizeof want, "cpu%d ", cpu);
    while (f && fgets(line, sizeof line, f)) {
        unsigned long long v[8] = {0};
        if (strncmp(line, want, strlen(want)) != 0) continue;
        sscanf(line + strlen(want), "%llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1],
               &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
        busy = (double)(v[0] + v[1] + v[2] + v[5] + v[6]) / sysconf(_SC_CLK_TCK);
    }
    if (f) fclose(f);
    return busy;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) perror("sched_setaffinity");
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void raise_fd_limit(void) {
    struct rlimit r;
    getrlimit(RLIMIT_NOFILE, &r);
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
}

/* The load: connects every connection, then for each rate sends the due
 * messages once a millisecond (as bench/c_generator.c's senders do) and reads
 * whatever arrives. Reports its own CPU per rate on fd `report`. */
static void load(int port, int rooms, int members, double *rates, int nrates, int size,
                 double seconds, int control) {
    int per_room = members + 1, total = rooms * per_room;
    int *fds = malloc(sizeof(int) * total);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int ep = epoll_create1(0);
    for (int i = 0; i < total; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&a, sizeof a) != 0) die("connect");
        int one = 1;
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    char go;
    if (read(control, &go, 1) != 1) die("read go");
    char *msg = malloc(size), buf[65536];
    memset(msg, 'x', size);
    struct epoll_event events[MAX_EVENTS];
    for (int r = 0; r < nrates; r++) {
        double start = now(), end = start + WARMUP + seconds, due = 0, cpu0 = 0;
        long sent = 0;
        int next = 0, measuring = 0;
        while (now() < end) {
            double t = now();
            if (!measuring && t >= start + WARMUP) {
                measuring = 1;
                cpu0 = cpu_seconds(RUSAGE_SELF);
            }
            due = (t - start) * rates[r];
            while (sent < (long)due) {
                int fd = fds[next * per_room];  /* the room's sender */
                next = (next + 1) % rooms;
                if (send(fd, msg, size, 0) != size) die("send");
                sent++;
            }
            int n = epoll_wait(ep, events, MAX_EVENTS, 1);
            for (int i = 0; i < n; i++)
                while (recv(events[i].data.fd, buf, sizeof buf, MSG_DONTWAIT) > 0) {
                }
        }
        double used = cpu_seconds(RUSAGE_SELF) - cpu0;
        if (write(control, &used, sizeof used) != sizeof used) die("write report");
        if (r + 1 < nrates && read(control, &go, 1) != 1) die("read next");
    }
    exit(0);
}

/* The relay's step: each sender that is ready, one recv, and what it got sent
 * to every connection of its room (the sender's own included). Returns the
 * bytes read. */
static long relay_ready(int ep, int timeout_ms, const int *fds, const int *room_of,
                        int per_room) {
    static char buf[65536];
    struct epoll_event events[MAX_EVENTS];
    long bytes = 0;
    int n = epoll_wait(ep, events, MAX_EVENTS, timeout_ms);
    for (int i = 0; i < n; i++) {
        int fd = events[i].data.fd;
        ssize_t got = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (got <= 0) continue;
        bytes += got;
        int first = room_of[fd] * per_room;
        for (int k = 0; k < per_room; k++) send(fds[first + k], buf, got, MSG_DONTWAIT);
    }
    return bytes;
}

int main(int argc, char **argv) {
    int rooms = argc > 1 ? atoi(argv[1]) : 1000;
    int members = argc > 2 ? atoi(argv[2]) : 5;
    double rates[64] = {4000, 8000, 12000, 16000};
    int nrates = 4;
    if (argc > 3) {
        nrates = 0;
        for (char *p = strtok(argv[3], ","); p && nrates < 64; p = strtok(NULL, ","))
            rates[nrates++] = atof(p);
    }
    int size = argc > 4 ? atoi(argv[4]) : 200;
    double seconds = argc > 5 ? atof(argv[5]) : 5.0;
    int per_room = members + 1, total = rooms * per_room;
    raise_fd_limit();
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 4096)) die("listen");
    getsockname(lfd, (struct sockaddr *)&a, &alen);
    int control[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, control)) die("socketpair");
    pid_t child = fork();
    if (child == 0) {
        close(control[0]);
        pin(1);
        load(ntohs(a.sin_port), rooms, members, rates, nrates, size, seconds, control[1]);
    }
    close(control[1]);
    pin(0);
    /* Connections are accepted in the order they were made: room r's are
     * r * per_room .. r * per_room + members, its sender first. */
    int *fds = malloc(sizeof(int) * total), *room_of = calloc(65536 * 4, sizeof(int));
    int ep = epoll_create1(0);
    for (int i = 0; i < total; i++) {
        fds[i] = accept(lfd, NULL, NULL);
        if (fds[i] < 0) die("accept");
        if (fds[i] >= 65536 * 4) {
            fprintf(stderr, "too many fds\n");
            return 1;
        }
        int one = 1;
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        room_of[fds[i]] = i / per_room;
        if (i % per_room == 0) {
            struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
            epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
        }
    }
    printf("%d rooms x %d members (+ the sender), %d-byte messages, %.0f s a rate\n", rooms,
           members, size, seconds);
    printf("| offered msg/s | relayed msg/s | relay CPU | relay us/msg | us per send() "
           "| CPU 0 busy | CPU 0 us/msg | load CPU |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    fflush(stdout);
    for (int r = 0; r < nrates; r++) {
        if (write(control[0], "g", 1) != 1) die("go");
        double start = now(), cpu0 = 0, t0 = 0, busy0 = 0;
        long bytes = 0, base = 0;
        int measuring = 0;
        for (;;) {
            bytes += relay_ready(ep, 100, fds, room_of, per_room);
            double t = now();
            if (!measuring && t >= start + WARMUP) {
                measuring = 1;
                cpu0 = cpu_seconds(RUSAGE_SELF);
                busy0 = cpu_busy(0);
                t0 = t;
                base = bytes;
            }
            if (measuring && t >= t0 + seconds) break;
        }
        double wall = now() - t0, used = cpu_seconds(RUSAGE_SELF) - cpu0;
        double busy = cpu_busy(0) - busy0;
        double load_used = 0, msgs = (bytes - base) / (double)size / wall;
        if (read(control[0], &load_used, sizeof load_used) != sizeof load_used) die("report");
        printf("| %.0f | %.0f | %.0f %% | %.1f | %.1f | %.0f %% | %.1f | %.0f %% |\n", rates[r],
               msgs, 100 * used / wall, used * 1e6 / wall / msgs,
               used * 1e6 / wall / msgs / per_room, 100 * busy / wall, busy * 1e6 / wall / msgs,
               100 * load_used / seconds);
        fflush(stdout);
        /* Let the load finish its window and drain before the next rate. */
        double quiet = now() + 0.5;
        while (now() < quiet) relay_ready(ep, 50, fds, room_of, per_room);
    }
    close(control[0]);
    waitpid(child, NULL, 0);
    return 0;
}
