"""optuna-dashboard on a study's storage, and the notes that show each trial's sample responses."""

from __future__ import annotations

import socket
import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.trial import FrozenTrial


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


STOP_NOTES = {
    "dominated": "Stopped early: its refusals so far and its KL were already dominated by a finished trial, so it "
    "cannot be on the Pareto front; its refusal rate is a lower bound.",
    "kl_limit": "Not generated: its KL is above --kl-limit, so it is recorded as refusing every prompt.",
}


def trial_note(
    trial: optuna.Trial, samples: list[tuple[str, str]], refusals: str, kl: float, stopped: str | None = None,
    verified: list[str] | None = None,
) -> None:  # fmt: skip
    """A Markdown note on the trial with its scores, how it was stopped early if it was (a key of
    STOP_NOTES), its verification (lines) and its sample responses (shown by the dashboard)."""
    from optuna_dashboard import save_note

    lines = [f"**Refusals {refusals}, KL {kl:.4f}**", ""] + ([f"_{STOP_NOTES[stopped]}_", ""] if stopped else [])
    lines += verified or []
    for prompt, response in samples:
        lines += [f"> {prompt}", "", "```", response.strip() or "(empty)", "```", ""]
    save_note(trial, "\n".join(lines))


def renote(study: optuna.Study, storage: optuna.storages.BaseStorage, trial: FrozenTrial, verified: list[str]) -> None:
    """Write a finished trial's note again from its user attributes, with `verified` added."""
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    attrs = trial.user_attrs
    samples = [(s["prompt"], s["response"]) for s in attrs.get("sample_responses", [])]
    live = optuna.trial.Trial(study, trial_id)
    trial_note(live, samples, str(attrs.get("refusals", "?")), trial.values[1], attrs.get("early_stop"), verified)


JOIN_WAKE_S = 0.25  # the main thread wakes this often, so that a signal is acted on within it (see `serve`)


class _Server(ThreadingMixIn, WSGIServer):
    """A browser asks for several things at once; a slow one must not hold up the others.

    Request threads are not daemons: `server_close` joins them (`block_on_close`), so the process
    exits only after every answer in flight is finished. A daemon thread would be frozen wherever it
    stood when the interpreter shut down, perhaps holding a lock (a logging handler's, the storage's
    connection pool's) that an exit handler then waits on for ever. A client that connects and never
    sends its request cannot hold up the exit past the handler's socket `timeout`."""

    daemon_threads = False
    block_on_close = True

    def handle_error(self, request, client_address) -> None:
        """A client that went away (a closed tab, a timed-out request, a silent connection past the
        handler's timeout) is no error of ours: socketserver would print a traceback for each, on a
        busy machine dozens, and a process whose output nobody reads (a pipe that fills) then blocks
        in that print. Anything else is printed as before."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    timeout = 2  # seconds a connection may stay silent before its thread gives up (and holds up the exit)

    def log_message(self, format: str, *args: object) -> None:  # one line per request is noise here
        pass


def serve(storage_url: str, host: str = "127.0.0.1", port: int | None = None) -> None:
    """Serve the dashboard until Ctrl-C or SIGTERM; prints the URL first.

    The server runs in a thread and the main thread only waits for it: a signal's exception is
    raised in the main thread, and wsgiref's request handler catches *every* exception of a request
    (KeyboardInterrupt included) to answer it with an error page, so a Ctrl-C or SIGTERM that arrived
    while a request was being answered used to be swallowed and the dashboard never stopped. The main
    thread waits in short joins, not one: Linux delivers a signal to any thread of the process, and
    Python runs its handler only when the main thread next runs Python code. A join without a timeout
    never returns while the server runs, so a SIGTERM that landed on a request thread (likelier the
    busier the machine) was never acted on, and the process had to be killed."""
    from optuna_dashboard import wsgi

    from optimizer.storage import connect, redacted

    app = wsgi(connect(storage_url))
    httpd = make_server(host, port or 0, app, server_class=_Server, handler_class=_QuietHandler)
    url = f"http://{host}:{httpd.server_port}/dashboard/"
    print(f"optuna-dashboard for {redacted(storage_url)}: {url}  (Ctrl-C stops it)", flush=True)
    thread = threading.Thread(target=httpd.serve_forever, name="dashboard", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=JOIN_WAKE_S)
    finally:
        httpd.shutdown()
        httpd.server_close()
