"""optuna-dashboard on a study's storage, and the notes that show each trial's sample responses."""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def trial_note(trial: optuna.Trial, samples: list[tuple[str, str]], refusals: str, kl: float, stopped: str | None = None) -> None:
    """A Markdown note on the trial with its scores, how it was stopped early if it was, and its
    sample responses (shown by the dashboard)."""
    from optuna_dashboard import save_note

    lines = [f"**Refusals {refusals}, KL {kl:.4f}**", ""] + ([f"_{stopped}_", ""] if stopped else [])
    for prompt, response in samples:
        lines += [f"> {prompt}", "", "```", response.strip() or "(empty)", "```", ""]
    save_note(trial, "\n".join(lines))


class _Server(ThreadingMixIn, WSGIServer):
    """A browser asks for several things at once; a slow one must not hold up the others."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per request is noise here
        pass


def serve(storage_url: str, host: str = "127.0.0.1", port: int | None = None) -> None:
    """Serve the dashboard until Ctrl-C or SIGTERM; prints the URL first.

    The server runs in a thread and the main thread only waits for it: a signal's exception is
    raised in the main thread, and wsgiref's request handler catches *every* exception of a request
    (KeyboardInterrupt included) to answer it with an error page, so a Ctrl-C or SIGTERM that arrived
    while a request was being answered used to be swallowed and the dashboard never stopped."""
    from optuna_dashboard import wsgi

    from optimizer.storage import connect, redacted

    app = wsgi(connect(storage_url))
    httpd = make_server(host, port or 0, app, server_class=_Server, handler_class=_QuietHandler)
    url = f"http://{host}:{httpd.server_port}/dashboard/"
    print(f"optuna-dashboard for {redacted(storage_url)}: {url}  (Ctrl-C stops it)", flush=True)
    thread = threading.Thread(target=httpd.serve_forever, name="dashboard", daemon=True)
    thread.start()
    try:
        thread.join()
    finally:
        httpd.shutdown()
        httpd.server_close()
