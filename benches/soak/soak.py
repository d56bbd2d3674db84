#!/usr/bin/env python3
"""Long memory soak of the mesh listener, several arms side by side (benches/soak/README.md).

Each arm is a full chain of its own: nginx backend -> phoenix-mesh server (the listener) ->
phoenix-mesh client -> wrk, plus bursts of fresh mTLS connections straight to the listener and of
fresh plain connections to the client. The arms are identical except the environment the listener
starts with (its allocator settings). Every `--reissue` seconds both leaf certificates are re-issued,
installed by rename and both sidecars get SIGHUP; every `--kill-every` seconds each arm's backend is
killed (SIGKILL) for `--kill-for` seconds. Every `--sample` seconds one CSV row per arm: the
listener's VmRSS/RssAnon/VmHWM, open fds, its /metrics gauges and request count, and its
connections to the backend.

Only the standard library; needs nginx, wrk and openssl on PATH.
"""
import argparse
import csv
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent

ARMS = {
    # name: environment added to the listener's
    "A": {},
    "B": {"MALLOC_ARENA_MAX": "2"},
    "C": {"MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"},
}

STOP = threading.Event()
LOCK = threading.Lock()


def log(msg):
    with LOCK:
        print(time.strftime("%H:%M:%S"), msg, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


# ---------------------------------------------------------------- PKI (openssl, ECDSA P-256)

def openssl_ca(pki: Path):
    pki.mkdir(parents=True, exist_ok=True)
    (pki / "ca.ext").write_text(
        "basicConstraints=critical,CA:TRUE,pathlen:1\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n")
    run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", pki / "root.key"])
    run(["openssl", "req", "-new", "-x509", "-key", pki / "root.key", "-sha256", "-days", "3650",
         "-subj", "/O=Phoenix Soak/CN=Phoenix Soak Root CA", "-out", pki / "root.crt",
         "-addext", "basicConstraints=critical,CA:TRUE,pathlen:1",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])


LEAVES = {
    "listener": ("traefik.internal.test", "DNS:traefik.internal.test,IP:127.0.0.1", "serverAuth"),
    "client": ("nginx.internal.test", "DNS:nginx.internal.test", "clientAuth"),
}


def issue(pki: Path, dest: Path, which: str, serial: int):
    """A fresh key and certificate for `which`, written beside and renamed over dest/which.{crt,key}."""
    cn, san, eku = LEAVES[which]
    tmp = dest / f".{which}.{serial}"
    ext = dest / f".{which}.ext"
    ext.write_text(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage={eku}\nsubjectAltName={san}\n")
    run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{tmp}.key0"])
    run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", f"{tmp}.key0", "-out", f"{tmp}.key"])
    run(["openssl", "req", "-new", "-key", f"{tmp}.key", "-subj", f"/O=Phoenix Soak/CN={cn}",
         "-out", f"{tmp}.csr"])
    run(["openssl", "x509", "-req", "-in", f"{tmp}.csr", "-CA", pki / "root.crt", "-CAkey", pki / "root.key",
         "-set_serial", str(serial), "-days", "30", "-sha256", "-extfile", ext, "-out", f"{tmp}.crt"])
    os.chmod(f"{tmp}.key", 0o600)
    # Key first then certificate: a reader in between sees a mismatch for a moment and keeps the old
    # pair (the reload is all or nothing), then the SIGHUP (or the next poll) picks up the new one.
    os.replace(f"{tmp}.key", dest / f"{which}.key")
    os.replace(f"{tmp}.crt", dest / f"{which}.crt")
    for suffix in (".key0", ".csr"):
        try:
            os.unlink(f"{tmp}{suffix}")
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------- one arm

class Arm:
    def __init__(self, name, env, idx, args):
        self.name, self.env, self.args = name, env, args
        base = args.base_port + 100 * idx
        self.backend_port = base + 80
        self.listener_port = base + 43
        self.client_port = base + 81
        self.listener_admin = base + 90
        self.client_admin = base + 91
        self.dir = args.run / f"arm-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs = {}
        self.csv_path = args.out / f"{args.prefix}-{name}.csv"

    # --- backend: nginx, fixed small body on GET /, a 64 KiB file on GET /big, POST bodies read and dropped
    def backend_conf(self):
        d = self.dir
        (d / "www").mkdir(exist_ok=True)
        big = os.urandom(32 * 1024).hex().encode()  # 64 KiB
        (d / "www" / "big").write_bytes(big)
        (d / "www" / "upload").write_bytes(big)  # only for the static module to find (see upload_answer)
        (d / "www" / "huge").write_bytes(big * 16)  # 1 MiB, for --burst-parallel
        for t in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
            (d / "tmp" / t).mkdir(parents=True, exist_ok=True)
        conf = d / "backend.conf"
        conf.write_text(f"""worker_processes 1;
daemon on;
master_process on;
user root;
pid {d}/backend.pid;
error_log {d}/backend.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy; fastcgi_temp_path {d}/tmp/fcgi;
    uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
    client_max_body_size 1m; client_body_buffer_size 128k;
    keepalive_timeout 300s; keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{self.backend_port};
        root {d}/www;
        location = / {{ default_type text/plain; return 200 "hello from backend\\n"; }}
        location = /big {{ default_type application/octet-stream; }}
        location = /huge {{ default_type application/octet-stream; }}
        location = /upload {{ {self.upload_answer()} }}
    }}
}}
""")
        return conf

    def upload_answer(self):
        if self.args.echo_size:
            # nginx's static module answers POST with 405; the error page turns that into the 64 KiB
            # file (fetched as GET), so an upload gets a body of the same size back, like an echo.
            return "default_type application/octet-stream; error_page 405 =200 /big;"
        return 'default_type text/plain; return 200 "got it\\n";'

    def start_backend(self):
        conf = self.dir / "backend.conf"
        run(["nginx", "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "backend.err")])
        wait_port(self.backend_port)

    def kill_backend(self):
        pidfile = self.dir / "backend.pid"
        try:
            master = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        kids = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        for pid in [master] + [int(k) for k in kids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            pidfile.unlink()
        except FileNotFoundError:
            pass

    # --- sidecars
    def start_sidecars(self, bin_path, certs: Path, pki: Path):
        d = self.dir
        (d / "listener.toml").write_text(
            f'listen = "127.0.0.1:{self.listener_port}"\nbackend = "127.0.0.1:{self.backend_port}"\n'
            f'cert = "{certs}/listener.crt"\nkey = "{certs}/listener.key"\nca = "{pki}/root.crt"\n'
            f'admin_listen = "127.0.0.1:{self.listener_admin}"\n'
            + (f"worker_threads = {self.args.worker_threads}\n" if self.args.worker_threads is not None else ""))
        (d / "client.toml").write_text(
            f'listen = "127.0.0.1:{self.client_port}"\nupstreams = ["127.0.0.1:{self.listener_port}"]\n'
            f'server_name = "traefik.internal.test"\n'
            f'cert = "{certs}/client.crt"\nkey = "{certs}/client.key"\nca = "{pki}/root.crt"\n'
            f'admin_listen = "127.0.0.1:{self.client_admin}"\n'
            f'upstream_http2 = {"false" if self.args.client_http1 else "true"}\n')
        env = dict(os.environ, RUST_LOG="warn")
        lenv = dict(env, **self.env)
        self.procs["listener"] = subprocess.Popen(
            self.args.wrap.split() + [bin_path, "server", "--config", str(d / "listener.toml")], env=lenv,
            stdout=subprocess.DEVNULL, stderr=open(d / "listener.log", "wb"))
        wait_port(self.listener_port)
        self.procs["client"] = subprocess.Popen(
            [bin_path, "client", "--config", str(d / "client.toml")], env=env,
            stdout=subprocess.DEVNULL, stderr=open(d / "client.log", "wb"))
        wait_port(self.client_port)

    def start_wrk(self):
        url = f"http://127.0.0.1:{self.client_port}"
        self.procs["wrk"] = subprocess.Popen(
            ["wrk", "-t1", f"-c{self.args.wrk_conns}", f"-d{int(self.args.duration) + 600}s", "--timeout", "10s",
             "-s", str(HERE / "mix.lua"), url],
            env=dict(os.environ, SOAK_DELAY_MS=str(self.args.wrk_delay_ms)),
            stdout=open(self.dir / "wrk.out", "wb"), stderr=subprocess.STDOUT)

    def listener_pid(self):
        """The listener's own pid: under --wrap, the wrapper's descendant running `server`."""
        pid = self.procs["listener"].pid
        if not self.args.wrap:
            return pid
        if getattr(self, "_real_pid", None):
            return self._real_pid
        for _ in range(100):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
                    environ_ok = b"server" in cmd and str(self.dir / "listener.toml").encode() in cmd
                    if environ_ok and os.path.basename(cmd[0]) == b"phoenix-mesh":
                        self._real_pid = int(entry)
                        return self._real_pid
                except OSError:
                    continue
            time.sleep(0.1)
        raise RuntimeError("the wrapped listener did not start")

    def signal_listener(self, sig):
        try:
            os.kill(self.listener_pid(), sig)
        except ProcessLookupError:
            pass

    def stop(self):
        for name in ("wrk", "client", "listener"):
            p = self.procs.get(name)
            if p and p.poll() is None:
                if name == "listener":
                    self.signal_listener(signal.SIGTERM)
                else:
                    p.terminate()
        for name in ("wrk", "client", "listener"):
            p = self.procs.get(name)
            if p:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.kill_backend()

    # --- sampling
    def sample(self, t0, writer):
        pid = self.listener_pid()
        st = proc_status(pid)
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            fds = -1
        m = scrape(self.listener_admin)
        cm = scrape(self.client_admin)
        cst = proc_status(self.procs["client"].pid)
        row = {
            "t_s": round(time.time() - t0, 1),
            "unix": int(time.time()),
            "arm": self.name,
            "vmrss_kib": st.get("VmRSS", -1),
            "rssanon_kib": st.get("RssAnon", -1),
            "vmhwm_kib": st.get("VmHWM", -1),
            "fds": fds,
            "threads": st.get("Threads", -1),
            "open_connections": int(m.get("phoenix_mesh_open_connections", -1)),
            "requests_total": int(m.get("phoenix_mesh_http_requests_total", -1)),
            "requests_5xx": int(m.get("phoenix_mesh_http_requests_total/5xx", 0)),
            "handshakes_ok": int(m.get("phoenix_mesh_tls_handshakes_total/ok", 0)),
            "reloads_ok": int(m.get("phoenix_mesh_reloads_total/ok", 0)),
            "backend_conns": count_established(self.backend_port),
            "client_rssanon_kib": cst.get("RssAnon", -1),
            "client_requests_total": int(cm.get("phoenix_mesh_http_requests_total", -1)),
        }
        writer.writerow(row)


def proc_status(pid):
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def scrape(port):
    """Sums of the series we chart, from /metrics: name -> total, name/label-value -> total."""
    out = {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] = out.get(name, 0) + v
        for key in ("status_class", "result"):
            marker = f'{key}="'
            if marker in labels:
                lv = labels.split(marker, 1)[1].split('"', 1)[0]
                out[f"{name}/{lv}"] = out.get(f"{name}/{lv}", 0) + v
    return out


def count_established(remote_port):
    """ESTABLISHED TCP connections whose remote port is `remote_port` (the listener's side of its
    backend connections; the backend's own side has it as the local port)."""
    n = 0
    try:
        for line in open("/proc/net/tcp").readlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[2].split(":")[1], 16) == remote_port:
                n += 1
    except OSError:
        return -1
    return n


def wait_port(port, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# ---------------------------------------------------------------- bursts of fresh connections

def burst(arm, certs, pki, n):
    """n fresh mTLS connections straight to the listener and n fresh plain ones to the client, each
    one GET with Connection: close."""
    ctx = ssl.create_default_context(cafile=str(pki / "root.crt"))
    ctx.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
    ctx.check_hostname = False
    ok = 0
    req = b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
    for _ in range(n):
        for tls in (True, False):
            try:
                port = arm.listener_port if tls else arm.client_port
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                if tls:
                    s = ctx.wrap_socket(s, server_hostname="traefik.internal.test")
                s.sendall(req)
                while s.recv(65536):
                    pass
                s.close()
                ok += 1
            except OSError:
                pass
    return ok


def parallel_burst(arm, n, path):
    """n requests for `path` at once through the client sidecar, each on a fresh connection: the
    listener's pool to the backend grows to about n connections, which then idle out."""
    def one():
        try:
            s = socket.create_connection(("127.0.0.1", arm.client_port), timeout=30)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode())
            while s.recv(262144):
                pass
            s.close()
        except OSError:
            pass
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---------------------------------------------------------------- main loop

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, type=Path)
    ap.add_argument("--run", type=Path, default=Path("/tmp/phoenix-mesh-soak"))
    ap.add_argument("--out", type=Path, default=None, help="CSV directory (default RUN)")
    ap.add_argument("--prefix", default="soak", help="CSV name: PREFIX-ARM.csv")
    ap.add_argument("--arms", default="A,B,C")
    ap.add_argument("--duration", type=float, default=3900)
    ap.add_argument("--sample", type=float, default=10)
    ap.add_argument("--reissue", type=float, default=60)
    ap.add_argument("--kill-every", type=float, default=180)
    ap.add_argument("--kill-for", type=float, default=3)
    ap.add_argument("--burst-every", type=float, default=20)
    ap.add_argument("--burst", type=int, default=25, help="fresh connections per burst and kind")
    ap.add_argument("--burst-parallel", type=int, default=0,
                    help="also, each burst, this many requests for --burst-path at once through the client")
    ap.add_argument("--burst-path", default="/huge", help="/ (short), /big (64 KiB) or /huge (1 MiB)")
    ap.add_argument("--wrk-conns", type=int, default=4)
    ap.add_argument("--wrk-delay-ms", type=int, default=20, help="pause before each request on a wrk connection")
    ap.add_argument("--worker-threads", type=int, default=None, help="the listener's worker_threads (default: unset, 1)")
    ap.add_argument("--client-http1", action="store_true", help="upstream_http2 = false on the client sidecars")
    ap.add_argument("--echo-size", action="store_true", help="answer the 64 KiB uploads with 64 KiB")
    ap.add_argument("--base-port", type=int, default=19000)
    ap.add_argument("--wrap", default="", help="command the listener runs under, e.g. 'heaptrack -o FILE'")
    args = ap.parse_args()
    args.out = args.out or args.run
    args.run.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    pki, certs = args.run / "pki", args.run / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    openssl_ca(pki)
    serial = 1000
    for which in LEAVES:
        serial += 1
        issue(pki, certs, which, serial)

    arms = [Arm(n, ARMS[n], i, args) for i, n in enumerate(args.arms.split(","))]
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    signal.signal(signal.SIGINT, lambda *_: STOP.set())
    try:
        for a in arms:
            a.backend_conf()
            a.start_backend()
            a.start_sidecars(args.bin.resolve(), certs, pki)
            log(f"arm {a.name}: listener pid {a.listener_pid()} :{a.listener_port} "
                f"(admin :{a.listener_admin}), client pid {a.procs['client'].pid} :{a.client_port}, "
                f"backend :{a.backend_port}, env {a.env}")
        for a in arms:
            a.start_wrk()
        files = {a.name: open(a.csv_path, "w", newline="") for a in arms}
        fields = ["t_s", "unix", "arm", "vmrss_kib", "rssanon_kib", "vmhwm_kib", "fds", "threads",
                  "open_connections", "requests_total", "requests_5xx", "handshakes_ok", "reloads_ok",
                  "backend_conns", "client_rssanon_kib", "client_requests_total"]
        writers = {n: csv.DictWriter(f, fieldnames=fields) for n, f in files.items()}
        for w in writers.values():
            w.writeheader()
        t0 = time.time()
        next_sample = next_reissue = next_burst = t0
        next_kill = t0 + args.kill_every
        while not STOP.is_set() and time.time() - t0 < args.duration:
            now = time.time()
            if now >= next_sample:
                next_sample += args.sample
                for a in arms:
                    a.sample(t0, writers[a.name])
                    files[a.name].flush()
            if now >= next_reissue and now > t0 + 1:
                next_reissue += args.reissue
                for which in LEAVES:
                    serial += 1
                    issue(pki, certs, which, serial)
                for a in arms:
                    a.signal_listener(signal.SIGHUP)
                    a.procs["client"].send_signal(signal.SIGHUP)
            elif now >= next_reissue:
                next_reissue += args.reissue
            if now >= next_burst:
                next_burst += args.burst_every
                for a in arms:
                    burst(a, certs, pki, args.burst)
                    if args.burst_parallel:
                        parallel_burst(a, args.burst_parallel, args.burst_path)
            if now >= next_kill:
                next_kill += args.kill_every
                for a in arms:
                    a.kill_backend()
                log("backends killed")
                time.sleep(args.kill_for)
                for a in arms:
                    a.start_backend()
                log("backends back")
            for a in arms:
                for name, p in a.procs.items():
                    if p.poll() is not None:
                        log(f"arm {a.name}: {name} exited with {p.returncode}")
                        STOP.set()
            time.sleep(0.5)
        log("done")
    finally:
        for a in arms:
            a.stop()


if __name__ == "__main__":
    sys.exit(main())
