"""`seg3d serve`: seg3d as a DICOM node. A PACS, a modality or a router pushes CT series to it (C-STORE); each
complete series is segmented with the Predictor `seg3d infer` uses, and its DICOM SEG (and RTSTRUCT, if asked) is
sent to the destination (C-STORE), retried while it is down.

Nothing lives only in memory: every stage of a series is a folder of the spool (pipeline/serve/spool.py), so a node
killed at any moment and started again finishes what it had acknowledged and never sends a result twice that the
destination had acknowledged and the node had recorded. The SCP and the completion rule are in node.py, the way out
in sender.py, /health and /metrics in web.py. Logs name a series by its case key (a hash of the Series Instance
UID), never by a patient's name or id.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import Seg3dError
from pipeline.serve.sender import Peer, Sender, check_aet, parse_peer
from pipeline.serve.spool import Spool

log = logging.getLogger("seg3d.serve")


@dataclass
class ServeOptions:
    model: str
    spool: Path
    send_to: Peer
    ae_title: str = "SEG3D"
    host: str = "0.0.0.0"
    port: int = 11112
    allow: list[str] = field(default_factory=list)
    quiet_s: float = 10.0
    complete_on_release: bool = True
    health_port: int = 11113
    rtstruct: bool = False
    device: str = "auto"
    precision: str = "auto"
    backend: str = "torch"
    tracking_uri: str | None = None


def options(args) -> ServeOptions:
    """The command line's arguments, checked, as ServeOptions (one line and exit 2 for each mistake)."""
    if not 0 < args.port < 65536:
        raise Seg3dError(f"--port {args.port} is not a TCP port (1-65535)")
    if not 0 <= args.health_port < 65536:
        raise Seg3dError(f"--health-port {args.health_port} is not a TCP port (1-65535, or 0 for none)")
    if not 0 < args.quiet_time <= 3600:
        raise Seg3dError(f"--quiet-time {args.quiet_time} must be in (0, 3600] seconds")
    return ServeOptions(
        model=args.model,
        spool=args.spool,
        send_to=parse_peer(args.send_to),
        ae_title=check_aet(args.ae_title, "--ae-title"),
        host=args.host,
        port=args.port,
        allow=[check_aet(a, "--allow") for a in args.allow or []],
        quiet_s=args.quiet_time,
        complete_on_release=not args.no_complete_on_release,
        health_port=args.health_port,
        rtstruct=args.rtstruct,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        tracking_uri=args.tracking_uri,
    )


def _segmenter(opts: ServeOptions, workdir: Path):
    """The model loaded once; a function that runs seg3d infer's code on one series folder into a work folder."""
    from pipeline.engines import check_engine
    from pipeline.ensemble import load_model
    from pipeline.infer import resolve_model, run_inference

    check_engine(opts.backend)
    bundle = load_model(resolve_model(opts.model, opts.tracking_uri, workdir))

    def segment(series: Path, work: Path) -> None:
        summary = run_inference(
            opts.model,
            series,
            work,
            bundle=bundle,
            device=opts.device,
            precision=opts.precision,
            backend=opts.backend,
            dicom_seg=True,
            rtstruct=opts.rtstruct,
            progress=False,
        )
        if summary.failed:
            raise Seg3dError(summary.failed[0][1])

    return segment


def serve(opts: ServeOptions) -> int:
    """Run the node until SIGTERM or Ctrl-C (cli.main turns both into KeyboardInterrupt)."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

    from pipeline.serve.node import CT_IMAGE_STORAGE, Receiver, work_loop
    from pipeline.serve.web import Metrics, start_http

    _log_to_stderr()
    spool = Spool(opts.spool)
    spool.recover()
    with tempfile.TemporaryDirectory(prefix="seg3d-serve-") as workdir:
        segment = _segmenter(opts, Path(workdir))
        metrics = Metrics(lambda: len(spool.jobs("series")), lambda: len(spool.jobs("outbox")))
        work_wake, send_wake, stop = threading.Event(), threading.Event(), threading.Event()
        receiver = Receiver(spool, metrics, quiet_s=opts.quiet_s, on_release=opts.complete_on_release, wake=work_wake)
        ae = AE(ae_title=opts.ae_title)
        ae.supported_contexts = StoragePresentationContexts  # everything, so that a non-CT series is named in the log
        # CT in every transfer syntax: the series reader (ITK's GDCM) decodes JPEG, JPEG-LS, JPEG 2000 and RLE, and
        # the sender need not transcode (Orthanc cannot transcode JPEG 2000, the real CT's syntax, for one).
        ae.add_supported_context(CT_IMAGE_STORAGE, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification (C-ECHO)
        if opts.allow:
            ae.require_calling_aet = opts.allow
        try:
            scp = ae.start_server((opts.host, opts.port), block=False, evt_handlers=receiver.handlers())
        except OSError as err:
            raise Seg3dError(
                f"--port {opts.port}: cannot listen on {opts.host}:{opts.port} ({err.strerror or err}); choose another"
                " port or stop what holds it"
            ) from None
        sender = Sender(spool, opts.send_to, opts.ae_title, metrics, send_wake)
        ticker = threading.Thread(target=receiver.tick, name="seg3d-quiet", daemon=True)
        http = None
        try:
            http = (
                start_http(opts.health_port, lambda: _health(ticker, sender, spool), metrics)
                if opts.health_port
                else None
            )
            sender.start()
            ticker.start()
            log.info(
                "%s listening on %s:%d (calling AE titles: %s); results to %s; spool %s: %d arriving, %d queued, %d to"
                " send%s",
                opts.ae_title, opts.host, opts.port, ", ".join(opts.allow) or "any", opts.send_to, spool.root,
                len(spool.incoming()), len(spool.jobs("series")), len(spool.jobs("outbox")),
                f"; health on http://127.0.0.1:{opts.health_port}/health" if http else "",
            )  # fmt: skip
            work_loop(spool, segment, metrics, work_wake, send_wake, stop)
        finally:
            stop.set()
            receiver.stopping.set()
            sender.stop()
            scp.shutdown()
            if http is not None:
                http.shutdown()
    return 0


def _health(ticker: threading.Thread, sender: Sender, spool: Spool) -> tuple[bool, dict]:
    ok = ticker.is_alive() and sender.is_alive()
    counts = {stage: len(spool.jobs(stage)) for stage in ("series", "outbox", "failed")}
    return ok, {"status": "ok" if ok else "unhealthy", "queued": counts["series"], "to_send": counts["outbox"],
                "failed": counts["failed"], "arriving": len(spool.incoming())}  # fmt: skip


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s seg3d serve: %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)  # its INFO/DEBUG lines can quote datasets


__all__ = ["Peer", "ServeOptions", "options", "serve"]
