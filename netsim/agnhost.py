"""agnhost, the Kubernetes e2e tests' image, as netsim serves it: the subcommands the e2e
network tests run, with agnhost's own flags and answers (kubernetes test/images/agnhost).
It runs as the container's process, in the pod's namespaces, so its hostname is the pod's
name and the client address it sees is the one the pod sees.

    serve-hostname [--port 9376] [--http=true] [--tcp] [--udp] [--close]
    netexec [--http-port 8080] [--udp-port 8081]
    connect HOST:PORT [--timeout 5s] [--protocol tcp|udp]
    pause

Differences, said here so nobody is surprised: /shell is disabled (403), and on SIGTERM the
servers exit at once (agnhost's serve-hostname sleeps 60 s first).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from urllib.parse import parse_qs, urlsplit


def log(text: str) -> None:
    print(time.strftime("%Y/%m/%d %H:%M:%S ") + text, flush=True)


def _flag_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "t", "yes"):
        return True
    if text.lower() in ("false", "0", "f", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}")


def _bool_option(parser: argparse.ArgumentParser, name: str, default: bool) -> None:
    """Go's flag package: --tcp, --tcp=true, --tcp=false."""
    parser.add_argument(name, nargs="?", const=True, default=default, type=_flag_bool)


def _go_flags(argv: list[str]) -> list[str]:
    """Go flags may have one dash (-port 9376): argparse wants two."""
    return [
        "-" + a if a.startswith("-") and not a.startswith("--") and len(a) > 2 else a for a in argv
    ]


# -- serve-hostname ------------------------------------------------------------------------


def serve_hostname(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="agnhost serve-hostname")
    parser.add_argument("--port", type=int, default=9376)
    _bool_option(parser, "--http", True)
    _bool_option(parser, "--tcp", False)
    _bool_option(parser, "--udp", False)
    _bool_option(parser, "--close", False)
    args = parser.parse_args(_go_flags(argv))
    if args.http and (args.tcp or args.udp):
        log("Can't use --http in combination with --tcp or --udp")
        return 1
    hostname = socket.gethostname()
    if args.tcp:
        listener = socket.create_server(("", args.port), reuse_port=False, backlog=128)
        threading.Thread(target=_tcp_hostname, args=(listener, hostname), daemon=True).start()
    if args.udp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("", args.port))
        threading.Thread(target=_udp_hostname, args=(sock, hostname), daemon=True).start()
    if args.http:
        close = args.close

        class Hostname(_Quiet):
            def do_GET(self) -> None:
                self.reply(200, hostname, close=close)

        server = _Server(("", args.port), Hostname)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    log(f"Serving on port {args.port}.")
    started()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    log("Exiting.")
    return 0


def started() -> None:
    """Tell the node agent the servers listen (agnhost, in Go, does so within a millisecond
    of its start; this Python one takes a hundred): the container counts as started, and
    ready without a readiness probe, from now on, not from its fork."""
    fd = os.environ.pop("NETSIM_STARTED_FD", "")
    if fd.isdigit():
        try:
            os.write(int(fd), b"1")
            os.close(int(fd))
        except OSError:
            pass


def _tcp_hostname(listener: socket.socket, hostname: str) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(hostname.encode())


def _udp_hostname(sock: socket.socket, hostname: str) -> None:
    while True:
        _, peer = sock.recvfrom(2048)
        sock.sendto(hostname.encode(), peer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        """As HTTPServer's, without its getfqdn(): a DNS lookup at start, for nothing."""
        TCPServer.server_bind(self)
        self.server_name, self.server_port = "", self.server_address[1]


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 -- the base's name
        pass

    def reply(self, code: int, body: str, close: bool = False, kind: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)


# -- netexec -------------------------------------------------------------------------------


def netexec(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="agnhost netexec")
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--udp-port", type=int, default=8081)
    parser.add_argument("--sctp-port", type=int, default=-1)
    args = parser.parse_args(_go_flags(argv))
    hostname = socket.gethostname()
    udp_up = threading.Event()
    terminating = threading.Event()
    if args.udp_port != -1:
        threading.Thread(
            target=_udp_commands, args=(args.udp_port, hostname, udp_up), daemon=True
        ).start()
    else:
        udp_up.set()

    class NetExec(_Quiet):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            path = url.path
            if path == "/":
                self.reply(200, f"NOW: {time.strftime('%Y-%m-%d %H:%M:%S.000000000 +0000 UTC')}")
            elif path in ("/hostname", "/hostName"):
                self.reply(200, hostname)
            elif path == "/clientip":
                self.reply(200, f"{self.client_address[0]}:{self.client_address[1]}")
            elif path == "/echo":
                self.reply(int(query.get("code", 200)), query.get("msg", ""))
            elif path == "/healthz":
                self.reply(200 if udp_up.is_set() else 412, "")
            elif path == "/readyz":
                self.reply(503 if terminating.is_set() else 200, "ok")
            elif path == "/dial":
                self.dial(query)
            elif path == "/shell":
                self.reply(403, "netsim: /shell is disabled")
            elif path in ("/exit", "/shutdown"):
                self.reply(200, "")
                code = int(query.get("code", 0)) if path == "/exit" else 0
                threading.Timer(0.05, lambda: _exit(code)).start()
            else:
                self.reply(404, "404 page not found")

        do_POST = do_GET

        def dial(self, query: dict) -> None:
            if "request" not in query:
                self.reply(400, "request parameter not specified")
                return
            host, port = query.get("host", ""), int(query.get("port", 0))
            tries = int(query.get("tries", 1))
            responses, errors = [], []
            for _ in range(max(1, tries)):
                try:
                    responses.append(_dial(query.get("protocol", "http"), host, port, query))
                except OSError as exc:
                    errors.append(str(exc))
            self.reply(
                200,
                json.dumps({"responses": responses, "errors": errors}),
                kind="application/json",
            )

    server = _Server(("", args.http_port), NetExec)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log(f"Started HTTP server on port {args.http_port}")
    udp_up.wait(5)
    started()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    terminating.set()
    log("Exiting.")
    return 0


def _exit(code: int) -> None:
    sys.stdout.flush()
    import os

    os._exit(code)


def _dial(protocol: str, host: str, port: int, query: dict) -> str:
    request = query["request"]
    if protocol == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(request.encode(), (host, port))
            return sock.recv(65536).decode(errors="replace")
    url = f"http://{host}:{port}/{request.lstrip('/')}"
    with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 -- a pod's own dial
        return reply.read().decode(errors="replace")


def _udp_commands(port: int, hostname: str, up: threading.Event) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("", port))
    log(f"Started UDP server on port {port}")
    up.set()
    while True:
        data, peer = sock.recvfrom(65536)
        text = data.decode(errors="replace").strip()
        verb, _, rest = text.partition(" ")
        if verb == "hostname":
            answer = hostname
        elif verb == "echo":
            answer = rest
        elif verb == "clientip":
            answer = f"{peer[0]}:{peer[1]}"
        else:
            answer = f"unknown command {verb!r}"
        sock.sendto(answer.encode(), peer)


# -- connect and pause ---------------------------------------------------------------------


def connect(argv: list[str]) -> int:
    """Exit 0 if a connection (TCP) or an answer (UDP) came; agnhost connect's probe."""
    parser = argparse.ArgumentParser(prog="agnhost connect")
    parser.add_argument("target")
    parser.add_argument("--timeout", default="5s")
    parser.add_argument("--protocol", default="tcp", choices=["tcp", "udp"])
    args = parser.parse_args(_go_flags(argv))
    host, _, port = args.target.rpartition(":")
    timeout = float(args.timeout.rstrip("s") or 5)
    try:
        if args.protocol == "tcp":
            socket.create_connection((host, int(port)), timeout=timeout).close()
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(timeout)
                sock.sendto(b"hostname", (host, int(port)))
                sock.recv(65536)
    except TimeoutError:
        print("TIMEOUT", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"OTHER: {exc}", file=sys.stderr)
        return 1
    return 0


def pause(_: list[str]) -> int:
    started()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    return 0


COMMANDS = {
    "serve-hostname": serve_hostname,
    "netexec": netexec,
    "connect": connect,
    "pause": pause,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        print(f"agnhost: netsim serves the subcommands {known}; not {argv[:1]}", file=sys.stderr)
        return 1
    if argv[0] != "connect":  # the servers wait for SIGTERM in sigwait, their threads too
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
