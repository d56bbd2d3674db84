#!/usr/bin/env python3
"""Groups the samples of `perf script` (a `perf record -g` profile) into the costs BENCHMARKS.md talks about.

    perf script -i FILE | python3 benches/profile/perf-groups.py handshake|request US

`US` is the process's CPU per handshake or per request in the profiled cell (from the harness's table);
each group is printed as its share of the samples and as that share of `US`. `handshake` splits the
listener's kernel time by what woke or slept (waking the peer through `sock_def_readable`, coming back
from a sleep in `epoll_wait`) and its user time by crypto; `request` splits a sidecar's kernel time by
system call and its user time by component.
"""
import collections
import re
import sys

FRAME = re.compile(r"\s*[0-9a-f]+ (.*?)(\+0x[0-9a-f]+)? \((.*)\)$")


def kernel(names, mode):
    joined = " ".join(names)
    if mode == "handshake":
        first = names[0]
        if first.startswith("_raw_spin_unlock_irqrestore") and "sock_def_readable" in joined:
            return "waking the peer (sock_def_readable)"
        if first.startswith("finish_task_switch") and "epoll_wait" in joined:
            return "back from a sleep in epoll_wait"
        if first.startswith("finish_task_switch"):
            return "back from another switch"
    for key, label in [
        ("accept", "accept"),
        ("sys_close", "close"),
        ("__fput", "close"),
        ("tcp_close", "close"),
        ("shutdown", "shutdown"),
        ("epoll_ctl", "epoll_ctl"),
        ("setsockopt", "setsockopt"),
        ("epoll_wait", "epoll_wait"),
        ("writev", "write (TCP send + the loopback peer's receive)"),
        ("sendto", "write (TCP send + the loopback peer's receive)"),
        ("recvfrom", "read"),
        ("tcp_recvmsg", "read"),
    ]:
        if key in joined:
            return label
    return "other"


def user(leaf):
    groups = [
        (r"x25519", "X25519"),
        (r"sha256|SHA256|HMAC|hkdf|HKDF", "SHA-256 / HMAC / HKDF"),
        (r"aes|gcm|GCM", "AES-GCM"),
        (r"malloc|free|memmove|memcpy|memset|realloc|unlink_chunk|consolidate", "malloc / free / memcpy"),
        (r"tracing|nu_ansi|fmt::", "tracing / formatting"),
        (r"rustls", "rustls"),
        (r"h2::", "h2"),
        (r"hyper|httparse|http::", "hyper / http"),
        (r"tokio|mio", "tokio"),
        (r"phoenix", "phoenix-mesh"),
    ]
    for pattern, label in groups:
        if re.search(pattern, leaf):
            return label
    return "other"


def main():
    mode, us = sys.argv[1], float(sys.argv[2])
    counts = collections.Counter()
    total = 0
    stack = []

    def done():
        nonlocal total
        if not stack:
            return
        total += 1
        names = [name for name, _ in stack]
        if "kallsyms" in stack[0][1]:
            counts["k: " + kernel(names, mode)] += 1
        else:
            counts["u: " + user(names[0])] += 1

    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            done()
            stack = []
        elif line.startswith("\t"):
            m = FRAME.match(line)
            if m:
                stack.append((m.group(1), m.group(3)))
    done()
    for key, n in sorted(counts.items()):
        print(f"{key:50s} {100 * n / total:5.1f} % {us * n / total:6.1f} µs")


if __name__ == "__main__":
    main()
