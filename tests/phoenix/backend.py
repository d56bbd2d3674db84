"""The service behind Traefik in the scratch world (LXC 802): answers 200 with what it received.

    python3 backend.py ADDRESS PORT
"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        lines = [f"path={self.path}", f"host={self.headers.get('Host', '')}"]
        lines += [f"{k.lower()}={v}" for k, v in self.headers.items()]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("backend: " + fmt % args + "\n")


ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Echo).serve_forever()
