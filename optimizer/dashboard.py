"""optuna-dashboard on a study's storage, and the notes that show each trial's sample responses."""

from __future__ import annotations

import socket

import optuna


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def trial_note(trial: optuna.Trial, samples: list[tuple[str, str]], refusals: str, kl: float) -> None:
    """A Markdown note on the trial with its scores and sample responses (shown by the dashboard)."""
    from optuna_dashboard import save_note

    lines = [f"**Refusals {refusals}, KL {kl:.4f}**", ""]
    for prompt, response in samples:
        lines += [f"> {prompt}", "", "```", response.strip() or "(empty)", "```", ""]
    save_note(trial, "\n".join(lines))


def serve(storage_url: str, host: str = "127.0.0.1", port: int | None = None) -> None:
    """Serve the dashboard until interrupted; prints the URL first."""
    from optuna_dashboard import run_server

    from optimizer.storage import connect, redacted

    storage = connect(storage_url)
    port = port or free_port(host)
    print(f"optuna-dashboard for {redacted(storage_url)}: http://{host}:{port}/dashboard/  (Ctrl-C stops it)", flush=True)
    run_server(storage, host=host, port=port)
