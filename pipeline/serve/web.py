"""The node's operations surface, on loopback HTTP: /health for the container's HEALTHCHECK and /metrics in
Prometheus's text format (prometheus_client, on a registry of the node's own)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pipeline.errors import Seg3dError


class Metrics:
    def __init__(self, queued, to_send):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.instances = Counter("seg3d_instances_received", "CT instances stored in the spool", registry=self.registry)
        self.refused = Counter(
            "seg3d_instances_refused", "instances refused (not CT, unreadable)", registry=self.registry
        )
        self.received = Counter("seg3d_series_received", "series complete and queued", registry=self.registry)
        self.done = Counter("seg3d_series_done", "series whose results the destination stored", registry=self.registry)
        self.failed = Counter("seg3d_series_failed", "series that ended in failed/", registry=self.registry)
        self.queue = Gauge("seg3d_queue_length", "series waiting for inference", registry=self.registry)
        self.queue.set_function(queued)
        self.outbox = Gauge("seg3d_outbox_length", "results waiting to be sent", registry=self.registry)
        self.outbox.set_function(to_send)
        self.seconds = Histogram(
            "seg3d_series_seconds",
            "seconds from a series complete to its results stored at the destination",
            buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1800, float("inf")),
            registry=self.registry,
        )

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def start_http(port: int, health, metrics: Metrics) -> ThreadingHTTPServer:
    """Serve /health (200 with the node's counts while it is healthy, else 503) and /metrics on 127.0.0.1:port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                ok, detail = health()
                body, status, kind = json.dumps(detail).encode(), 200 if ok else 503, "application/json"
            elif self.path == "/metrics":
                body, status, kind = metrics.text(), 200, "text/plain; version=0.0.4"
            else:
                body, status, kind = b"not found: /health or /metrics\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # the health check polls every few seconds: not a line each time
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as err:
        raise Seg3dError(
            f"--health-port {port}: cannot listen on 127.0.0.1:{port} ({err.strerror or err}); choose another port,"
            " or 0 for none"
        ) from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="seg3d-http", daemon=True).start()
    return server
